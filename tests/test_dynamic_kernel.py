"""The compiled loops of the dynamic part give the numpy engine's results."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from dslo_edge import dynamic, dynamic_compiled, lru_rows
from dslo_edge.dynamic import DriftBoost, SoftLabelEngine, TaskSettings
from dslo_edge.dynamic_kernel import KERNEL_API_VERSION, KERNEL_VARIABLE, kernel
from dslo_edge.lru_rows import LruRowTable
from dslo_edge.softlabels import AlphaPolicy, Schedule
from dslo_edge.targets import Targets

pytestmark = pytest.mark.skipif(
    kernel is None, reason="the compiled loops were not built (no C compiler)"
)

CLASSES = 6


class CountingKernel:
    """Passes calls to the kernel and counts the batches it prepared."""

    def __init__(self) -> None:
        self.prepared = 0

    def prepare(self, *arguments):
        result = kernel.prepare(*arguments)
        self.prepared += result is not None
        return result

    def lookup(self, *arguments):
        return kernel.lookup(*arguments)


@pytest.fixture()
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingKernel:
    counter = CountingKernel()
    monkeypatch.setattr(dynamic_compiled, "kernel", counter)
    return counter


def _engines(settings: TaskSettings) -> tuple[SoftLabelEngine, SoftLabelEngine]:
    compiled = SoftLabelEngine(settings)
    reference = SoftLabelEngine(settings)
    reference.compiled = False
    return compiled, reference


def _stream(seed: int, batches: int):
    """Batches with new, repeated and evicted ids, late rounds and hard labels."""
    rng = np.random.default_rng(seed)
    pool = [f"id-{i}" for i in range(90)]
    teacher_round = 1
    for index in range(batches):
        count = int(rng.integers(1, 28))
        ids = list(rng.choice(pool, size=count, replace=False))
        if index % 11 == 5:
            ids[-1] = ids[0]  # a repeated id: the numpy code takes the batch
        concentration = 0.2 if index % 2 else 2.0
        p = rng.dirichlet(np.full(CLASSES, concentration), count)
        if index % 3 == 0:
            p = p.astype(np.float32)
        if index % 7 == 3:
            p[0] = np.eye(CLASSES)[int(rng.integers(CLASSES))]  # one-hot row
        hard = None
        if index % 4 == 1:
            hard = rng.integers(-1, CLASSES, size=count)
        if index % 9 == 0:
            teacher_round += 1
        late = index % 13 == 8  # an update from an earlier round, reordered
        yield ids, p, teacher_round - 2 if late else teacher_round, hard


def _assert_same_targets(got: Targets, want: Targets) -> None:
    # Smoothing and labels do the same float operations, so the bits match.
    np.testing.assert_array_equal(got.soft, want.soft)
    np.testing.assert_array_equal(got.hard, want.hard)
    # Entropy sums run in another order, so alpha may differ by a float32 step.
    np.testing.assert_allclose(got.alpha, want.alpha, rtol=0, atol=1.2e-7)
    assert got.smoothing_lambda == want.smoothing_lambda


def _assert_same_state(compiled: SoftLabelEngine, reference: SoftLabelEngine) -> None:
    ids, rows = compiled.store.to_arrays()
    reference_ids, reference_rows = reference.store.to_arrays()
    assert ids == reference_ids
    np.testing.assert_array_equal(rows, reference_rows)
    scalars, monitor_ids, table = compiled.monitor.state()
    reference_scalars, reference_monitor_ids, reference_table = (
        reference.monitor.state()
    )
    assert monitor_ids == reference_monitor_ids
    np.testing.assert_array_equal(table, reference_table)
    for name, value in reference_scalars.items():
        assert scalars[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    assert compiled.boost_remaining == reference.boost_remaining
    assert compiled.highest_round == reference.highest_round


SETTINGS = {
    "defaults, capacity 40": TaskSettings(smoothing_capacity=40),
    "mask, no smoothing, cosine": TaskSettings(
        smoothing_capacity=40,
        smoothing_lambda=0.0,
        hard_label_fallback="mask",
        alpha=AlphaPolicy(0.9, 0.1, 0.5, 0.5, Schedule("cosine")),
    ),
    "boost on small drift, large capacity": TaskSettings(
        smoothing_capacity=1000,
        drift=DriftBoost(threshold=0.05, smoothing_lambda=2.0, updates=3, min_rows=1),
    ),
    # In this stream 44 batches drift above the threshold in fewer rows than
    # min(6, batch rows), so the boost differs from min_rows = 1.
    "boost needs 6 drifted rows": TaskSettings(
        smoothing_capacity=1000,
        drift=DriftBoost(threshold=0.05, smoothing_lambda=2.0, updates=3, min_rows=6),
    ),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_compiled_matches_numpy_engine(name: str, counting: CountingKernel) -> None:
    compiled, reference = _engines(SETTINGS[name])
    for ids, p, teacher_round, hard in _stream(seed=7, batches=160):
        got = compiled.prepare(ids, p, teacher_round, hard)
        want = reference.prepare(ids, p, teacher_round, hard)
        _assert_same_targets(got, want)
        assert got.progress == want.progress
        if want.batch_drift is None:
            assert got.batch_drift is None
        else:
            # A calm teacher drifts by float32 rounding only, ~1e-15 absolute.
            assert got.batch_drift == pytest.approx(
                want.batch_drift, rel=1e-12, abs=1e-12
            )
        compiled.finish_update()
        reference.finish_update()
    _assert_same_state(compiled, reference)
    # Most batches took the compiled loops. The rest (the first, repeated
    # ids, stale rows beside new ids) took numpy.
    assert counting.prepared > 120


def test_compiled_smoothing_closed_form(counting: CountingKernel) -> None:
    engine = SoftLabelEngine(TaskSettings(smoothing_lambda=0.5))
    first = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    second = np.array([[0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=np.float32)
    engine.prepare(["a", "b"], first, 1)
    targets = engine.prepare(["a", "b"], second, 1)
    # s = (p + 0.5 * s_prev) / 1.5 with s_prev = p of the first batch
    expected = (second.astype(np.float64) + 0.5 * first) / 1.5
    np.testing.assert_allclose(targets.soft, expected, rtol=1e-6)
    assert counting.prepared == 1


def test_compiled_boost_after_teacher_switch(
    counting: CountingKernel,
) -> None:
    settings = TaskSettings(
        smoothing_lambda=0.1, drift=DriftBoost(threshold=0.5, smoothing_lambda=4.0)
    )
    engine = SoftLabelEngine(settings)
    ids = [f"s{i}" for i in range(16)]
    old = np.tile(np.array([0.9, 0.05, 0.05]), (16, 1))
    new = np.tile(np.array([0.05, 0.05, 0.9]), (16, 1))
    engine.prepare(ids, old, 1)
    calm = engine.prepare(ids, old, 2)
    switched = engine.prepare(ids, new, 3)
    # The stored rows are float32, so an unchanged teacher drifts by ~1e-8.
    assert calm.batch_drift == pytest.approx(0.0, abs=1e-6)
    assert calm.smoothing_lambda == 0.1
    # In each row the 0.9 and one 0.05 swap places, which gives this KL.
    expected = 0.9 * np.log(0.9 / 0.05) + 0.05 * np.log(0.05 / 0.9)
    assert switched.batch_drift == pytest.approx(expected, rel=1e-6)
    assert switched.smoothing_lambda == 4.0
    assert engine.boost_remaining == settings.drift.updates
    assert counting.prepared == 2


def test_compiled_min_rows_matches_numpy(counting: CountingKernel) -> None:
    # Each round changes every top class, so each row seen in the round
    # before drifts by about 2.4 nats, above the 0.5 threshold.
    compiled, reference = _engines(
        TaskSettings(smoothing_lambda=0.1, drift=DriftBoost(updates=1, min_rows=4))
    )
    old = ["a", "b", "c", "d", "e", "f"]
    batches = [
        (old, 0, 1),
        (["a", "n1", "n2", "n3", "n4", "n5"], 1, 2),  # 1 of 6 rows drifts
        (["b", "c", "d", "n6", "n7", "n8"], 1, 2),  # 3 of 6
        (["a", "b", "c", "d", "n9", "n10"], 2, 3),  # 4 of 6
        (["e", "f"], 2, 3),  # all 2 rows, below min_rows
        (["a", "m1"], 0, 4),  # 1 of 2
    ]
    lambdas = []
    for batch_ids, top_class, teacher_round in batches:
        p = np.full((len(batch_ids), 3), 0.05)
        p[:, top_class] = 0.9
        got = compiled.prepare(batch_ids, p, teacher_round)
        want = reference.prepare(batch_ids, p, teacher_round)
        _assert_same_targets(got, want)
        assert compiled.monitor.batch_drift_rows == reference.monitor.batch_drift_rows
        lambdas.append(got.smoothing_lambda)
        compiled.finish_update()
        reference.finish_update()
    assert lambdas == [0.1, 0.1, 0.1, 3.0, 3.0, 0.1]
    _assert_same_state(compiled, reference)
    # Only the first batch, which allocates the tables, took numpy.
    assert counting.prepared == len(batches) - 1


def test_untaken_batch_gets_numpy_result(
    counting: CountingKernel,
) -> None:
    compiled, reference = _engines(TaskSettings())
    ids = ["a", "b", "c"]
    warm = np.full((3, 4), 0.25)
    compiled.prepare(ids, warm, 1)
    reference.prepare(ids, warm, 1)
    # The numpy code converts float16 rows and Fortran-order rows.
    half = np.array([[0.5, 0.25, 0.125, 0.125]] * 3, dtype=np.float16)
    strided = np.asfortranarray(np.array([[0.1, 0.2, 0.3, 0.4]] * 3))
    for p in (half, strided):
        got = compiled.prepare(ids, p, 2)
        want = reference.prepare(ids, p, 2)
        np.testing.assert_array_equal(got.soft, want.soft)
        np.testing.assert_array_equal(got.alpha, want.alpha)
    assert counting.prepared == 0


def test_kernel_error_names_argument() -> None:
    engine = SoftLabelEngine(TaskSettings())
    engine.prepare(["a"], np.array([[0.5, 0.5]]), 1)
    arguments = _kernel_arguments(engine, ["a"])
    index, rows, last_used = arguments[3]
    arguments[3] = (index, rows.astype(np.float64), last_used)
    with pytest.raises(TypeError, match="rows must have 2 dimension"):
        kernel.prepare(*arguments)


def test_compiled_lookup_matches_numpy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = LruRowTable(8, "test table")
    table.check_classes(2)
    table.write(["a", "b", "c"], np.ones((3, 2), dtype=np.float32))
    query = ["c", "x", "a", "b", "y"]
    found, positions = table.lookup(query)
    monkeypatch.setattr(lru_rows, "kernel", None)
    numpy_found, numpy_positions = table.lookup(query)
    np.testing.assert_array_equal(found, numpy_found)
    np.testing.assert_array_equal(positions, numpy_positions)
    assert positions.tolist() == [2, -1, 0, 1, -1]


def test_environment_selects_numpy_code() -> None:
    environment = {**os.environ, KERNEL_VARIABLE: "numpy"}
    output = subprocess.run(
        [
            sys.executable,
            "-c",
            "from dslo_edge import dynamic_kernel as k; print(k.kernel_name())",
        ],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert output.strip() == "numpy"


def test_kernel_api_version_matches_source() -> None:
    assert kernel.API_VERSION == KERNEL_API_VERSION


def test_stale_kernel_build_not_used() -> None:
    # A module without API_VERSION is what a build from the source before it
    # gives, and that build takes prepare's arguments in another order.
    script = (
        "import sys, types\n"
        "stale = types.ModuleType('dslo_edge._dynamic_kernel')\n"
        "sys.modules['dslo_edge._dynamic_kernel'] = stale\n"
        "from dslo_edge import dynamic_kernel as k\n"
        "print(k.kernel_name())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={k: v for k, v in os.environ.items() if k != KERNEL_VARIABLE},
        capture_output=True,
        text=True,
        check=True,
    )

    assert result.stdout.strip() == "numpy"
    assert "built from another version of _dynamic_kernel.c" in result.stderr
    assert "(API_VERSION None, expected 2)" in result.stderr


def test_rounds_progress_matches_numpy(
    counting: CountingKernel,
) -> None:
    progress = dynamic.ProgressSettings(unit="rounds", planned_rounds=4)
    settings = replace(TaskSettings(), smoothing_capacity=64)
    compiled = SoftLabelEngine(settings, progress)
    reference = SoftLabelEngine(settings, progress)
    reference.compiled = False
    for ids, p, teacher_round, hard in _stream(seed=3, batches=40):
        got = compiled.prepare(ids, p, teacher_round, hard)
        want = reference.prepare(ids, p, teacher_round, hard)
        assert got.progress == want.progress
        np.testing.assert_allclose(got.alpha, want.alpha, rtol=0, atol=1.2e-7)
    _assert_same_state(compiled, reference)
    assert counting.prepared > 20


def _kernel_arguments(engine: SoftLabelEngine, ids: list[str]) -> list:
    """Arguments of ``kernel.prepare`` for a 2-class batch of ``ids``."""
    count = len(ids)
    return [
        ids,
        np.full((count, 2), 0.5),
        engine.monitor.compiled_view(),
        engine.store.table.compiled_view(),
        None,
        (1, 1),
        1,
        (-1.0, 0.3, 3.0, 0.5, 20, 8, True),
        0,
        (0.7, 0.4, 0.2, 0.8),
        None,
        np.empty((count, 2), np.float32),
        np.empty(count, np.float32),
        np.empty(count, np.int32),
    ]


def test_kernel_rejects_rows_outside_table() -> None:
    engine = SoftLabelEngine(TaskSettings(smoothing_capacity=2))
    engine.prepare(["a", "b"], np.full((2, 2), 0.5), 1)
    index = engine.store.table.compiled_view()[0]
    for bad_row in (2, -1, 10_000_000):
        index["a"] = bad_row
        with pytest.raises(ValueError, match="outside"):
            kernel.prepare(*_kernel_arguments(engine, ["a", "b"]))


def test_kernel_rejects_list_for_table() -> None:
    engine = SoftLabelEngine(TaskSettings())
    engine.prepare(["a"], np.full((1, 2), 0.5), 1)
    arguments = _kernel_arguments(engine, ["a"])
    arguments[3] = list(arguments[3])
    with pytest.raises(TypeError, match="store must be a tuple"):
        kernel.prepare(*arguments)


def test_kernel_survives_list_clearing_id() -> None:
    # An id whose __hash__ empties the list of ids while the kernel looks
    # them up. Run in a child process, so that a crash fails only this test.
    script = """
import numpy as np
from dslo_edge.dynamic import SoftLabelEngine, TaskSettings
from dslo_edge.dynamic_kernel import kernel
names = [f"id{n}" for n in range(200)]
engine = SoftLabelEngine(TaskSettings(smoothing_capacity=200))
engine.prepare(names, np.full((200, 2), 0.5), 1)

class ClearingId(str):
    armed = True
    def __hash__(self):
        if ClearingId.armed:
            ClearingId.armed = False
            ids.clear()
            for _ in range(1000):
                [object() for _ in range(64)]
        return str.__hash__(self)

ids = [ClearingId("id0")] + ["".join(["id", str(n)]) for n in range(1, 200)]
monitor = engine.monitor.compiled_view()
store = engine.store.table.compiled_view()
kernel.lookup(store[0], ids, np.empty(200, np.int64))
ClearingId.armed = True
ids = [ClearingId("id0")] + ["".join(["id", str(n)]) for n in range(1, 200)]
kernel.prepare(ids, np.full((200, 2), 0.5), monitor, store, None, (1, 1), 2,
               (-1.0, 0.3, 3.0, 0.5, 20, 8, True), 0, (0.7, 0.4, 0.2, 0.8), None,
               np.empty((200, 2), np.float32), np.empty(200, np.float32),
               np.empty(200, np.int32))
print("done")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"


def _unaligned(rows: list[list[float]]) -> np.ndarray:
    count, classes = len(rows), len(rows[0])
    buffer = bytearray(count * classes * 8 + 1)
    array = np.frombuffer(buffer, np.float64, count * classes, 1)
    array = array.reshape(count, classes)
    array[:] = rows
    return array


@pytest.mark.parametrize(
    "case",
    ["unaligned rows", "numpy lambda", "float round", "negative round"],
)
def test_unusual_inputs_get_numpy_results(case: str) -> None:
    settings = TaskSettings()
    if case == "numpy lambda":
        settings = TaskSettings(
            smoothing_lambda=np.float64(0.3),
            drift=DriftBoost(smoothing_lambda=np.float32(3.0)),
        )
    compiled, reference = _engines(settings)
    ids = ["a", "b"]
    rows = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    later = [[0.1, 0.1, 0.8], [0.7, 0.2, 0.1]]
    for teacher_round, values in ((2, rows), (3, later), (4, rows)):
        p = np.array(values)
        if case == "unaligned rows":
            p = _unaligned(values)
        if case == "float round":
            teacher_round = teacher_round + 0.5
        if case == "negative round":
            teacher_round = -teacher_round
            ids = [f"{name}{teacher_round}" for name in ("a", "b")]
        got = compiled.prepare(ids, p, teacher_round)
        want = reference.prepare(ids, p, teacher_round)
        np.testing.assert_array_equal(got.soft, want.soft)
        np.testing.assert_array_equal(got.hard, want.hard)
        assert got.smoothing_lambda == want.smoothing_lambda
    _assert_same_state(compiled, reference)


def test_huge_boost_count_gets_numpy_result() -> None:
    compiled, reference = _engines(TaskSettings())
    ids = ["a", "b"]
    p = np.array([[0.6, 0.4], [0.3, 0.7]])
    for engine in (compiled, reference):
        engine.prepare(ids, p, 1)
        engine.boost_remaining = 2**63
    got = compiled.prepare(ids, p, 2)
    want = reference.prepare(ids, p, 2)
    np.testing.assert_array_equal(got.soft, want.soft)
    assert got.smoothing_lambda == want.smoothing_lambda


def test_restored_engine_matches_numpy(counting: CountingKernel) -> None:
    # A restore replaces the store and the monitor, so the kernel must use
    # the new tables, not keep writing the old ones.
    compiled, reference = _engines(TaskSettings(smoothing_capacity=50))
    stream = list(_stream(seed=11, batches=60))
    for ids, p, teacher_round, hard in stream[:30]:
        compiled.prepare(ids, p, teacher_round, hard)
        reference.prepare(ids, p, teacher_round, hard)
    for engine in (compiled, reference):
        tensors, state = engine.checkpoint_content("head/")
        engine.restore(tensors, state, "head/")
    prepared_before = counting.prepared
    for ids, p, teacher_round, hard in stream[30:]:
        got = compiled.prepare(ids, p, teacher_round, hard)
        want = reference.prepare(ids, p, teacher_round, hard)
        np.testing.assert_array_equal(got.soft, want.soft)
        np.testing.assert_array_equal(got.hard, want.hard)
    _assert_same_state(compiled, reference)
    assert counting.prepared > prepared_before + 15


@st.composite
def _small_streams(draw):
    """Settings and a short stream over a few ids, for tiny capacities."""
    classes = draw(st.integers(1, 5))
    pool = [f"id{i}" for i in range(draw(st.integers(1, 10)))]
    task = TaskSettings(
        smoothing_capacity=draw(st.integers(1, 6)),
        smoothing_lambda=draw(st.sampled_from([0.0, 0.3, 2.0])),
        hard_label_fallback=draw(st.sampled_from(["argmax", "mask"])),
        drift=DriftBoost(
            threshold=draw(st.sampled_from([1e-3, 0.5])),
            smoothing_lambda=draw(st.sampled_from([0.0, 3.0])),
            updates=draw(st.integers(0, 3)),
            min_rows=draw(st.integers(1, 9)),
        ),
    )
    batches = []
    teacher_round = 0
    for _ in range(draw(st.integers(1, 10))):
        ids = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=8))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        p = rng.dirichlet(np.full(classes, 0.3), len(ids))
        if draw(st.booleans()):
            p = np.eye(classes)[rng.integers(classes, size=len(ids))]
        p = p.astype(draw(st.sampled_from(["f8", "f4", "f2"])))
        teacher_round = max(0, teacher_round + draw(st.sampled_from([0, 1, -1, 2])))
        hard = None
        if draw(st.booleans()):
            hard = rng.integers(-1, classes, size=len(ids))
        batches.append((ids, p, teacher_round, hard))
    return task, batches


@hypothesis_settings(max_examples=150, deadline=None)
@given(_small_streams())
def test_random_streams_match_numpy(stream) -> None:
    task, batches = stream
    compiled, reference = _engines(task)
    for ids, p, teacher_round, hard in batches:
        got = compiled.prepare(ids, p, teacher_round, hard)
        want = reference.prepare(ids, p, teacher_round, hard)
        _assert_same_targets(got, want)
        compiled.finish_update()
        reference.finish_update()
    _assert_same_state(compiled, reference)
