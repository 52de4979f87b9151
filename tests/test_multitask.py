"""Multi-task engine: independent per-task policies, weighted loss, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from dslo_edge.dynamic import DriftBoost, ProgressSettings, TaskSettings
from dslo_edge.losses import distillation_loss
from dslo_edge.multitask import MultiTaskEngine
from dslo_edge.softlabels import AlphaPolicy, Schedule

IDS = ["a", "b", "c"]


def sharp(num_classes: int, top_class: int) -> np.ndarray:
    rows = np.full((3, num_classes), 0.03 / (num_classes - 1))
    rows[:, top_class] = 0.97
    return rows.astype(np.float32)


def engine() -> MultiTaskEngine:
    return MultiTaskEngine(
        {
            "digit": TaskSettings(
                alpha=AlphaPolicy(0.9, 0.1, 0.5, 0.5, Schedule("linear")),
                temperature=2.0,
                drift=DriftBoost(threshold=1.0, smoothing_lambda=5.0, updates=3),
                weight=1.0,
            ),
            "parity": TaskSettings(
                alpha=AlphaPolicy(0.6, 0.6, 0.0, 1.0, Schedule("constant")),
                temperature=1.0,
                smoothing_lambda=0.0,
                weight=0.5,
            ),
        },
        ProgressSettings(planned_updates=2),
    )


def test_per_task_alphas_are_independent() -> None:
    tasks = engine()
    first = tasks.prepare(IDS, {"digit": sharp(10, 1), "parity": sharp(2, 0)}, 1)
    tasks.finish_update()
    second = tasks.prepare(
        IDS, {"digit": np.full((3, 10), 0.1), "parity": sharp(2, 0)}, 1
    )

    # The parity head is static KD: its alpha moves with neither time nor
    # the digit teacher's confidence.
    np.testing.assert_allclose(first["parity"].alpha, 0.6, atol=1e-6)
    np.testing.assert_allclose(second["parity"].alpha, 0.6, atol=1e-6)
    # The digit head follows its own schedule and teacher: at t = 0.5 with a
    # uniform teacher, 0.1 + 0.8 * (0.5 * 0 + 0.5 * 0.5) = 0.3.
    np.testing.assert_allclose(second["digit"].alpha, 0.3, atol=1e-6)
    assert first["digit"].temperature == 2.0
    assert first["parity"].temperature == 1.0


def test_drift_boost_stays_in_its_task() -> None:
    tasks = engine()
    tasks.prepare(IDS, {"digit": sharp(10, 1), "parity": sharp(2, 0)}, 1)
    tasks.finish_update()
    targets = tasks.prepare(IDS, {"digit": sharp(10, 7), "parity": sharp(2, 0)}, 2)
    assert targets["digit"].smoothing_lambda == 5.0
    assert targets["parity"].smoothing_lambda == 0.0
    snapshot = tasks.snapshot()
    assert snapshot["digit"]["drift_boost_remaining"] == 3
    assert snapshot["parity"]["drift_boost_remaining"] == 0


def test_loss_is_weighted_sum_of_task_losses() -> None:
    tasks = engine()
    targets = tasks.prepare(IDS, {"digit": sharp(10, 1), "parity": sharp(2, 0)}, 1)
    rng = np.random.default_rng(0)
    logits = {"digit": rng.normal(size=(3, 10)), "parity": rng.normal(size=(3, 2))}

    total, gradients = tasks.loss(logits, targets)

    expected = 0.0
    for name, weight in (("digit", 1.0), ("parity", 0.5)):
        t = targets[name]
        value, gradient = distillation_loss(
            logits[name], t.soft, t.hard, t.alpha, t.temperature
        )
        expected += weight * value
        np.testing.assert_allclose(gradients[name], weight * gradient)
    assert total == pytest.approx(expected, rel=1e-12)


def test_rejects_missing_task_labels() -> None:
    with pytest.raises(ValueError, match=r"tasks \['digit'\], expected"):
        engine().prepare(IDS, {"digit": sharp(10, 1)}, 1)


def test_rejects_task_name_with_slash() -> None:
    with pytest.raises(ValueError, match="task name 'a/b'"):
        MultiTaskEngine({"a/b": TaskSettings()})


def test_multitask_checkpoint_round_trip() -> None:
    tasks = engine()
    tasks.prepare(IDS, {"digit": sharp(10, 1), "parity": sharp(2, 0)}, 1)
    tasks.finish_update()
    tensors, state = tasks.checkpoint_content()
    assert "tasks/digit/smoothing/rows" in tensors
    assert "tasks/parity/monitor/rows" in tensors

    restored = engine()
    restored.restore(tensors, state)

    for name in ("digit", "parity"):
        before = tasks.engines[name]
        after = restored.engines[name]
        assert after.applied_updates == before.applied_updates == 1
        assert after.store.to_arrays()[0] == before.store.to_arrays()[0]
        np.testing.assert_array_equal(
            after.store.to_arrays()[1], before.store.to_arrays()[1]
        )
