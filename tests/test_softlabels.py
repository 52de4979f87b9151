"""Golden-value and property tests for the dynamic soft-label arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dslo_edge.errors import ConfigError
from dslo_edge.softlabels import (
    AlphaPolicy,
    Schedule,
    SmoothingStore,
    TeacherMonitor,
    normalised_entropy,
)

UNIFORM_4 = np.full((1, 4), 0.25, dtype=np.float32)
ONE_HOT_4 = np.array([[0.0, 1.0, 0.0, 0.0]], dtype=np.float32)


def sharp(num_rows: int, num_classes: int, top_class: int) -> np.ndarray:
    """Return rows with 0.97 on ``top_class`` and the rest spread evenly."""
    rows = np.full((num_rows, num_classes), 0.03 / (num_classes - 1))
    rows[:, top_class] = 0.97
    return rows.astype(np.float32)


# normalised_entropy


def test_entropy_of_uniform_is_one() -> None:
    for num_classes in (2, 3, 10, 100):
        p = np.full((3, num_classes), 1.0 / num_classes, dtype=np.float32)
        h = normalised_entropy(p)
        assert h.dtype == np.float32
        assert h.shape == (3,)
        assert np.all(h == np.float32(1.0))


def test_entropy_of_one_hot_is_zero() -> None:
    h = normalised_entropy(np.eye(5, dtype=np.float32))
    assert np.all(h == 0.0)
    assert not np.any(np.isnan(h))


def test_entropy_matches_hand_formula() -> None:
    p = np.array([[0.5, 0.25, 0.25, 0.0]], dtype=np.float32)
    # H = 0.5 log 2 + 2 * 0.25 log 4 = 1.5 log 2, and log K = log 4 = 2 log 2.
    expected = (0.5 * math.log(2) + 0.5 * math.log(4)) / math.log(4)
    assert expected == pytest.approx(0.75)
    assert normalised_entropy(p)[0] == pytest.approx(expected, abs=1e-7)


def test_entropy_of_single_class_is_zero() -> None:
    assert normalised_entropy(np.ones((2, 1), dtype=np.float32)).tolist() == [0, 0]


def test_entropy_rejects_one_dimensional_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        normalised_entropy(np.array([0.5, 0.5]))


# Schedule

SCHEDULE_GOLDEN = [
    # kind, t=0, t=0.5, t=1 by hand.
    ("constant", 1.0, 1.0, 1.0),
    ("linear", 1.0, 0.5, 0.0),
    ("cosine", 1.0, 0.5 * (1 + math.cos(math.pi / 2)), 0.0),
    (
        "exponential",
        1.0,
        (math.exp(-2.5) - math.exp(-5.0)) / (1 - math.exp(-5.0)),
        0.0,
    ),
    ("step", 1.0, 1 - math.floor(0.5 * 4) / 4, 0.0),
]


@pytest.mark.parametrize(("kind", "at_0", "at_half", "at_1"), SCHEDULE_GOLDEN)
def test_schedule_golden_values(
    kind: str, at_0: float, at_half: float, at_1: float
) -> None:
    schedule = Schedule(kind)
    assert schedule.value(0.0) == at_0
    assert schedule.value(0.5) == pytest.approx(at_half, abs=1e-12)
    assert schedule.value(1.0) == at_1


def test_schedule_golden_hand_numbers() -> None:
    assert Schedule("cosine").value(0.5) == pytest.approx(0.5)
    assert Schedule("exponential").value(0.5) == pytest.approx(0.075858, abs=1e-6)
    assert Schedule("step").value(0.5) == 0.5
    assert Schedule("step").value(0.24) == 1.0
    assert Schedule("step").value(0.25) == 0.75
    assert Schedule("step", steps=2).value(0.99) == 0.5


def test_schedule_clips_progress() -> None:
    for kind in ("linear", "cosine", "exponential", "step"):
        schedule = Schedule(kind)
        assert schedule.value(-3.0) == 1.0
        assert schedule.value(7.0) == 0.0


def test_exponential_schedule_small_decay() -> None:
    # As decay -> 0 the exponential schedule tends to the linear one.
    schedule = Schedule("exponential", decay=1e-9)
    assert schedule.value(0.3) == pytest.approx(0.7, abs=1e-8)


@given(
    kind=st.sampled_from(["linear", "cosine", "exponential", "step"]),
    t1=st.floats(0, 1),
    t2=st.floats(0, 1),
)
def test_schedule_is_non_increasing(kind: str, t1: float, t2: float) -> None:
    schedule = Schedule(kind)
    low, high = sorted((t1, t2))
    assert 0.0 <= schedule.value(high) <= schedule.value(low) <= 1.0


def test_schedule_rejects_nan_progress() -> None:
    with pytest.raises(ValueError, match="finite"):
        Schedule("linear").value(float("nan"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "sigmoid"}, r"schedule\.kind 'sigmoid'.*constant, linear"),
        ({"kind": "linear", "decay": 0.0}, r"schedule\.decay 0\.0.*> 0"),
        ({"kind": "linear", "decay": math.inf}, r"schedule\.decay inf"),
        ({"kind": "step", "steps": 0}, r"schedule\.steps 0.*>= 1"),
        ({"kind": "step", "steps": 2.5}, r"schedule\.steps 2\.5"),
    ],
)
def test_schedule_rejects_invalid_fields(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Schedule(**fields)


# AlphaPolicy


def test_alpha_one_hot_at_start() -> None:
    alpha = AlphaPolicy().alpha(ONE_HOT_4, 0.0)
    assert alpha.dtype == np.float32
    assert alpha[0] == np.float32(0.8)


def test_alpha_uniform_at_end() -> None:
    assert AlphaPolicy().alpha(UNIFORM_4, 1.0)[0] == np.float32(0.2)


def test_alpha_matches_hand_formula() -> None:
    p = np.array([[0.5, 0.25, 0.25, 0.0]], dtype=np.float32)
    # h = 0.75 (see the entropy test), time = 1 - 0.25 for the linear schedule.
    mix = 0.7 * (1 - 0.75) + 0.3 * 0.75
    expected = 0.2 + (0.8 - 0.2) * mix
    assert expected == pytest.approx(0.44)
    assert AlphaPolicy().alpha(p, 0.25)[0] == pytest.approx(expected, abs=1e-6)


def test_alpha_one_hot_teacher_is_bounded() -> None:
    # 1 / (entropy + eps) would give about 1e5 here.
    alpha = AlphaPolicy(w_conf=1.0, w_time=0.0).alpha(ONE_HOT_4, 1.0)
    assert alpha[0] == np.float32(0.8)


def test_alpha_static_kd_is_constant() -> None:
    policy = AlphaPolicy(w_conf=0.0, w_time=1.0, schedule=Schedule("constant"))
    p = np.vstack([UNIFORM_4, ONE_HOT_4])
    for t in (0.0, 0.5, 1.0):
        assert policy.alpha(p, t).tolist() == [np.float32(0.8)] * 2


def test_alpha_rising_range() -> None:
    policy = AlphaPolicy(alpha_start=0.1, alpha_end=0.9)
    assert policy.alpha(ONE_HOT_4, 0.0)[0] == np.float32(0.1)
    assert policy.alpha(UNIFORM_4, 1.0)[0] == np.float32(0.9)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"alpha_start": 1.5}, r"alpha_start 1\.5.*\[0, 1\]"),
        ({"alpha_end": -0.1}, r"alpha_end -0\.1"),
        ({"w_conf": 0.7, "w_time": 0.4}, r"w_conf=0\.7 and w_time=0\.4"),
        ({"w_conf": 1.2, "w_time": -0.2}, r"w_conf 1\.2"),
        ({"schedule": "linear"}, r"expected a Schedule"),
    ],
)
def test_alpha_policy_rejects_invalid_fields(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AlphaPolicy(**fields)


def test_alpha_policy_weight_sum_tolerance() -> None:
    AlphaPolicy(w_conf=0.7 + 5e-7, w_time=0.3)


probability_rows = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
    elements=st.floats(0, 1e6),
).filter(lambda a: bool(np.all(a.sum(axis=1) > 0)))


@settings(max_examples=200)
@given(
    raw=probability_rows,
    t=st.floats(-2, 3),
    alpha_start=st.floats(0, 1),
    alpha_end=st.floats(0, 1),
    w_conf=st.floats(0, 1),
    kind=st.sampled_from(["constant", "linear", "cosine", "exponential", "step"]),
)
def test_alpha_always_within_bounds(
    raw: np.ndarray,
    t: float,
    alpha_start: float,
    alpha_end: float,
    w_conf: float,
    kind: str,
) -> None:
    p = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)
    policy = AlphaPolicy(
        alpha_start=alpha_start,
        alpha_end=alpha_end,
        w_conf=w_conf,
        w_time=1.0 - w_conf,
        schedule=Schedule(kind),
    )
    alpha = policy.alpha(p, t)
    assert alpha.shape == (p.shape[0],)
    assert np.all(np.isfinite(alpha))
    assert np.all(alpha >= np.float32(min(alpha_start, alpha_end)))
    assert np.all(alpha <= np.float32(max(alpha_start, alpha_end)))


# SmoothingStore


def test_smoothing_first_round_returns_p() -> None:
    store = SmoothingStore(capacity=8)
    p = sharp(2, 3, 0)
    s = store.smooth(["a", "b"], p, lam=2.0)
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s, p)
    assert len(store) == 2


def test_smoothing_two_rounds_closed_form() -> None:
    store = SmoothingStore(capacity=8)
    lam = 3.0
    p1 = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32)
    p2 = np.array([[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=np.float32)
    store.smooth(["a", "b"], p1, lam)
    s2 = store.smooth(["a", "b"], p2, lam)
    # s(2) = (p(2) + lam * s(1)) / (1 + lam) with s(1) = p(1).
    expected_a = [(0.1 + 3 * 0.6) / 4, (0.8 + 3 * 0.3) / 4, (0.1 + 3 * 0.1) / 4]
    expected_b = [(0.3 + 3 * 0.2) / 4, (0.3 + 3 * 0.2) / 4, (0.4 + 3 * 0.6) / 4]
    np.testing.assert_allclose(s2[0], expected_a, atol=1e-7)
    np.testing.assert_allclose(s2[1], expected_b, atol=1e-7)
    np.testing.assert_allclose(s2.sum(axis=1), [1.0, 1.0], atol=1e-6)


def test_smoothing_three_rounds_chain() -> None:
    store = SmoothingStore(capacity=4)
    lam = 1.0
    rounds = [sharp(1, 3, k) for k in (0, 1, 2)]
    outputs = [store.smooth(["x"], p, lam) for p in rounds]
    s1 = rounds[0]
    s2 = (rounds[1] + lam * s1) / (1 + lam)
    s3 = (rounds[2] + lam * s2) / (1 + lam)
    np.testing.assert_allclose(outputs[2], s3, atol=1e-7)


def test_smoothing_lambda_zero_stores_p() -> None:
    store = SmoothingStore(capacity=4)
    store.smooth(["a"], sharp(1, 3, 0), lam=0.0)
    p2 = sharp(1, 3, 1)
    np.testing.assert_array_equal(store.smooth(["a"], p2, lam=0.0), p2)
    ids, rows = store.to_arrays()
    assert ids == ["a"]
    np.testing.assert_array_equal(rows, p2)


def test_smoothing_mixes_new_and_known_ids() -> None:
    store = SmoothingStore(capacity=4)
    store.smooth(["a"], sharp(1, 2, 0), lam=1.0)
    s = store.smooth(["new", "a"], sharp(2, 2, 1), lam=1.0)
    np.testing.assert_array_equal(s[0], sharp(1, 2, 1)[0])
    np.testing.assert_allclose(s[1], [0.5, 0.5], atol=1e-7)


def test_smoothing_evicts_least_recently_used() -> None:
    store = SmoothingStore(capacity=3)
    p = sharp(1, 2, 0)
    for sample_id in ("a", "b", "c"):
        store.smooth([sample_id], p, lam=1.0)
    store.smooth(["a"], p, lam=1.0)  # "b" is now the least recently used.
    store.smooth(["d"], p, lam=1.0)
    ids, _ = store.to_arrays()
    assert ids == ["c", "a", "d"]
    assert len(store) == 3


def test_smoothing_evicted_id_restarts_from_p() -> None:
    store = SmoothingStore(capacity=1)
    store.smooth(["a"], sharp(1, 2, 0), lam=1.0)
    store.smooth(["b"], sharp(1, 2, 0), lam=1.0)
    p = sharp(1, 2, 1)
    np.testing.assert_array_equal(store.smooth(["a"], p, lam=1.0), p)


def test_smoothing_batch_over_capacity() -> None:
    store = SmoothingStore(capacity=2)
    p = np.array([[1, 0], [0, 1], [0.5, 0.5]], dtype=np.float32)
    store.smooth(["a", "b", "c"], p, lam=1.0)
    ids, rows = store.to_arrays()
    assert ids == ["b", "c"]
    np.testing.assert_array_equal(rows, p[1:])


def test_smoothing_repeated_id_stores_last_row() -> None:
    store = SmoothingStore(capacity=4)
    p = np.array([[1, 0], [0, 1]], dtype=np.float32)
    store.smooth(["a", "a"], p, lam=1.0)
    _, rows = store.to_arrays()
    np.testing.assert_array_equal(rows, p[1:])


def test_smoothing_rejects_different_class_count() -> None:
    store = SmoothingStore(capacity=4)
    store.smooth(["a"], sharp(1, 3, 0), lam=1.0)
    with pytest.raises(ValueError, match="3 classes, got rows of 4"):
        store.smooth(["b"], sharp(1, 4, 0), lam=1.0)


def test_smoothing_rejects_bad_arguments() -> None:
    store = SmoothingStore(capacity=4)
    with pytest.raises(ValueError, match="2 sample ids for 1"):
        store.smooth(["a", "b"], sharp(1, 3, 0), lam=1.0)
    with pytest.raises(ValueError, match="lambda"):
        store.smooth(["a"], sharp(1, 3, 0), lam=-1.0)
    with pytest.raises(ConfigError, match="capacity 0"):
        SmoothingStore(capacity=0)


def test_smoothing_checkpoint_round_trip() -> None:
    store = SmoothingStore(capacity=3)
    rng = np.random.default_rng(0)
    for sample_id in ("a", "b", "c", "d", "b"):
        row = rng.dirichlet(np.ones(4)).astype(np.float32)[None, :]
        store.smooth([sample_id], row, lam=0.5)
    ids, rows = store.to_arrays()
    assert ids == ["c", "d", "b"]

    restored = SmoothingStore.from_arrays(ids, rows, capacity=3)
    restored_ids, restored_rows = restored.to_arrays()
    assert restored_ids == ids
    np.testing.assert_array_equal(restored_rows, rows)
    assert restored.capacity == 3
    assert restored.num_classes == 4

    # The LRU order survives: the next new id evicts "c" in both stores.
    p = sharp(1, 4, 2)
    store.smooth(["e"], p, lam=0.5)
    restored.smooth(["e"], p, lam=0.5)
    assert restored.to_arrays()[0] == store.to_arrays()[0] == ["d", "b", "e"]
    np.testing.assert_array_equal(restored.to_arrays()[1], store.to_arrays()[1])


def test_smoothing_checkpoint_of_empty_store() -> None:
    ids, rows = SmoothingStore(capacity=2).to_arrays()
    assert ids == []
    assert rows.shape == (0, 0)
    restored = SmoothingStore.from_arrays(ids, rows, capacity=2)
    assert len(restored) == 0
    assert restored.num_classes is None


def test_from_arrays_rejects_bad_input() -> None:
    rows = sharp(2, 3, 0)
    with pytest.raises(ValueError, match="shape"):
        SmoothingStore.from_arrays(["a"], rows, capacity=4)
    with pytest.raises(ValueError, match="unique"):
        SmoothingStore.from_arrays(["a", "a"], rows, capacity=4)
    with pytest.raises(ValueError, match="capacity 1"):
        SmoothingStore.from_arrays(["a", "b"], rows, capacity=1)


# TeacherMonitor


def test_monitor_snapshot_starts_at_zero() -> None:
    snapshot = TeacherMonitor().snapshot()
    assert snapshot["mean_entropy"] == 0.0
    assert snapshot["mean_confidence"] == 0.0
    assert snapshot["drift"] == 0.0


def test_monitor_teacher_switch_drift() -> None:
    monitor = TeacherMonitor(capacity=16)
    ids = [f"s{i}" for i in range(5)]
    monitor.observe(ids, sharp(5, 4, 0), teacher_round=1)
    assert monitor.snapshot()["drift"] == 0.0

    monitor.observe(ids, sharp(5, 4, 1), teacher_round=2)
    # KL = 0.97 log(0.97 / 0.01) + 0.01 log(0.01 / 0.97) + 2 * 0.01 log 1.
    expected = 0.96 * math.log(97)
    drift = monitor.snapshot()["drift"]
    assert drift > 1.0
    assert drift == pytest.approx(expected, rel=1e-5)


def test_monitor_unchanged_teacher_gives_zero_drift() -> None:
    monitor = TeacherMonitor(capacity=16)
    ids = ["a", "b", "c"]
    monitor.observe(ids, sharp(3, 4, 0), teacher_round=1)
    monitor.observe(ids, sharp(3, 4, 0), teacher_round=2)
    assert monitor.snapshot()["drift"] == pytest.approx(0.0, abs=1e-9)


def test_monitor_drift_needs_later_round() -> None:
    monitor = TeacherMonitor(capacity=16)
    monitor.observe(["a"], sharp(1, 3, 0), teacher_round=1)
    monitor.observe(["a"], sharp(1, 3, 1), teacher_round=1)
    monitor.observe(["b"], sharp(1, 3, 2), teacher_round=2)
    assert monitor.snapshot()["drift"] == 0.0


def test_monitor_drift_averages_over_round_batches() -> None:
    monitor = TeacherMonitor(capacity=16)
    monitor.observe(["a", "b"], sharp(2, 4, 0), teacher_round=1)
    monitor.observe(["a"], sharp(1, 4, 1), teacher_round=2)
    monitor.observe(["b"], sharp(1, 4, 0), teacher_round=2)
    expected = (0.96 * math.log(97) + 0.0) / 2
    assert monitor.snapshot()["drift"] == pytest.approx(expected, rel=1e-5)


def test_monitor_ignores_stale_round() -> None:
    monitor = TeacherMonitor(capacity=16)
    monitor.observe(["a"], sharp(1, 4, 0), teacher_round=2)
    monitor.observe(["a"], sharp(1, 4, 1), teacher_round=1)
    assert monitor.snapshot()["drift"] == 0.0
    monitor.observe(["a"], sharp(1, 4, 0), teacher_round=3)
    assert monitor.snapshot()["drift"] == pytest.approx(0.0, abs=1e-9)


def test_monitor_one_hot_drift_finite() -> None:
    monitor = TeacherMonitor(capacity=4)
    monitor.observe(["a"], np.array([[1.0, 0.0]], dtype=np.float32), 1)
    monitor.observe(["a"], np.array([[0.0, 1.0]], dtype=np.float32), 2)
    drift = monitor.snapshot()["drift"]
    assert math.isfinite(drift)
    assert drift == pytest.approx(-math.log(1e-12), rel=1e-6)


def test_monitor_moving_averages() -> None:
    monitor = TeacherMonitor(capacity=16, decay=0.9)
    monitor.observe(["a", "b"], UNIFORM_4.repeat(2, axis=0), teacher_round=1)
    first = monitor.snapshot()
    assert first["mean_entropy"] == pytest.approx(1.0)
    assert first["mean_confidence"] == pytest.approx(0.25)

    monitor.observe(["a", "b"], np.vstack([ONE_HOT_4, UNIFORM_4]), 2)
    second = monitor.snapshot()
    # Batch: entropy (0 + 1) / 2 = 0.5, confidence (1 + 0.25) / 2 = 0.625.
    assert second["batch_entropy"] == pytest.approx(0.5)
    assert second["batch_confidence"] == pytest.approx(0.625)
    assert second["mean_entropy"] == pytest.approx(0.9 * 1.0 + 0.1 * 0.5)
    assert second["mean_confidence"] == pytest.approx(0.9 * 0.25 + 0.1 * 0.625)


def test_monitor_store_is_bounded() -> None:
    monitor = TeacherMonitor(capacity=2)
    monitor.observe(["a", "b", "c"], sharp(3, 3, 0), teacher_round=1)
    # "a" was evicted, so its reappearance adds no drift.
    monitor.observe(["a"], sharp(1, 3, 1), teacher_round=2)
    assert monitor.snapshot()["drift"] == 0.0
    monitor.observe(["c"], sharp(1, 3, 1), teacher_round=2)
    assert monitor.snapshot()["drift"] > 1.0


def test_monitor_rejects_different_class_count() -> None:
    monitor = TeacherMonitor(capacity=4)
    monitor.observe(["a"], sharp(1, 3, 0), teacher_round=1)
    with pytest.raises(ValueError, match="3 classes, got rows of 5"):
        monitor.observe(["a"], sharp(1, 5, 0), teacher_round=2)
