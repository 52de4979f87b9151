"""The per-update dynamic part of DSL-O for one output head.

``SoftLabelEngine.prepare`` turns one batch of teacher probabilities into
training targets. It updates the teacher monitor and raises the smoothing
strength for a while after a drift spike. Then it smooths the targets per
sample id, picks hard labels, and computes the per-sample alpha at the
current progress. Where the install built the compiled loops
(``dynamic_compiled.py``), one call to them does all of this for a batch.
Otherwise, and for the batches they do not take, numpy runs it vectorised
over the batch, with one dictionary lookup per id in each of the two row
tables as the only per-id Python work.

NOTE: with the 64-32-10 digits student at batch 32, the dynamic part takes
about 27 % of the update time with the compiled loops and about 60 % in
numpy, not the intended 10 % at most. On a 2-core x86 machine with a 14 us
train step, ``python -m dslo_edge.bench_dynamic`` measured 7.6 to 7.9 us
compiled and about 38 us in numpy. In a hot loop there, the kernel call took
3.5 us for 32 rows, or 4.5 us with the drift, whose 320 float64 logs take
about 1 us, as many as the entropy's; the 64 id lookups take about 1 us
more. The Python around the call took about 3.5 us.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dslo_edge.dynamic_compiled import prepare_compiled
from dslo_edge.errors import ConfigError
from dslo_edge.lru_rows import lru_order, pack_ids, unpack_ids
from dslo_edge.softlabels import (
    AlphaPolicy,
    BatchStatistics,
    SmoothingStore,
    TeacherMonitor,
)
from dslo_edge.targets import Targets

logger = logging.getLogger(__name__)

PROGRESS_UNITS = ("updates", "rounds")
HARD_LABEL_FALLBACKS = ("argmax", "mask")


def _require(condition: bool, name: str, value: object, expected: str) -> None:
    if not condition:
        raise ConfigError(f"invalid {name} {value!r}: expected {expected}")


def _is_count(value: object, minimum: int) -> bool:
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and int(value) >= minimum
    )


def _is_number(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


@dataclass(frozen=True)
class ProgressSettings:
    """Definition of the training progress t in [0, 1].

    Attributes:
        unit: ``updates`` for t = applied updates / ``planned_updates``, or
            ``rounds`` for t = highest teacher round seen / ``planned_rounds``.
        planned_updates: updates after which t reaches 1, at least 1.
        planned_rounds: teacher rounds after which t reaches 1, at least 1.
    """

    unit: str = "updates"
    planned_updates: int = 1000
    planned_rounds: int = 10

    def __post_init__(self) -> None:
        _require(
            self.unit in PROGRESS_UNITS,
            "progress unit",
            self.unit,
            " or ".join(repr(unit) for unit in PROGRESS_UNITS),
        )
        _require(
            _is_count(self.planned_updates, 1),
            "planned_updates",
            self.planned_updates,
            "an integer >= 1",
        )
        _require(
            _is_count(self.planned_rounds, 1),
            "planned_rounds",
            self.planned_rounds,
            "an integer >= 1",
        )

    def value(self, applied_updates: int, highest_round: int) -> float:
        """Return t for the given counters, clipped to [0, 1]."""
        if self.unit == "rounds":
            return min(1.0, max(0, highest_round) / self.planned_rounds)
        return min(1.0, applied_updates / self.planned_updates)


@dataclass(frozen=True)
class DriftBoost:
    """Stronger smoothing after the teacher changes abruptly.

    When the drift of a batch (mean KL between each sample's new and previous
    teacher probabilities, in nats) exceeds ``threshold``, the smoothing
    lambda becomes at least ``smoothing_lambda`` for that update and the
    next ``updates - 1`` ones. A later batch above the threshold restarts the
    count, so the boost lasts while the drift stays high.

    The drift of a batch counts only over its rows whose id was seen in an
    earlier round. So that one sample whose label changed cannot start the
    boost alone, a batch needs at least ``min(min_rows, batch rows)`` such
    rows: a batch smaller than ``min_rows`` needs every row.

    Attributes:
        threshold: batch drift in nats that counts as a spike, > 0.
        smoothing_lambda: lambda while boosted, >= 0.
        updates: number of boosted updates, 0 to switch the boost off.
        min_rows: rows with drift that a batch needs to start the boost, >= 1.
    """

    threshold: float = 0.5
    smoothing_lambda: float = 3.0
    updates: int = 20
    min_rows: int = 8

    def __post_init__(self) -> None:
        _require(
            _is_number(self.threshold) and self.threshold > 0,
            "drift threshold",
            self.threshold,
            "a finite number > 0 (nats)",
        )
        _require(
            _is_number(self.smoothing_lambda) and self.smoothing_lambda >= 0,
            "drift smoothing lambda",
            self.smoothing_lambda,
            "a finite number >= 0",
        )
        _require(
            _is_count(self.updates, 0),
            "drift boost updates",
            self.updates,
            "an integer >= 0",
        )
        _require(
            _is_count(self.min_rows, 1),
            "drift boost min rows",
            self.min_rows,
            "an integer >= 1",
        )
        # Plain floats, so that numpy mixes rows in the same precision
        # whether a config or a numpy scalar set them.
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "smoothing_lambda", float(self.smoothing_lambda))
        object.__setattr__(self, "updates", int(self.updates))
        object.__setattr__(self, "min_rows", int(self.min_rows))

    def starts(self, batch_drift: float | None, drift_rows: int, rows: int) -> bool:
        """Check whether a batch starts the boost, or restarts its count.

        Args:
            batch_drift: the batch drift, None when no row has drift.
            drift_rows: rows of the batch with drift.
            rows: rows in the batch.
        """
        return (
            self.updates > 0
            and batch_drift is not None
            and drift_rows >= min(self.min_rows, rows)
            and batch_drift > self.threshold
        )


@dataclass(frozen=True)
class TaskSettings:
    """Dynamic soft-label settings for one output head (task).

    Attributes:
        alpha: per-sample alpha policy, including the time schedule.
        temperature: softmax temperature when an update carries none, in
            (0, 100].
        smoothing_lambda: lambda of the smoothing constraint, >= 0; 0 is off.
        smoothing_capacity: sample ids kept by the smoothing store and by the
            monitor, each evicting the least recently used id.
        hard_label_fallback: for samples without a hard label, ``argmax``
            trains on the smoothed target's argmax, ``mask`` drops their
            cross-entropy term.
        monitor_decay: decay of the monitor's moving averages, in [0, 1).
        drift: the smoothing boost after a drift spike.
        weight: weight of this task's loss in a multi-task student, >= 0.
    """

    alpha: AlphaPolicy = field(default_factory=AlphaPolicy)
    temperature: float = 2.0
    smoothing_lambda: float = 0.3
    smoothing_capacity: int = 10_000
    hard_label_fallback: str = "argmax"
    monitor_decay: float = 0.9
    drift: DriftBoost = field(default_factory=DriftBoost)
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(
            _is_number(self.temperature) and 0 < self.temperature <= 100,
            "temperature",
            self.temperature,
            "a number in (0, 100]",
        )
        _require(
            _is_number(self.smoothing_lambda) and self.smoothing_lambda >= 0,
            "smoothing lambda",
            self.smoothing_lambda,
            "a finite number >= 0",
        )
        _require(
            self.hard_label_fallback in HARD_LABEL_FALLBACKS,
            "hard_label_fallback",
            self.hard_label_fallback,
            "'argmax' or 'mask'",
        )
        _require(
            _is_number(self.weight) and self.weight >= 0,
            "task weight",
            self.weight,
            "a finite number >= 0",
        )
        object.__setattr__(self, "smoothing_lambda", float(self.smoothing_lambda))


class SoftLabelEngine:
    """Monitor, smoothing store, drift boost and alpha for one output head."""

    def __init__(
        self, settings: TaskSettings, progress: ProgressSettings | None = None
    ) -> None:
        self.settings = settings
        self.progress_settings = progress or ProgressSettings()
        # With progress in rounds, an update of this round or later ends the
        # schedule. One that gets there by a jump is logged as a warning.
        self._last_round = (
            self.progress_settings.planned_rounds
            if self.progress_settings.unit == "rounds"
            else math.inf
        )
        self.store = SmoothingStore(settings.smoothing_capacity)
        self.monitor = TeacherMonitor(
            settings.smoothing_capacity, settings.monitor_decay
        )
        self.applied_updates = 0
        self.highest_round = 0
        self.boost_remaining = 0
        # False runs every batch through the numpy code, for comparisons.
        self.compiled = True
        # (class count, the compiled loops' arguments that depend only on the
        # settings and that count), set by dynamic_compiled.py.
        self.kernel_arguments: tuple[int, tuple[Any, ...]] | None = None
        self._last: Targets | None = None

    @property
    def progress(self) -> float:
        """Training progress t in [0, 1] for the next update."""
        return self.progress_settings.value(self.applied_updates, self.highest_round)

    def prepare(
        self,
        sample_ids: Sequence[str],
        probabilities: np.ndarray,
        teacher_round: int,
        hard_labels: np.ndarray | None = None,
        temperature: float | None = None,
    ) -> Targets:
        """Compute smoothed targets, hard labels and alpha for one batch.

        Args:
            sample_ids: one id per row, unique within the batch.
            probabilities: teacher probabilities of shape (N, K).
            teacher_round: round of the teacher that labelled the batch.
            hard_labels: int array (N,) with -1 where a sample has none, or
                None when no sample has one.
            temperature: the update's temperature, or None for the default.

        Raises:
            ValueError: shapes disagree or K changed since the first batch.
        """
        started = time.perf_counter()
        if (
            teacher_round >= self._last_round > self.highest_round
            and teacher_round > self.highest_round + 1
        ):
            self._warn_round_jump(teacher_round)
        # The decoder gives a list, which the compiled loops read in place.
        ids = sample_ids if type(sample_ids) is list else list(sample_ids)
        if self.compiled and ids and type(probabilities) is np.ndarray:
            targets = prepare_compiled(
                self, ids, probabilities, teacher_round, hard_labels, temperature
            )
            if targets is not None:
                targets.dynamic_ms = (time.perf_counter() - started) * 1000
                self._last = targets
                return targets
        statistics = BatchStatistics.of(probabilities)
        self.highest_round = max(self.highest_round, int(teacher_round))
        batch_drift = self.monitor.observe(
            ids, statistics.rows, teacher_round, statistics
        )
        lam = self._smoothing_lambda(
            batch_drift, self.monitor.batch_drift_rows, len(ids)
        )
        soft = self.store.smooth(ids, statistics.rows, lam)
        progress = self.progress
        alpha = self.settings.alpha.alpha_from_entropy(statistics.entropy, progress)
        dynamic_ms = (time.perf_counter() - started) * 1000
        targets = Targets(
            soft=soft,
            hard=self._hard_labels(soft, hard_labels),
            alpha=alpha,
            temperature=float(temperature or self.settings.temperature),
            smoothing_lambda=lam,
            progress=progress,
            batch_drift=batch_drift,
            dynamic_ms=dynamic_ms,
        )
        self._last = targets
        return targets

    def _warn_round_jump(self, teacher_round: int) -> None:
        logger.warning(
            "Teacher round %s jumps from the highest seen (%d) to or past "
            "planned_rounds = %d, so alpha's schedule is at its end from now "
            "on; check the hub's round numbers if that is unexpected",
            teacher_round,
            self.highest_round,
            self.progress_settings.planned_rounds,
        )

    def _smoothing_lambda(
        self, batch_drift: float | None, drift_rows: int, rows: int
    ) -> float:
        boost = self.settings.drift
        if boost.starts(batch_drift, drift_rows, rows):
            self.boost_remaining = boost.updates
        if self.boost_remaining > 0:
            return max(self.settings.smoothing_lambda, boost.smoothing_lambda)
        return self.settings.smoothing_lambda

    def _hard_labels(self, soft: np.ndarray, hard: np.ndarray | None) -> np.ndarray:
        if hard is None:
            if self.settings.hard_label_fallback == "argmax":
                return np.argmax(soft, axis=1).astype(np.int32)
            return np.full(soft.shape[0], -1, dtype=np.int32)
        labels = np.array(hard, dtype=np.int32)
        if self.settings.hard_label_fallback == "argmax":
            missing = labels < 0
            if missing.any():
                labels[missing] = np.argmax(soft[missing], axis=1)
        return labels

    def finish_update(self) -> None:
        """Count one applied update: advances progress and the drift boost."""
        self.applied_updates += 1
        if self.boost_remaining > 0:
            self.boost_remaining -= 1

    def snapshot(self) -> dict[str, Any]:
        """Return the engine's state for metrics, JSON-ready.

        Keys: ``progress``, ``applied_updates``, ``highest_round``,
        ``smoothing_lambda`` (of the last batch), ``drift_boost_remaining``,
        ``alpha`` (``mean``, ``min``, ``max`` of the last batch, or None
        before it), ``smoothed_ids`` and ``teacher`` (the monitor snapshot).
        """
        last = self._last
        alpha = None
        if last is not None and last.alpha.size:
            alpha = {
                "mean": float(last.alpha.mean()),
                "min": float(last.alpha.min()),
                "max": float(last.alpha.max()),
            }
        return {
            "progress": self.progress,
            "applied_updates": self.applied_updates,
            "highest_round": self.highest_round,
            "smoothing_lambda": (
                self.settings.smoothing_lambda
                if last is None
                else last.smoothing_lambda
            ),
            "drift_boost_remaining": self.boost_remaining,
            "alpha": alpha,
            "smoothed_ids": len(self.store),
            "teacher": self.monitor.snapshot(),
        }

    def checkpoint_content(
        self, prefix: str
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Return tensors and JSON state to save, tensor names under ``prefix``."""
        tensors: dict[str, np.ndarray] = {}
        scalars, monitor_ids, monitor_rows, monitor_stamps = self.monitor.saved_state()
        state: dict[str, Any] = {
            "applied_updates": self.applied_updates,
            "highest_round": self.highest_round,
            "drift_boost_remaining": self.boost_remaining,
            "monitor_state": scalars,
            "monitor": self.monitor.snapshot(),
        }
        ids, rows, stamps = self.store.saved_arrays()
        _put_rows(tensors, state, prefix, "smoothing", ids, rows, stamps)
        _put_rows(
            tensors, state, prefix, "monitor", monitor_ids, monitor_rows, monitor_stamps
        )
        return tensors, state

    def restore(
        self, tensors: dict[str, np.ndarray], state: dict[str, Any], prefix: str
    ) -> None:
        """Load what ``checkpoint_content`` saved; absent keys keep defaults.

        A table with more ids than ``smoothing_capacity``, as after the
        capacity was lowered, keeps its most recently used ids, as eviction
        would have.

        Raises:
            ValueError: stored ids and tables are malformed or disagree.
        """
        capacity = self.settings.smoothing_capacity
        ids, rows = _newest_rows(
            *_take_rows(tensors, state, prefix, "smoothing"), capacity, "smoothing"
        )
        # A rollback restores into the live engine, so an empty store in the
        # checkpoint must replace the rows written since.
        if ids:
            self.store = SmoothingStore.from_arrays(ids, rows, capacity)
        else:
            self.store = SmoothingStore(capacity)
        monitor_ids, table = _newest_rows(
            *_take_rows(tensors, state, prefix, "monitor"), capacity, "monitor"
        )
        if "monitor_state" in state:
            self.monitor = TeacherMonitor.from_state(
                state["monitor_state"],
                monitor_ids,
                table,
                capacity,
                decay=self.settings.monitor_decay,
            )
        self.applied_updates = int(state.get("applied_updates", 0))
        self.highest_round = int(state.get("highest_round", 0))
        self.boost_remaining = int(state.get("drift_boost_remaining", 0))


def _put_rows(
    tensors: dict[str, np.ndarray],
    state: dict[str, Any],
    prefix: str,
    table: str,
    ids: list[str],
    rows: np.ndarray,
    stamps: np.ndarray,
) -> None:
    """Add one row table of the engine to checkpoint content.

    The rows go under ``<prefix><table>/rows`` and their use stamps under
    ``<table>/stamps``. The ids go under ``<table>/ids`` as NUL-separated
    UTF-8, with their count in the state, and the rows stay in row order.
    When an id contains NUL, the ids go into the state as a JSON list and
    everything is put oldest first, so earlier versions, which read that
    list without stamps, restore the same order. An empty table adds nothing.
    """
    if not ids:
        return
    packed = pack_ids(ids)
    if packed is None:
        order = lru_order(stamps)
        ids = [ids[row] for row in order.tolist()]
        rows = rows[order]
        stamps = stamps[order]
        state[f"{table}_ids"] = ids
    else:
        tensors[f"{prefix}{table}/ids"] = packed
        state[f"{table}_id_count"] = len(ids)
    tensors[f"{prefix}{table}/rows"] = rows
    tensors[f"{prefix}{table}/stamps"] = stamps


def _take_rows(
    tensors: dict[str, np.ndarray], state: dict[str, Any], prefix: str, table: str
) -> tuple[list[str], np.ndarray]:
    """Return the ids and rows that ``_put_rows`` saved, oldest first.

    Checkpoints of earlier versions contain the ids as a JSON list, oldest
    first, and no stamps. They are read as they are.

    Raises:
        ValueError: the ids, rows or stamps are malformed, or disagree in
            length.
    """
    rows = tensors.get(f"{prefix}{table}/rows", np.zeros((0, 0), dtype=np.float32))
    ids = _take_ids(tensors, state, prefix, table)
    stamps = tensors.get(f"{prefix}{table}/stamps")
    if stamps is None:
        return ids, rows
    if stamps.ndim != 1 or not np.issubdtype(stamps.dtype, np.integer):
        raise ValueError(
            f"invalid {prefix}{table}/stamps tensor: expected a 1-D integer "
            f"array, got {stamps.dtype} of shape {stamps.shape}"
        )
    if rows.ndim != 2:
        raise ValueError(
            f"invalid {prefix}{table}/rows tensor: expected a 2-D array, "
            f"got shape {rows.shape}"
        )
    if not len(ids) == len(stamps) == len(rows):
        raise ValueError(
            f"the checkpoint's {table} table has {len(ids)} ids, {len(rows)} rows "
            f"and {len(stamps)} stamps; expected one of each per id"
        )
    order = lru_order(stamps)
    return [ids[row] for row in order.tolist()], rows[order]


def _newest_rows(
    ids: list[str], rows: np.ndarray, capacity: int, table: str
) -> tuple[list[str], np.ndarray]:
    """Return the last ``capacity`` ids and rows of a table ordered oldest first.

    Logs a warning with the count of ids dropped, if any.
    """
    if len(ids) <= capacity:
        return ids, rows
    # Checkpoints without stamps are not checked by _take_rows, and cutting
    # both lists would pair the kept ids with the rows of other ids.
    if len(rows) != len(ids):
        raise ValueError(
            f"the checkpoint's {table} table has {len(ids)} ids and {len(rows)} "
            "rows; expected one row per id"
        )
    logger.warning(
        "The checkpoint's %s table has %d ids, more than the smoothing capacity %d; "
        "keeping the %d most recently used and dropping %d, as eviction would",
        table,
        len(ids),
        capacity,
        capacity,
        len(ids) - capacity,
    )
    return ids[len(ids) - capacity :], rows[len(ids) - capacity :]


def _take_ids(
    tensors: dict[str, np.ndarray], state: dict[str, Any], prefix: str, table: str
) -> list[str]:
    """Return the ids of one row table, from the packed tensor or the JSON list.

    Raises:
        ValueError: the packed ids, their count or the JSON list is invalid.
    """
    packed = tensors.get(f"{prefix}{table}/ids")
    if packed is None:
        ids = state.get(f"{table}_ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(
                f"invalid {table}_ids {ids!r} in the checkpoint state: "
                "expected a list of strings"
            )
        return list(ids)
    key = f"{table}_id_count"
    if key not in state:
        raise ValueError(
            f"missing {key} in the checkpoint state, which the "
            f"{prefix}{table}/ids tensor needs"
        )
    count = state[key]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(
            f"invalid {key} {count!r} in the checkpoint state: expected an integer >= 0"
        )
    try:
        return unpack_ids(packed, count)
    except ValueError as error:
        raise ValueError(f"invalid {prefix}{table}/ids tensor: {error}") from error
