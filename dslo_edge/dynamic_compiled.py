"""``SoftLabelEngine.prepare`` through the compiled loops of the dynamic part.

``prepare_compiled`` gives the same targets and leaves the same store and
monitor state as the numpy code in ``dynamic.py`` and ``softlabels.py``, up
to the summation order of the entropy and drift sums
(``tests/test_dynamic_kernel.py`` compares the two). One call of
``kernel.prepare`` looks the ids up, computes entropy, drift, the smoothed
targets, alpha and hard labels, and writes the two row tables in place.

It takes batches of unique ids, no more than the capacity, with C-contiguous
float32 or float64 probabilities and an integer round >= 0, once the first
batch has allocated the tables. It hands every other batch back to the numpy
code, having changed nothing.

NOTE: the loops follow numpy 2's type rules. Under numpy 1 the numpy code
takes the drift's log of the stored float32 rows in float32, so the two
drifts then differ by float32 rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dslo_edge.dynamic_kernel import kernel
from dslo_edge.softlabels import entropy_scale
from dslo_edge.targets import Targets

if TYPE_CHECKING:
    from dslo_edge.dynamic import SoftLabelEngine

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def prepare_compiled(
    engine: SoftLabelEngine,
    ids: list[str],
    probabilities: np.ndarray,
    teacher_round: int,
    hard_labels: np.ndarray | None,
    temperature: float | None,
) -> Targets | None:
    """Compute the batch's targets, or return None to send it to numpy.

    The kernel looks the ids up itself. For a new or repeated id it returns
    None and changes nothing. Then the new ids get rows here and the kernel
    runs again. ``dynamic_ms`` of the result is 0, for the caller to set.
    """
    monitor_view = engine.monitor.compiled_view()
    store_view = engine.store.table.compiled_view()
    if kernel is None or monitor_view is None or store_view is None:
        return None
    round_number = int(teacher_round)
    # The loops compare rounds as int64 and mark new rows with round -1.
    if round_number != teacher_round or round_number < 0:
        return None
    settings = engine.settings
    count = len(ids)
    classes = probabilities.shape[1] if probabilities.ndim == 2 else 0
    if round_number > engine.highest_round:
        engine.highest_round = round_number
    progress = engine.progress
    soft = np.empty((count, classes), dtype=np.float32)
    alpha = np.empty(count, dtype=np.float32)
    hard = np.empty(count, dtype=np.int32)
    if hard_labels is not None:
        hard_labels = np.ascontiguousarray(hard_labels, dtype=np.int32)
    monitor, store = engine.monitor.table, engine.store.table
    arguments = [
        ids,
        probabilities,
        monitor_view,
        store_view,
        None,
        (monitor.next_stamp, store.next_stamp),
        round_number,
        _fixed_arguments(engine, classes),
        engine.boost_remaining,
        settings.alpha.coefficients(progress),
        hard_labels,
        soft,
        alpha,
        hard,
    ]
    try:
        result = kernel.prepare(*arguments)
    except (TypeError, ValueError, OverflowError):
        # An argument the loops do not take, such as an unaligned array or a
        # count beyond int64. They check their arguments before changing
        # anything, and the numpy code raises the precise error or handles
        # the batch.
        return None
    if result is not None:
        monitor.advance(count)
        store.advance(count)
    else:
        if not _fits(engine, ids, probabilities):
            return None
        reserved = _reserve_rows(engine, ids, round_number)
        if reserved is None:
            return None
        arguments[4], arguments[5] = reserved
        result = kernel.prepare(*arguments)
    batch_drift = engine.monitor.record_batch(result[:4], count, teacher_round)
    if result[5]:
        engine.boost_remaining = settings.drift.updates
    return Targets(
        soft=soft,
        hard=hard,
        alpha=alpha,
        temperature=float(temperature or settings.temperature),
        smoothing_lambda=result[4],
        progress=progress,
        batch_drift=batch_drift,
        dynamic_ms=0.0,
    )


def _fixed_arguments(engine: SoftLabelEngine, classes: int) -> tuple[Any, ...]:
    """Return the kernel's arguments that only the settings and K decide.

    The engine keeps them, so that each batch does not build them again.
    """
    cached = engine.kernel_arguments
    if cached is None or cached[0] != classes:
        settings = engine.settings
        boost = settings.drift
        fixed = (
            entropy_scale(classes),
            settings.smoothing_lambda,
            boost.smoothing_lambda,
            boost.threshold,
            boost.updates,
            boost.min_rows,
            settings.hard_label_fallback == "argmax",
        )
        cached = engine.kernel_arguments = (classes, fixed)
    return cached[1]


def _fits(engine: SoftLabelEngine, ids: list[str], probabilities: np.ndarray) -> bool:
    """Check that the loops take the batch once its new ids have rows."""
    return (
        probabilities.dtype in _DTYPES
        and probabilities.ndim == 2
        and probabilities.flags.c_contiguous
        and 0 < probabilities.shape[0] == len(ids)
        and probabilities.shape[1] > 0
        and len(ids) <= engine.settings.smoothing_capacity
        and len(set(ids)) == len(ids)
    )


def _reserve_rows(
    engine: SoftLabelEngine, ids: list[str], teacher_round: int
) -> tuple[tuple[np.ndarray, ...], tuple[int, int]] | None:
    """Give new ids rows in both tables for the kernel's second call.

    Returns the looked-up and reserved rows of each table and the first
    stamps. Returns None, with nothing changed, when the batch also contains
    a stale row, because only the numpy code keeps the monitor's exact LRU
    order then.
    """
    monitor, store = engine.monitor.table, engine.store.table
    monitor_known, monitor_missing = monitor.lookup_compiled(ids)
    if engine.monitor.has_stale_rows(monitor_known, teacher_round):
        return None
    store_known, store_missing = store.lookup_compiled(ids)
    monitor_rows, monitor_stamp = monitor.reserve(ids, monitor_known, monitor_missing)
    store_rows, store_stamp = store.reserve(ids, store_known, store_missing)
    rows = (monitor_known, monitor_rows, store_known, store_rows)
    return rows, (monitor_stamp, store_stamp)
