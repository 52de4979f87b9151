"""The trainer with the dynamic engine, on a real converted student."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from dslo_edge.bench_dynamic import measure_dynamic_share, measure_numpy_floor
from dslo_edge.bundle import load_bundle
from dslo_edge.checkpoint import Checkpoint
from dslo_edge.config import TrainingSettings
from dslo_edge.dynamic import DriftBoost
from dslo_edge.models import StudentModel
from dslo_edge.protocol import SoftLabelUpdate, encode_update, new_message_id
from dslo_edge.trainer import Trainer

pytest.importorskip("keras")


def update(teacher_round: int, top_class: int, count: int = 8) -> SoftLabelUpdate:
    rng = np.random.default_rng(teacher_round)
    labels = np.full((count, 10), 0.01, dtype=np.float32)
    labels[:, top_class] = 0.91
    return SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version=f"round-{teacher_round}",
        teacher_round=teacher_round,
        timestamp=time.time(),
        sample_ids=[f"s{i}" for i in range(count)],
        inputs=rng.random((count, 64), dtype=np.float32),
        labels=labels,
        label_kind="probabilities",
    )


def test_apply_reports_dynamic_figures(mlp_pair) -> None:
    settings = TrainingSettings(
        planned_updates=4, drift=DriftBoost(threshold=1.0, updates=2)
    )
    trainer = Trainer(StudentModel(load_bundle(mlp_pair.bundle)), settings)

    first = trainer.apply(trainer.decode(encode_update(update(1, 0))))
    second = trainer.apply(trainer.decode(encode_update(update(2, 5))))

    assert first.progress == 0.0
    assert second.progress == 0.25
    assert first.batch_drift is None
    assert second.batch_drift is not None and second.batch_drift > 1.0
    assert first.smoothing_lambda == settings.smoothing_lambda
    assert second.smoothing_lambda == settings.drift.smoothing_lambda
    assert 0.2 <= first.min_alpha <= first.mean_alpha <= first.max_alpha <= 0.8
    assert 0.0 < first.dynamic_ms <= first.prepare_ms
    metrics = trainer.dynamic_metrics()
    assert metrics["applied_updates"] == 2
    assert metrics["drift_boost_remaining"] == 1
    assert metrics["teacher"]["latest_round"] == 2.0
    assert metrics["alpha"]["mean"] == pytest.approx(second.mean_alpha)


def test_checkpoint_restores_engine_state(mlp_pair, tmp_path) -> None:
    bundle = load_bundle(mlp_pair.bundle)
    trainer = Trainer(StudentModel(bundle), TrainingSettings())
    for teacher_round in (1, 2):
        trainer.apply(trainer.decode(encode_update(update(teacher_round, 3))))
    tensors, state = trainer.checkpoint_content()

    restored = Trainer(StudentModel(bundle), TrainingSettings())
    restored.restore(Checkpoint(tmp_path / "c", 1, tensors, state))

    assert restored.applied_updates == 2
    assert restored.engine.highest_round == 2
    assert restored.store.to_arrays()[0] == trainer.store.to_arrays()[0]
    assert restored.monitor.snapshot()["drift"] == pytest.approx(
        trainer.monitor.snapshot()["drift"]
    )


def test_bench_reports_dynamic_share(mlp_pair) -> None:
    result = measure_dynamic_share(mlp_pair.bundle, updates=40, warmup=10)
    assert result.updates == 40
    assert result.batch_size == 32
    assert 0 < result.dynamic_us < result.prepare_us
    assert result.update_us >= result.train_us
    assert 0 < result.share < 1


def test_numpy_floor_runs_at_other_sizes() -> None:
    floor_us = measure_numpy_floor(batch_size=8, class_count=3, updates=20, warmup=5)

    assert math.isfinite(floor_us)
    assert floor_us > 0


def test_rollback_resets_progress_and_engine(mlp_pair) -> None:
    trainer = Trainer(StudentModel(load_bundle(mlp_pair.bundle)), TrainingSettings())
    for teacher_round in (1, 2):
        trainer.apply(trainer.decode(encode_update(update(teacher_round, 3))))

    trainer.applied_updates = 0
    assert trainer.progress == 0.0
    assert len(trainer.store) == 8

    trainer.reset_dynamic_state()
    assert trainer.applied_updates == 0
    assert len(trainer.store) == 0
    assert trainer.monitor.snapshot()["latest_round"] == 0.0
