"""The per-update engine: progress, drift boost, hard labels, loss, checkpoints."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dslo_edge.dynamic import (
    DriftBoost,
    ProgressSettings,
    SoftLabelEngine,
    TaskSettings,
)
from dslo_edge.errors import ConfigError
from dslo_edge.losses import distillation_loss, kl_divergence, log_softmax
from dslo_edge.lru_rows import LruRowTable, pack_ids, unpack_ids
from dslo_edge.softlabels import (
    AlphaPolicy,
    Schedule,
    SmoothingStore,
    TeacherMonitor,
)

TEACHER = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
STUDENT = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
# KL between two sharp(., 3, .) rows with different top classes:
# 0.97 log(0.97 / 0.015) + 0.015 log(0.015 / 0.97) + 0.
SWITCH_KL_3 = (0.97 - 0.015) * math.log(0.97 / 0.015)


def sharp(num_rows: int, num_classes: int, top_class: int) -> np.ndarray:
    rows = np.full((num_rows, num_classes), 0.03 / (num_classes - 1))
    rows[:, top_class] = 0.97
    return rows.astype(np.float32)


def ids(count: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


# Loss in numpy


def test_kd_term_golden_value() -> None:
    # The student's probabilities are exactly q when its logits are log q.
    loss, _ = distillation_loss(
        np.log(STUDENT), TEACHER, np.array([-1, -1]), np.ones(2), temperature=1.0
    )
    expected = np.mean(np.sum(TEACHER * np.log(TEACHER / STUDENT), axis=1))
    assert expected == pytest.approx(0.0592, abs=5e-5)
    assert loss == pytest.approx(expected, rel=1e-12)


def test_kl_of_identical_distributions_is_zero() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=50)
    np.testing.assert_allclose(kl_divergence(p, np.log(p)), 0.0, atol=1e-12)


@settings(max_examples=100)
@given(seed=st.integers(0, 2**31), classes=st.integers(2, 20))
def test_kl_is_non_negative(seed: int, classes: int) -> None:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(classes, 0.3), size=8)
    q = rng.dirichlet(np.full(classes, 0.3), size=8)
    assert np.all(kl_divergence(p, np.log(q)) >= -1e-12)


def test_one_hot_teacher_gives_finite_loss_and_gradient() -> None:
    one_hot = np.eye(4)[[0, 3]]
    alpha = AlphaPolicy().alpha(one_hot, 0.5)
    logits = np.array([[30.0, -30.0, 0.0, 0.0], [-50.0, 0.0, 0.0, 50.0]])

    loss, grad = distillation_loss(logits, one_hot, np.array([-1, 3]), alpha, 2.0)

    assert math.isfinite(loss)
    assert np.all(np.isfinite(grad))
    assert np.all((alpha >= 0.2) & (alpha <= 0.8))


def test_loss_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 5))
    soft = rng.dirichlet(np.ones(5), size=3)
    hard = np.array([1, -1, 4])
    alpha = np.array([0.2, 0.5, 0.9])
    _, grad = distillation_loss(logits, soft, hard, alpha, 2.0)
    numeric = np.zeros_like(logits)
    step = 1e-6
    for index in np.ndindex(logits.shape):
        plus, minus = logits.copy(), logits.copy()
        plus[index] += step
        minus[index] -= step
        up, _ = distillation_loss(plus, soft, hard, alpha, 2.0)
        down, _ = distillation_loss(minus, soft, hard, alpha, 2.0)
        numeric[index] = (up - down) / (2 * step)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_masked_hard_label_drops_ce_term() -> None:
    logits = log_softmax(np.log(STUDENT))
    masked, _ = distillation_loss(logits, TEACHER, np.array([-1, -1]), np.zeros(2), 1)
    assert masked == 0.0


# Progress


def test_progress_counts_updates() -> None:
    progress = ProgressSettings("updates", planned_updates=4)
    assert progress.value(applied_updates=0, highest_round=9) == 0.0
    assert progress.value(applied_updates=2, highest_round=9) == 0.5
    assert progress.value(applied_updates=9, highest_round=9) == 1.0


def test_progress_counts_teacher_rounds() -> None:
    progress = ProgressSettings("rounds", planned_rounds=5)
    assert progress.value(applied_updates=999, highest_round=0) == 0.0
    assert progress.value(applied_updates=999, highest_round=2) == 0.4
    assert progress.value(applied_updates=0, highest_round=7) == 1.0


def test_engine_progress_in_rounds_ignores_stale_rounds() -> None:
    engine = SoftLabelEngine(TaskSettings(), ProgressSettings("rounds", 1000, 4))
    engine.prepare(ids(2), sharp(2, 3, 0), teacher_round=2)
    assert engine.progress == 0.5
    targets = engine.prepare(ids(2, "t"), sharp(2, 3, 0), teacher_round=1)
    assert targets.progress == 0.5


@pytest.mark.parametrize(
    ("rounds", "warned"),
    [
        ([1, 2, 3, 4, 5], []),
        ([3, 4294967295, 5], [(4294967295, 3)]),
        ([1, 10], [(10, 1)]),
        ([5, 4294967295], [(5, 0)]),
    ],
)
def test_round_jump_to_end_of_plan_warns(caplog, rounds, warned) -> None:
    engine = SoftLabelEngine(TaskSettings(), ProgressSettings("rounds", 1000, 4))
    caplog.set_level("WARNING", logger="dslo_edge.dynamic")

    for index, teacher_round in enumerate(rounds):
        engine.prepare(ids(2, f"r{index}-"), sharp(2, 3, 0), teacher_round)

    expected = [
        f"Teacher round {jump} jumps from the highest seen ({highest}) to or past "
        "planned_rounds = 4"
        for jump, highest in warned
    ]
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == len(expected)
    for message, start in zip(messages, expected, strict=True):
        assert message.startswith(start)
    assert engine.progress == 1.0


def test_round_jump_in_updates_unit_is_silent(caplog) -> None:
    engine = SoftLabelEngine(TaskSettings(), ProgressSettings("updates", 1000, 4))
    caplog.set_level("WARNING", logger="dslo_edge.dynamic")

    engine.prepare(ids(2), sharp(2, 3, 0), teacher_round=4294967295)

    assert caplog.records == []


def test_engine_alpha_follows_progress_in_rounds() -> None:
    policy = AlphaPolicy(w_conf=0.0, w_time=1.0, schedule=Schedule("linear"))
    engine = SoftLabelEngine(
        TaskSettings(alpha=policy), ProgressSettings("rounds", planned_rounds=4)
    )
    first = engine.prepare(ids(2), sharp(2, 3, 0), teacher_round=1)
    last = engine.prepare(ids(2), sharp(2, 3, 0), teacher_round=4)
    # t = 1/4 gives 0.2 + 0.6 * 0.75, and t = 1 gives alpha_end.
    np.testing.assert_allclose(first.alpha, 0.65, atol=1e-6)
    np.testing.assert_allclose(last.alpha, 0.2, atol=1e-6)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"unit": "epochs"}, r"progress unit 'epochs'.*'updates' or 'rounds'"),
        ({"planned_updates": 0}, r"planned_updates 0.*>= 1"),
        ({"planned_rounds": 1.5}, r"planned_rounds 1\.5"),
    ],
)
def test_progress_rejects_invalid_fields(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ProgressSettings(**fields)


# Drift boost


def switching_engine(boost: DriftBoost) -> SoftLabelEngine:
    return SoftLabelEngine(TaskSettings(smoothing_lambda=0.5, drift=boost))


def test_teacher_switch_raises_lambda_for_configured_updates() -> None:
    engine = switching_engine(
        DriftBoost(threshold=1.0, smoothing_lambda=4.0, updates=3)
    )
    samples = ids(4)
    lambdas = []
    for teacher_round, top_class in [(1, 0), (2, 0), (3, 2), (3, 2), (3, 2), (3, 2)]:
        p = sharp(4, 3, top_class)
        targets = engine.prepare(samples, p, teacher_round)
        engine.finish_update()
        lambdas.append(targets.smoothing_lambda)
    # Round 2 repeats round 1 (drift 0). Round 3 switches the top class
    # (drift SWITCH_KL_3, about 4 nats), which boosts this update and the next 2.
    assert lambdas == [0.5, 0.5, 4.0, 4.0, 4.0, 0.5]


def test_drift_spike_reported_in_targets_and_snapshot() -> None:
    engine = switching_engine(
        DriftBoost(threshold=1.0, smoothing_lambda=4.0, updates=2)
    )
    engine.prepare(ids(4), sharp(4, 3, 0), 1)
    targets = engine.prepare(ids(4), sharp(4, 3, 1), 2)
    snapshot = engine.snapshot()
    assert targets.batch_drift == pytest.approx(SWITCH_KL_3, rel=1e-5)
    assert snapshot["teacher"]["batch_drift"] == pytest.approx(targets.batch_drift)
    assert snapshot["drift_boost_remaining"] == 2
    assert snapshot["smoothing_lambda"] == 4.0


def test_boosted_smoothing_uses_closed_form() -> None:
    engine = switching_engine(
        DriftBoost(threshold=1.0, smoothing_lambda=4.0, updates=1)
    )
    first = sharp(1, 3, 0)
    engine.prepare(["a"], first, 1)
    second = sharp(1, 3, 2)
    targets = engine.prepare(["a"], second, 2)
    np.testing.assert_allclose(targets.soft, (second + 4.0 * first) / 5.0, atol=1e-6)


def test_drift_boost_off_with_zero_updates() -> None:
    engine = switching_engine(
        DriftBoost(threshold=1.0, smoothing_lambda=4.0, updates=0)
    )
    engine.prepare(ids(4), sharp(4, 3, 0), 1)
    assert engine.prepare(ids(4), sharp(4, 3, 1), 2).smoothing_lambda == 0.5


def test_small_drift_does_not_boost() -> None:
    engine = switching_engine(
        DriftBoost(threshold=1.0, smoothing_lambda=4.0, updates=5)
    )
    engine.prepare(ids(4), np.full((4, 3), 1 / 3), 1)
    targets = engine.prepare(ids(4), sharp(4, 3, 0), 2)
    assert targets.batch_drift is not None
    assert targets.batch_drift < 1.0
    assert targets.smoothing_lambda == 0.5


def drifted_batch(engine: SoftLabelEngine, drifted: int, unseen: int):
    """Prepare a round 2 batch after a round 1 batch of its first ``drifted`` ids.

    The ``drifted`` ids change their top class, so each of those rows drifts
    by SWITCH_KL_3. The ``unseen`` ids are new in round 2 and have no drift.
    """
    engine.prepare(ids(drifted), sharp(drifted, 3, 0), 1)
    engine.finish_update()
    batch_ids = ids(drifted) + ids(unseen, "new")
    p = np.vstack([sharp(drifted, 3, 1), sharp(unseen, 3, 0)])
    return engine.prepare(batch_ids, p, 2)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize(
    ("drifted", "unseen", "boosted"),
    [
        (1, 31, False),
        (7, 25, False),
        (8, 24, True),
        (32, 0, True),
        (4, 0, True),
        (3, 1, False),
    ],
    ids=[
        "1 of 32 rows",
        "7 of 32 rows",
        "8 of 32 rows",
        "32 of 32 rows",
        "all 4 rows",
        "3 of 4 rows",
    ],
)
def test_drift_min_rows_gates_boost(
    compiled: bool, drifted: int, unseen: int, boosted: bool
) -> None:
    # Default boost: threshold 0.5 nats, lambda 3.0, 20 updates, 8 rows.
    engine = SoftLabelEngine(TaskSettings(smoothing_lambda=0.5))
    engine.compiled = compiled

    targets = drifted_batch(engine, drifted, unseen)

    # Every drifted row has the same KL, so the batch drift is that KL,
    # far above the threshold, whether or not the boost starts.
    assert targets.batch_drift == pytest.approx(SWITCH_KL_3, rel=1e-5)
    assert engine.monitor.batch_drift_rows == drifted
    assert engine.snapshot()["teacher"]["batch_drift"] == pytest.approx(
        SWITCH_KL_3, rel=1e-5
    )
    assert targets.smoothing_lambda == (3.0 if boosted else 0.5)
    assert engine.boost_remaining == (20 if boosted else 0)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_drift_min_rows_one_boosts_on_one_row(compiled: bool) -> None:
    engine = SoftLabelEngine(
        TaskSettings(smoothing_lambda=0.5, drift=DriftBoost(min_rows=1))
    )
    engine.compiled = compiled
    targets = drifted_batch(engine, 1, 31)
    assert targets.smoothing_lambda == 3.0
    assert engine.boost_remaining == 20


def test_gated_batch_keeps_running_boost() -> None:
    # A batch too thin to restart the count still gets the boosted lambda.
    engine = switching_engine(
        DriftBoost(threshold=1.0, smoothing_lambda=4.0, updates=3)
    )
    drifted_batch(engine, 8, 0)
    engine.finish_update()
    thin = engine.prepare(["s0"] + ids(7, "other"), sharp(8, 3, 2), 3)
    assert thin.batch_drift == pytest.approx(SWITCH_KL_3, rel=1e-5)
    assert thin.smoothing_lambda == 4.0
    assert engine.boost_remaining == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"threshold": 0.0}, r"drift threshold 0\.0.*> 0"),
        ({"smoothing_lambda": -1.0}, r"drift smoothing lambda -1\.0"),
        ({"updates": -1}, r"drift boost updates -1"),
        ({"min_rows": 0}, r"drift boost min rows 0.*>= 1"),
        ({"min_rows": 2.5}, r"drift boost min rows 2\.5.*integer"),
    ],
)
def test_drift_boost_rejects_invalid_fields(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DriftBoost(**fields)


# Hard labels


def test_argmax_fallback_fills_missing_hard_labels() -> None:
    engine = SoftLabelEngine(TaskSettings(hard_label_fallback="argmax"))
    p = np.vstack([sharp(1, 3, 2), sharp(1, 3, 1)])
    targets = engine.prepare(["a", "b"], p, 1, np.array([0, -1], np.int32))
    assert targets.hard.tolist() == [0, 1]
    assert targets.hard.dtype == np.int32


def test_mask_fallback_keeps_minus_one() -> None:
    engine = SoftLabelEngine(TaskSettings(hard_label_fallback="mask"))
    p = np.vstack([sharp(1, 3, 2), sharp(1, 3, 1)])
    with_labels = engine.prepare(["a", "b"], p, 1, np.array([0, -1], np.int32))
    without = engine.prepare(["c", "d"], p, 1, None)
    assert with_labels.hard.tolist() == [0, -1]
    assert without.hard.tolist() == [-1, -1]


# Checkpoint


def test_engine_checkpoint_round_trip() -> None:
    settings = TaskSettings(
        smoothing_capacity=8, drift=DriftBoost(threshold=1.0, updates=5)
    )
    engine = SoftLabelEngine(settings)
    engine.prepare(ids(4), sharp(4, 3, 0), 1)
    engine.finish_update()
    engine.prepare(ids(4), sharp(4, 3, 1), 2)
    engine.finish_update()
    tensors, state = engine.checkpoint_content("head/")

    restored = SoftLabelEngine(settings)
    restored.restore(tensors, state, "head/")

    assert restored.applied_updates == 2
    assert restored.highest_round == 2
    assert restored.boost_remaining == engine.boost_remaining == 4
    assert restored.store.to_arrays()[0] == engine.store.to_arrays()[0]
    np.testing.assert_array_equal(
        restored.store.to_arrays()[1], engine.store.to_arrays()[1]
    )
    for key in ("mean_entropy", "mean_confidence", "drift", "latest_round"):
        assert restored.monitor.snapshot()[key] == pytest.approx(
            engine.monitor.snapshot()[key]
        )
    # The restored monitor still stores round 2, so a switch in round 3 drifts.
    drift = restored.monitor.observe(ids(4), sharp(4, 3, 2), 3)
    assert drift == pytest.approx(SWITCH_KL_3, rel=1e-5)


def reordered_engine(sample_ids: list[str]) -> SoftLabelEngine:
    """Return an engine whose least recently used order differs from row order.

    Rows are given in the order of ``sample_ids``. The first two ids are then
    written again, second before first.
    """
    engine = SoftLabelEngine(TaskSettings(smoothing_capacity=8))
    engine.prepare(sample_ids, sharp(4, 3, 0), 1)
    engine.finish_update()
    engine.prepare([sample_ids[1], sample_ids[0]], sharp(2, 3, 1), 2)
    engine.finish_update()
    return engine


def test_checkpoint_keeps_least_recently_used_order() -> None:
    engine = reordered_engine(ids(4))
    tensors, state = engine.checkpoint_content("")
    # Rows are saved in row order, and the stamps give the use order.
    assert unpack_ids(tensors["smoothing/ids"], state["smoothing_id_count"]) == ids(4)
    assert "smoothing_ids" not in state

    restored = SoftLabelEngine(TaskSettings(smoothing_capacity=8))
    restored.restore(tensors, state, "")

    assert restored.store.to_arrays()[0] == ["s2", "s3", "s1", "s0"]
    np.testing.assert_array_equal(
        restored.store.to_arrays()[1], engine.store.to_arrays()[1]
    )
    assert restored.monitor.state()[1] == ["s2", "s3", "s1", "s0"]
    np.testing.assert_array_equal(
        restored.monitor.state()[2], engine.monitor.state()[2]
    )


def test_checkpoint_ids_with_nul_stay_json() -> None:
    sample_ids = ["a\x00b", "c", "", "\u00e9"]
    engine = reordered_engine(sample_ids)
    tensors, state = engine.checkpoint_content("")
    assert "smoothing/ids" not in tensors
    # The JSON list is saved oldest first, unlike the packed ids.
    assert state["smoothing_ids"] == ["", "\u00e9", "c", "a\x00b"]

    restored = SoftLabelEngine(TaskSettings(smoothing_capacity=8))
    restored.restore(tensors, state, "")

    assert restored.store.to_arrays()[0] == ["", "\u00e9", "c", "a\x00b"]
    np.testing.assert_array_equal(
        restored.store.to_arrays()[1], engine.store.to_arrays()[1]
    )
    assert restored.monitor.state()[1] == engine.monitor.state()[1]
    np.testing.assert_array_equal(
        restored.monitor.state()[2], engine.monitor.state()[2]
    )


def test_json_ids_restore_in_earlier_versions() -> None:
    engine = reordered_engine(["a\x00b", "c", "", "\u00e9"])
    tensors, state = engine.checkpoint_content("")

    # Earlier versions read the JSON list and the rows as oldest first,
    # and ignore the stamps.
    store = SmoothingStore.from_arrays(
        state["smoothing_ids"], tensors["smoothing/rows"], capacity=8
    )
    monitor = TeacherMonitor.from_state(
        state["monitor_state"],
        state["monitor_ids"],
        tensors["monitor/rows"],
        capacity=8,
    )

    assert store.to_arrays()[0] == ["", "\u00e9", "c", "a\x00b"]
    np.testing.assert_array_equal(store.to_arrays()[1], engine.store.to_arrays()[1])
    assert monitor.state()[1] == ["", "\u00e9", "c", "a\x00b"]
    np.testing.assert_array_equal(monitor.state()[2], engine.monitor.state()[2])


def test_checkpoint_of_an_earlier_version_restores() -> None:
    engine = reordered_engine(ids(4))
    # The earlier layout: ids as JSON lists, oldest first, and no stamps.
    smoothing_ids, rows = engine.store.to_arrays()
    scalars, monitor_ids, table = engine.monitor.state()
    tensors = {"smoothing/rows": rows, "monitor/rows": table}
    state = {
        "applied_updates": 2,
        "highest_round": 2,
        "smoothing_ids": smoothing_ids,
        "monitor_ids": monitor_ids,
        "monitor_state": scalars,
    }

    restored = SoftLabelEngine(TaskSettings(smoothing_capacity=8))
    restored.restore(tensors, state, "")

    assert restored.store.to_arrays()[0] == ["s2", "s3", "s1", "s0"]
    np.testing.assert_array_equal(restored.store.to_arrays()[1], rows)
    assert restored.monitor.state()[1] == ["s2", "s3", "s1", "s0"]
    assert restored.applied_updates == 2


def test_checkpoint_short_stamps_rejected() -> None:
    tensors, state = reordered_engine(ids(4)).checkpoint_content("")
    tensors["smoothing/stamps"] = tensors["smoothing/stamps"][:3]

    with pytest.raises(ValueError, match="4 ids, 4 rows and 3 stamps"):
        SoftLabelEngine(TaskSettings(smoothing_capacity=8)).restore(tensors, state, "")


TASK = "tasks/digit/"
INVALID_TABLES = [
    ("smoothing_id_count", None, r"invalid smoothing_id_count None"),
    ("smoothing_id_count", -2, r"invalid smoothing_id_count -2"),
    ("smoothing_id_count", "4", r"invalid smoothing_id_count '4'"),
    ("smoothing_id_count", 4.0, r"invalid smoothing_id_count 4\.0"),
    ("smoothing_id_count", [4], r"invalid smoothing_id_count \[4\]"),
    ("monitor_id_count", None, r"invalid monitor_id_count None"),
    ("smoothing_ids", 4, r"invalid smoothing_ids 4"),
    ("smoothing_ids", "s0s1", r"invalid smoothing_ids 's0s1'"),
    ("smoothing_ids", [0, 1, 2, 3], r"invalid smoothing_ids \[0, 1, 2, 3\]"),
]


@pytest.mark.parametrize(("key", "value", "message"), INVALID_TABLES)
def test_checkpoint_invalid_id_state_rejected(key, value, message) -> None:
    tensors, state = reordered_engine(ids(4)).checkpoint_content(TASK)
    if key == "smoothing_ids":
        del tensors[TASK + "smoothing/ids"]
    state[key] = value

    with pytest.raises(ValueError, match=message):
        SoftLabelEngine(TaskSettings(smoothing_capacity=8)).restore(
            tensors, state, TASK
        )


def test_checkpoint_missing_id_count_rejected() -> None:
    tensors, state = reordered_engine(ids(4)).checkpoint_content(TASK)
    del state["monitor_id_count"]

    with pytest.raises(ValueError, match="missing monitor_id_count"):
        SoftLabelEngine(TaskSettings(smoothing_capacity=8)).restore(
            tensors, state, TASK
        )


INVALID_TENSORS = [
    ("smoothing/stamps", np.arange(4, dtype=np.int64)[:, None], "stamps"),
    ("smoothing/stamps", np.array(3, dtype=np.int64), "stamps"),
    ("smoothing/stamps", np.array([np.nan, 1, 2, 3]), "stamps"),
    ("monitor/stamps", np.ones(4, dtype=bool), "stamps"),
    ("smoothing/rows", np.array(1.0, dtype=np.float32), "rows"),
    ("monitor/rows", np.zeros(4, dtype=np.float32), "rows"),
    ("smoothing/ids", np.frombuffer(b"\xff\x00a\x00b\x00c", np.uint8), "ids"),
    ("monitor/ids", np.zeros((2, 4), dtype=np.uint8), "ids"),
]


@pytest.mark.parametrize(("name", "value", "part"), INVALID_TENSORS)
def test_checkpoint_invalid_tensor_rejected(name, value, part) -> None:
    tensors, state = reordered_engine(ids(4)).checkpoint_content(TASK)
    tensors[TASK + name] = value

    # The message names the tensor, with the task prefix.
    table = name.split("/")[0]
    with pytest.raises(ValueError, match=f"invalid {TASK}{table}/{part} tensor"):
        SoftLabelEngine(TaskSettings(smoothing_capacity=8)).restore(
            tensors, state, TASK
        )


def test_restore_of_empty_store_clears_rows() -> None:
    tensors, state = SoftLabelEngine(TaskSettings()).checkpoint_content("")
    engine = reordered_engine(ids(4))

    engine.restore(tensors, state, "")

    assert len(engine.store) == 0
    assert engine.monitor.state()[1] == []


def test_packed_ids_round_trip() -> None:
    for sample_ids in (["", "a b", "\u00e9t\u00e9", "\U0001f600"], [""], ["x"], []):
        packed = pack_ids(sample_ids)
        assert packed is not None and packed.dtype == np.uint8
        assert unpack_ids(packed, len(sample_ids)) == sample_ids
    assert pack_ids(["a", "b\x00"]) is None
    assert pack_ids(["\ud800"]) is None
    with pytest.raises(ValueError, match="expected 3 packed ids, found 2"):
        unpack_ids(pack_ids(["a", "b"]), 3)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_ids(np.zeros(3, dtype=np.int32), 1)


def test_monitor_state_of_empty_monitor() -> None:
    scalars, monitor_ids, table = TeacherMonitor(capacity=4).state()
    restored = TeacherMonitor.from_state(scalars, monitor_ids, table, capacity=4)
    assert restored.snapshot() == TeacherMonitor(capacity=4).snapshot()


# LRU row table against a plain OrderedDict model


class ReferenceLru:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: OrderedDict[str, float] = OrderedDict()

    def write(self, keys: list[str], values: list[float]) -> None:
        last = {key: i for i, key in enumerate(keys)}
        kept = sorted(last, key=last.__getitem__)[-self.capacity :]
        for key in kept:
            self.rows.pop(key, None)
        while len(self.rows) + len(kept) > self.capacity:
            self.rows.popitem(last=False)
        for key in kept:
            self.rows[key] = values[last[key]]


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 6),
    batches=st.lists(
        st.lists(st.integers(0, 9), min_size=1, max_size=8), min_size=1, max_size=25
    ),
)
def test_lru_table_matches_reference(capacity: int, batches: list[list[int]]) -> None:
    table = LruRowTable(capacity, "test")
    table.check_classes(1)
    reference = ReferenceLru(capacity)
    for number, batch in enumerate(batches):
        keys = [f"k{key}" for key in batch]
        values = [float(number * 100 + i) for i in range(len(keys))]
        table.write(keys, np.array(values, dtype=np.float32)[:, None])
        reference.write(keys, values)
        stored_ids, rows, _ = table.to_arrays()
        assert stored_ids == list(reference.rows)
        assert rows[:, 0].tolist() == list(reference.rows.values())


def test_lru_table_evicts_in_order_at_scale() -> None:
    table = LruRowTable(1000, "test")
    table.check_classes(2)
    for start in range(0, 5000, 32):
        keys = [f"k{i}" for i in range(start, start + 32)]
        table.write(keys, np.zeros((32, 2), np.float32))
    stored_ids, _, _ = table.to_arrays()
    assert len(stored_ids) == 1000
    assert stored_ids[0] == "k4024"
    assert stored_ids[-1] == "k5023"


def test_restore_over_capacity_checks_row_count() -> None:
    engine = SoftLabelEngine(TaskSettings(smoothing_capacity=2))
    # A checkpoint of an earlier version: ids as a JSON list, no stamps.
    tensors = {"smoothing/rows": np.zeros((4, 10), np.float32)}
    state = {"smoothing_ids": ["a", "b", "c"]}

    with pytest.raises(ValueError) as raised:
        engine.restore(tensors, state, "")

    assert str(raised.value) == (
        "the checkpoint's smoothing table has 3 ids and 4 rows; expected one row per id"
    )
