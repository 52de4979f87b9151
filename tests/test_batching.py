"""UpdateBatcher on a real queue with a fake clock, and Trainer.apply_many."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import numpy as np
import pytest

from dslo_edge.batching import BatchPolicy, UpdateBatcher, batch_slices
from dslo_edge.protocol import SoftLabelUpdate, new_message_id


@dataclass
class Sized:
    name: str
    sample_count: int


class RecordingQueue(queue.Queue):
    """A queue that records the timeout of every blocking get."""

    def __init__(self, items: list[Sized]) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []
        for item in items:
            self.put(item)

    def get(self, block: bool = True, timeout: float | None = None) -> Sized:
        if block:
            self.timeouts.append(timeout)
        return super().get(block, timeout)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def batcher(batch_size: int = 32, max_wait_s: float = 0.005, max_batches: int = 8):
    policy = BatchPolicy(batch_size, max_wait_s, max_batches)
    return UpdateBatcher(policy, clock=FakeClock())


def names(updates: list[Sized]) -> list[str]:
    return [update.name for update in updates]


def test_full_first_update_returns_without_waiting() -> None:
    source = RecordingQueue([Sized("a", 32)])

    gathered = batcher(max_wait_s=60.0).gather(source, lambda item: item, 1.0)

    assert names(gathered) == ["a"]
    assert source.timeouts == [1.0]


def test_small_updates_fill_one_batch_without_waiting() -> None:
    items = [Sized(f"u{i}", 8) for i in range(4)]
    source = RecordingQueue(items)

    gathered = batcher().gather(source, lambda item: item, 1.0)

    assert names(gathered) == ["u0", "u1", "u2", "u3"]
    assert source.timeouts == [1.0]


def test_waiting_updates_are_all_taken_below_the_limit() -> None:
    items = [Sized(f"u{i}", 8) for i in range(5)]
    source = RecordingQueue(items)

    gathered = batcher().gather(source, lambda item: item, 1.0)

    assert names(gathered) == ["u0", "u1", "u2", "u3", "u4"]
    assert source.empty()


def test_partial_batch_waits_at_most_max_wait() -> None:
    source = RecordingQueue([Sized("a", 8)])

    gathered = batcher(max_wait_s=0.005).gather(source, lambda item: item, 1.0)

    assert names(gathered) == ["a"]
    assert source.timeouts == [1.0, pytest.approx(0.005)]


def test_partial_batch_after_deadline_returns_at_once() -> None:
    clock = FakeClock()
    batcher_ = UpdateBatcher(BatchPolicy(32, 0.005), clock=clock)
    source = RecordingQueue([Sized("a", 8)])

    def accept(item: Sized) -> Sized:
        clock.now += 1.0
        return item

    gathered = batcher_.gather(source, accept, 1.0)

    assert names(gathered) == ["a"]
    assert source.timeouts == [1.0]


def test_update_arriving_during_wait_is_gathered() -> None:
    source = RecordingQueue([Sized("a", 16)])

    def accept(item: Sized) -> Sized:
        if item.name == "a":
            source.put(Sized("b", 16))
        return item

    gathered = batcher().gather(source, accept, 1.0)

    assert names(gathered) == ["a", "b"]


def test_rejected_items_are_left_out() -> None:
    items = [Sized("bad", 32), Sized("a", 16), Sized("b", 16)]
    source = RecordingQueue(items)

    def accept(item: Sized) -> Sized | None:
        return None if item.name == "bad" else item

    gathered = batcher().gather(source, accept, 1.0)

    assert names(gathered) == ["a", "b"]
    assert source.empty()


def test_gather_stops_at_max_batches() -> None:
    items = [Sized(f"u{i}", 32) for i in range(10)]
    source = RecordingQueue(items)

    gathered = batcher(max_batches=2).gather(source, lambda item: item, 1.0)

    assert names(gathered) == ["u0", "u1"]
    assert source.qsize() == 8


def test_gather_stops_at_max_updates() -> None:
    items = [Sized(f"u{i}", 1) for i in range(10)]
    source = RecordingQueue(items)
    policy = BatchPolicy(batch_size=32, max_updates=4)

    gathered = UpdateBatcher(policy, clock=FakeClock()).gather(
        source, lambda item: item, 1.0
    )

    assert names(gathered) == ["u0", "u1", "u2", "u3"]
    assert source.qsize() == 6


def test_uneven_updates_keep_gathering_until_whole_batches() -> None:
    items = [Sized(f"u{i}", 20) for i in range(8)]
    source = RecordingQueue(items)

    gathered = batcher().gather(source, lambda item: item, 1.0)

    # 160 samples are exactly five batches of 32.
    assert names(gathered) == [f"u{i}" for i in range(8)]


def test_empty_queue_raises_after_timeout() -> None:
    source = RecordingQueue([])

    with pytest.raises(queue.Empty):
        batcher().gather(source, lambda item: item, 0.01)


def test_batch_slices_end_with_short_step() -> None:
    assert batch_slices(70, 32) == [slice(0, 32), slice(32, 64), slice(64, 70)]
    assert batch_slices(64, 32) == [slice(0, 32), slice(32, 64)]
    assert batch_slices(5, 32) == [slice(0, 5)]


@pytest.mark.parametrize(
    "arguments",
    [
        (0, 0.005, 8, 64),
        (32, -1.0, 8, 64),
        (32, float("nan"), 8, 64),
        (32, 0.0, 0, 64),
        (32, 0.0, 8, 0),
    ],
)
def test_batch_policy_rejects_invalid_values(arguments: tuple) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(*arguments)


# Trainer.apply_many on a converted student.


def make_update(
    seed: int, count: int, temperature: float | None = None
) -> SoftLabelUpdate:
    rng = np.random.default_rng(seed)
    return SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="batching",
        teacher_round=1,
        timestamp=time.time(),
        sample_ids=[f"s{seed}-{i}" for i in range(count)],
        inputs=rng.random((count, 64), dtype=np.float32),
        labels=rng.dirichlet(np.ones(10), size=count).astype(np.float32),
        label_kind="probabilities",
        temperature=temperature,
    )


def trainer_for(mlp_pair):
    pytest.importorskip("keras")
    from dslo_edge.bundle import load_bundle
    from dslo_edge.config import TrainingSettings
    from dslo_edge.models import StudentModel
    from dslo_edge.trainer import Trainer

    student = StudentModel(load_bundle(mlp_pair.bundle))
    return Trainer(student, TrainingSettings(planned_updates=10))


def record_steps(trainer) -> list[tuple[int, float]]:
    steps: list[tuple[int, float]] = []
    original = trainer.student.train_step

    def train_step(x, soft, hard, alpha, temperature, learning_rate):
        steps.append((len(x), temperature))
        return original(x, soft, hard, alpha, temperature, learning_rate)

    trainer.student.train_step = train_step
    return steps


def test_apply_many_matches_apply_with_update_sized_batches(mlp_pair) -> None:
    updates = [make_update(seed, 8) for seed in range(3)]
    one_by_one = trainer_for(mlp_pair)
    coalesced = trainer_for(mlp_pair)

    expected = [one_by_one.apply(update) for update in updates]
    results = coalesced.apply_many(updates, batch_size=8)

    assert [r.loss for r in results] == pytest.approx([e.loss for e in expected])
    assert [r.mean_alpha for r in results] == [e.mean_alpha for e in expected]
    assert [r.progress for r in results] == [e.progress for e in expected]
    weights = one_by_one.student.get_weights()
    for name, value in coalesced.student.get_weights().items():
        np.testing.assert_allclose(value, weights[name], rtol=1e-6, atol=1e-7)
    assert coalesced.applied_updates == 3


def test_apply_many_trains_full_batches(mlp_pair) -> None:
    trainer = trainer_for(mlp_pair)
    steps = record_steps(trainer)
    updates = [make_update(seed, 20) for seed in range(3)]

    results = trainer.apply_many(updates, batch_size=32)

    assert [size for size, _ in steps] == [32, 28]
    assert [r.samples for r in results] == [20, 20, 20]
    assert all(np.isfinite(r.loss) for r in results)
    assert sum(r.train_ms for r in results) > 0


def test_apply_many_splits_steps_at_temperature_changes(mlp_pair) -> None:
    trainer = trainer_for(mlp_pair)
    steps = record_steps(trainer)
    updates = [
        make_update(0, 16, temperature=2.0),
        make_update(1, 16, temperature=2.0),
        make_update(2, 16, temperature=4.0),
    ]

    trainer.apply_many(updates, batch_size=64)

    assert steps == [(32, 2.0), (16, 4.0)]
