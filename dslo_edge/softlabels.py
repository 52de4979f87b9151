"""Dynamic soft-label arithmetic: entropy, alpha schedules, smoothing, monitoring.

For teacher probabilities ``p`` over K classes, this module computes

- the normalised entropy ``h = H(p) / log K`` with ``0 log 0 = 0``;
- the per-sample distillation weight
  ``alpha = alpha_end + (alpha_start - alpha_end) * mix`` where
  ``mix = w_conf * (1 - h) + w_time * schedule(t)``;
- the smoothed target ``s(r) = (p(r) + lambda * s(r-1)) / (1 + lambda)``,
  which minimises ``||s - p(r)||^2 + lambda * ||s - s(r-1)||^2``;
- running teacher statistics and the drift ``mean KL(p(r) || p(r-1))``.

All functions are vectorised over the batch, take float arrays of shape
(N, K) and return float32 arrays. Sums are computed in float64 and cast once.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dslo_edge.errors import ConfigError
from dslo_edge.lru_rows import LruRowTable

SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential", "step")

# Added to the second argument of KL inside the log, so that a class the
# previous teacher gave probability 0 yields a large finite term, not inf.
KL_EPSILON = 1e-12

_TINY = np.finfo(np.float64).tiny


def _as_probability_rows(p: np.ndarray, name: str = "p") -> np.ndarray:
    """Return ``p`` as a float64 (N, K) array or raise ValueError on another shape."""
    rows = np.asarray(p, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(
            f"{name} must be a 2-D array of shape (N, K) with K >= 1, "
            f"got shape {rows.shape}"
        )
    return rows


def _entropy_rows(rows: np.ndarray) -> np.ndarray:
    """Return H(p) / log K per row in float64 within [0, 1], with 0 log 0 = 0."""
    entropy = _normalise_entropy(_sum_p_log_p(rows), rows.shape[1])
    return np.clip(entropy, 0.0, 1.0)


def _sum_p_log_p(rows: np.ndarray) -> np.ndarray:
    """Return sum_k p log p per row (minus the entropy), with 0 log 0 = 0."""
    # p = 0 becomes 0 * log(tiny) = 0 exactly, with no masked copies.
    log_p = np.log(np.maximum(rows, _TINY))
    return np.einsum("ij,ij->i", rows, log_p)


def entropy_scale(num_classes: int) -> float:
    """Return the factor from sum p log p to H(p) / log K, which is 0 for K = 1."""
    return 0.0 if num_classes == 1 else -1.0 / math.log(num_classes)


def _normalise_entropy(sum_p_log_p: np.ndarray, num_classes: int) -> np.ndarray:
    if num_classes == 1:
        # A single class carries no uncertainty, and log 1 = 0 would divide by 0.
        return np.zeros(sum_p_log_p.shape[0], dtype=np.float64)
    # Not clipped: rounding can put a uniform row a few ulp above 1, and
    # every consumer (alpha, the monitor means) is bounded or clips itself.
    return sum_p_log_p * entropy_scale(num_classes)


@dataclass(frozen=True)
class BatchStatistics:
    """Per-row quantities of one batch of teacher probabilities, computed once.

    The alpha policy and the teacher monitor both need the entropy, so the
    hot path computes it once and passes this object to both.

    Attributes:
        rows: the probabilities as float64, shape (N, K).
        sum_p_log_p: ``sum_k p log p`` per row (minus the entropy in nats).
        entropy: normalised entropy ``H(p) / log K`` per row, in [0, 1] up
            to float rounding.
    """

    rows: np.ndarray
    sum_p_log_p: np.ndarray
    entropy: np.ndarray

    @classmethod
    def of(cls, p: np.ndarray) -> BatchStatistics:
        """Compute the statistics of probabilities of shape (N, K).

        Raises:
            ValueError: ``p`` is not a 2-D array with at least one column.
        """
        rows = _as_probability_rows(p)
        sum_p_log_p = _sum_p_log_p(rows)
        entropy = _normalise_entropy(sum_p_log_p, rows.shape[1])
        return cls(rows, sum_p_log_p, entropy)


def normalised_entropy(p: np.ndarray) -> np.ndarray:
    """Compute the entropy of each row divided by log K.

    Args:
        p: probabilities of shape (N, K), each row non-negative and summing to 1.

    Returns:
        float32 array of shape (N,) in [0, 1]: 0 for a one-hot row, 1 for a
        uniform row. Terms with p = 0 contribute 0 (0 log 0 = 0).

    Raises:
        ValueError: ``p`` is not a 2-D array with at least one column.
    """
    return _entropy_rows(_as_probability_rows(p)).astype(np.float32)


def _kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Return KL(p || q) per row in float64, with 0 log 0 = 0."""
    return _sum_p_log_p(p) - _cross_term(p, q)


def _cross_term(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Return sum_k p log(q + KL_EPSILON) per row."""
    # q may be a float32 stored row; the log is taken in float64.
    return np.einsum("ij,ij->i", p, np.log(q + np.float64(KL_EPSILON)))


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate_unit_interval(name: str, value: float) -> None:
    if not (_is_real(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"invalid {name} {value!r}: expected a number in [0, 1]")


@dataclass(frozen=True)
class Schedule:
    """Time term of alpha: 1 at the start of training (t = 0), 0 at the end.

    Attributes:
        kind: one of ``SCHEDULE_KINDS``. ``constant`` is always 1 (static KD).
        decay: rate of the ``exponential`` schedule, a positive finite number.
        steps: number of equal steps of the ``step`` schedule, at least 1.
    """

    kind: str
    decay: float = 5.0
    steps: int = 4

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(
                f"invalid schedule.kind {self.kind!r}: expected one of "
                f"{', '.join(SCHEDULE_KINDS)}"
            )
        if not (_is_real(self.decay) and math.isfinite(self.decay) and self.decay > 0):
            raise ConfigError(
                f"invalid schedule.decay {self.decay!r}: expected a finite number > 0"
            )
        steps_ok = isinstance(self.steps, numbers.Integral) and self.steps >= 1
        if isinstance(self.steps, bool) or not steps_ok:
            raise ConfigError(
                f"invalid schedule.steps {self.steps!r}: expected an integer >= 1"
            )

    def value(self, t: float) -> float:
        """Return the time term at progress ``t``, clipped to [0, 1] first.

        Raises:
            ValueError: ``t`` is NaN or infinite.
        """
        if not math.isfinite(t):
            raise ValueError(f"progress t must be a finite number, got {t!r}")
        t = min(max(float(t), 0.0), 1.0)
        if self.kind == "constant":
            return 1.0
        if self.kind == "linear":
            return 1.0 - t
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if self.kind == "exponential":
            return self._exponential(t)
        return 1.0 - math.floor(t * self.steps) / self.steps

    def _exponential(self, t: float) -> float:
        # (exp(-d t) - exp(-d)) / (1 - exp(-d)), written with expm1 so that a
        # small decay keeps its precision. The value is exactly 1 at t = 0
        # (numerator equals denominator) and exactly 0 at t = 1.
        numerator = math.expm1(-self.decay * t) - math.expm1(-self.decay)
        denominator = -math.expm1(-self.decay)
        return min(max(numerator / denominator, 0.0), 1.0)


@dataclass(frozen=True)
class AlphaPolicy:
    """Per-sample weight of the distillation term against the hard-label term.

    ``alpha = alpha_end + (alpha_start - alpha_end) * mix`` with
    ``mix = w_conf * (1 - h) + w_time * schedule(t)``, where ``h`` is the
    teacher's normalised entropy. Because ``mix`` is in [0, 1], alpha stays in
    [min(alpha_start, alpha_end), max(alpha_start, alpha_end)].

    Attributes:
        alpha_start: alpha for a confident teacher at t = 0, in [0, 1].
        alpha_end: alpha for a uniform teacher at t = 1, in [0, 1].
        w_conf: weight of the confidence term ``1 - h``, in [0, 1].
        w_time: weight of the time term; ``w_conf + w_time`` must be 1.
        schedule: time term as a function of progress.
    """

    alpha_start: float = 0.8
    alpha_end: float = 0.2
    w_conf: float = 0.7
    w_time: float = 0.3
    schedule: Schedule = field(default_factory=lambda: Schedule("linear"))

    def __post_init__(self) -> None:
        for name in ("alpha_start", "alpha_end", "w_conf", "w_time"):
            _validate_unit_interval(name, getattr(self, name))
        total = self.w_conf + self.w_time
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"invalid weights w_conf={self.w_conf!r} and w_time={self.w_time!r}: "
                f"they must sum to 1 (within 1e-6), got {total!r}"
            )
        if not isinstance(self.schedule, Schedule):
            raise ConfigError(
                f"invalid schedule {self.schedule!r}: expected a Schedule instance"
            )

    def alpha(self, probabilities: np.ndarray, progress: float) -> np.ndarray:
        """Compute alpha for each sample from teacher confidence and progress.

        Args:
            probabilities: teacher probabilities of shape (N, K).
            progress: training progress t; values outside [0, 1] are clipped.

        Returns:
            float32 array of shape (N,).

        Raises:
            ValueError: ``probabilities`` is not (N, K) or ``progress`` is not finite.
        """
        return self.alpha_from_entropy(
            _entropy_rows(_as_probability_rows(probabilities)), progress
        )

    def alpha_from_entropy(self, entropy: np.ndarray, progress: float) -> np.ndarray:
        """Compute alpha from normalised teacher entropies of shape (N,).

        This is ``alpha`` for callers that already hold the entropy, such as
        the trainer, which computes it once per batch (``BatchStatistics``).

        Raises:
            ValueError: ``progress`` is not finite.
        """
        # The weight is a bounded convex mix, not 1 / (entropy + eps): that
        # form is unbounded, and a one-hot teacher (entropy 0) would get an
        # alpha near 1e5 with eps = 1e-5, which swamps the hard-label term.
        offset, slope, low, high = self.coefficients(progress)
        alpha = offset - slope * np.asarray(entropy, dtype=np.float64)
        # Clipping only absorbs float rounding because mix is already in [0, 1].
        # np.minimum and np.maximum skip np.clip's Python-level dispatch,
        # which costs several microseconds per call on the hot path.
        return np.minimum(np.maximum(alpha, low), high).astype(np.float32)

    def coefficients(self, progress: float) -> tuple[float, float, float, float]:
        """Return ``(offset, slope, low, high)``, with alpha = ``offset - slope * h``.

        This folds alpha_end + span * (w_conf * (1 - h) + w_time * time) into
        one multiply-add on the batch, whose result is clipped to
        ``[low, high]``.

        Raises:
            ValueError: ``progress`` is not finite.
        """
        span, low, high = self._span_and_bounds
        time_term = self.schedule.value(progress)
        offset = self.alpha_end + span * (self.w_conf + self.w_time * time_term)
        return offset, span * self.w_conf, low, high

    @functools.cached_property
    def _span_and_bounds(self) -> tuple[float, float, float]:
        # Computed once: the update path calls coefficients for every batch.
        return (
            self.alpha_start - self.alpha_end,
            min(self.alpha_start, self.alpha_end),
            max(self.alpha_start, self.alpha_end),
        )


def _validate_batch(sample_ids: Sequence[str], p: np.ndarray) -> np.ndarray:
    rows = _as_probability_rows(p)
    if len(sample_ids) != rows.shape[0]:
        raise ValueError(
            f"got {len(sample_ids)} sample ids for {rows.shape[0]} probability rows"
        )
    return rows


class SmoothingStore:
    """Previous smoothed target per sample id, for the smoothing constraint.

    ``smooth`` returns ``s = (p + lam * s_prev) / (1 + lam)`` per row, the
    minimiser of ``||s - p||^2 + lam * ||s - s_prev||^2``. A convex mix of two
    distributions is a distribution, so no renormalisation is needed.

    The store keeps at most ``capacity`` ids. When it is full, the id that was
    least recently passed to ``smooth`` is evicted and its row reused, so that
    sample restarts from its raw teacher label when it is seen again. Memory is
    ``capacity * K * 4`` bytes, allocated on the first call.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._store = LruRowTable(capacity, "smoothing store")

    def __len__(self) -> int:
        return len(self._store)

    @property
    def capacity(self) -> int:
        """Maximum number of sample ids kept."""
        return self._store.capacity

    @property
    def num_classes(self) -> int | None:
        """K fixed by the first call, or None while the store is empty."""
        return self._store.num_classes

    def smooth(self, sample_ids: list[str], p: np.ndarray, lam: float) -> np.ndarray:
        """Smooth teacher probabilities against the stored targets and store them.

        Args:
            sample_ids: one id per row of ``p``.
            p: teacher probabilities of shape (N, K).
            lam: smoothing strength lambda >= 0; 0 returns ``p`` unchanged.

        Returns:
            float32 array of shape (N, K): the new targets, also stored. Rows
            for ids not seen before equal ``p``. A repeated id is smoothed
            against the target stored before this call each time, and its
            last row is stored.

        Raises:
            ValueError: shapes disagree, ``lam`` is negative or not finite, or
                K differs from the first call.
        """
        rows = _validate_batch(sample_ids, p)
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lambda must be a finite number >= 0, got {lam!r}")
        self._store.check_classes(rows.shape[1])

        found, positions = self._store.lookup(sample_ids)
        if lam > 0 and found.all():
            previous = self._store.rows_at(positions)
            result = ((rows + lam * previous) * (1.0 / (1.0 + lam))).astype(np.float32)
        elif lam > 0 and found.any():
            smoothed = rows.copy()
            previous = self._store.rows_at(positions[found])
            smoothed[found] = (rows[found] + lam * previous) * (1.0 / (1.0 + lam))
            result = smoothed.astype(np.float32)
        else:
            result = rows.astype(np.float32)
        self._store.write(sample_ids, result, positions)
        return result

    @property
    def table(self) -> LruRowTable:
        """The row table, for the compiled loops of the dynamic part."""
        return self._store

    def to_arrays(self) -> tuple[list[str], np.ndarray]:
        """Return ids and their stored rows, least recently used first.

        The rows array has shape (len(self), K), or (0, 0) if nothing was stored.
        """
        ids, rows, _ = self._store.to_arrays()
        return ids, rows

    def saved_arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Return ids, rows and use stamps in row order, for a checkpoint.

        ``lru_rows.lru_order(stamps)`` puts them in ``to_arrays`` order.
        """
        return self._store.saved_arrays()

    @classmethod
    def from_arrays(
        cls, ids: Sequence[str], rows: np.ndarray, capacity: int
    ) -> SmoothingStore:
        """Rebuild a store from ``to_arrays`` output, keeping the LRU order.

        Raises:
            ValueError: ids and rows disagree in length, ids repeat, rows is
                not 2-D, or there are more ids than ``capacity``.
        """
        ids = list(ids)
        table = np.asarray(rows, dtype=np.float32)
        if table.ndim != 2 or table.shape[0] != len(ids):
            raise ValueError(
                f"expected rows of shape ({len(ids)}, K) for {len(ids)} ids, "
                f"got {table.shape}"
            )
        if len(set(ids)) != len(ids):
            raise ValueError("checkpoint sample ids must be unique")
        if len(ids) > capacity:
            raise ValueError(
                f"checkpoint contains {len(ids)} ids, more than capacity {capacity}; "
                "raise the smoothing capacity"
            )
        store = cls(capacity)
        if table.shape[1] > 0:
            store._store.check_classes(table.shape[1])
            store._store.write(ids, table)
        return store


class TeacherMonitor:
    """Running statistics of the teacher outputs a device receives.

    Tracks the normalised entropy and top-1 confidence of each batch, as
    exponential moving averages (``ema = decay * ema + (1 - decay) * batch``,
    started at the first batch) and as last-batch values. Drift is the mean
    ``KL(p(r) || p(r'))`` over samples of round r that were last seen in an
    earlier round r', accumulated over all batches of the latest round that
    had such samples. A new teacher version shows as a drift spike, first in
    the batch drift that ``observe`` returns.

    The last raw ``p`` and its round are kept for at most ``capacity`` ids,
    evicting the least recently observed id, like ``SmoothingStore``.
    """

    def __init__(self, capacity: int = 10_000, decay: float = 0.9) -> None:
        if not (_is_real(decay) and 0.0 <= decay < 1.0):
            raise ConfigError(f"invalid monitor decay {decay!r}: expected [0, 1)")
        self.decay = float(decay)
        self._store = LruRowTable(capacity, "teacher monitor")
        self._rounds = np.full(capacity, -1, dtype=np.int64)
        self._mean_entropy: float | None = None
        self._mean_confidence: float | None = None
        self._batch_entropy = 0.0
        self._batch_confidence = 0.0
        self._batch_drift: float | None = None
        self._batch_drift_rows = 0
        self._latest_round: int | None = None
        self._drift_round: int | None = None
        self._drift_sum = 0.0
        self._drift_count = 0
        self._view: tuple[object, ...] | None = None

    @property
    def capacity(self) -> int:
        """Maximum number of sample ids kept for drift."""
        return self._store.capacity

    @property
    def batch_drift_rows(self) -> int:
        """Number of rows of the last batch that had drift, 0 when none had."""
        return self._batch_drift_rows

    def observe(
        self,
        sample_ids: list[str],
        p: np.ndarray,
        teacher_round: int,
        statistics: BatchStatistics | None = None,
    ) -> float | None:
        """Update the statistics with one batch of teacher probabilities (N, K).

        Rows whose id was last stored with a later round (a stale, reordered
        update) count towards entropy and confidence but neither add drift
        nor replace the stored row.

        Args:
            sample_ids: one id per row of ``p``.
            p: teacher probabilities of shape (N, K).
            teacher_round: round number of the teacher that produced ``p``.
            statistics: ``BatchStatistics.of(p)`` when the caller already has
                it, which saves computing the entropy twice.

        Returns:
            The batch drift: mean KL(p || previous p) over the rows whose id was
            last seen in an earlier round, or None when there is no such row.

        Raises:
            ValueError: shapes disagree or K differs from the first call.
        """
        if statistics is None:
            statistics = BatchStatistics.of(p)
        rows = statistics.rows
        if len(sample_ids) != rows.shape[0]:
            raise ValueError(
                f"got {len(sample_ids)} sample ids for {rows.shape[0]} probability rows"
            )
        self._batch_drift = None
        self._batch_drift_rows = 0
        if rows.shape[0] == 0:
            return None
        self._store.check_classes(rows.shape[1])
        self._update_means(statistics)
        if self._latest_round is None or teacher_round > self._latest_round:
            self._latest_round = teacher_round

        found, positions = self._store.lookup(sample_ids)
        stored_rounds = np.where(found, self._rounds[positions], -1)
        earlier = found & (stored_rounds < teacher_round)
        if earlier.all():
            previous = self._store.rows_at(positions)
            kl = statistics.sum_p_log_p - _cross_term(rows, previous)
        elif earlier.any():
            previous = self._store.rows_at(positions[earlier])
            kl = statistics.sum_p_log_p[earlier] - _cross_term(rows[earlier], previous)
        else:
            kl = None
        if kl is not None:
            total = float(kl.sum())
            self._batch_drift = total / kl.shape[0]
            self._batch_drift_rows = kl.shape[0]
            self._add_drift(teacher_round, total, kl.shape[0])

        current = stored_rounds <= teacher_round
        if current.all():
            written = self._store.write(sample_ids, rows, positions)
        elif current.any():
            kept = np.flatnonzero(current)
            kept_ids = [sample_ids[i] for i in kept]
            written = self._store.write(kept_ids, rows[kept], positions[kept])
        else:
            return self._batch_drift
        if written.min(initial=0) < 0:
            written = written[written >= 0]
        self._rounds[written] = teacher_round
        return self._batch_drift

    @property
    def table(self) -> LruRowTable:
        """The row table, for the compiled loops of the dynamic part."""
        return self._store

    def compiled_view(self) -> tuple[object, ...] | None:
        """Return the table's ``compiled_view`` followed by the round array.

        None until the first batch allocates the table.
        """
        if self._view is None:
            view = self._store.compiled_view()
            if view is not None:
                self._view = (*view, self._rounds)
        return self._view

    def has_stale_rows(self, known: np.ndarray, teacher_round: int) -> bool:
        """Check whether a looked-up row has a round later than ``teacher_round``."""
        return bool((self._rounds[known[known >= 0]] > teacher_round).any())

    def record_batch(
        self,
        sums: tuple[float, float, float, int],
        count: int,
        teacher_round: int,
    ) -> float | None:
        """Update the statistics from a batch observed in the compiled loops.

        Args:
            sums: the batch's entropy, top-1 confidence and drift sums, and
                the number of rows with drift.
            count: rows in the batch, at least 1.
            teacher_round: round of the teacher that produced the batch.

        Returns:
            The batch drift, as ``observe`` returns it.
        """
        entropy_sum, confidence_sum, drift_sum, drift_count = sums
        self._batch_drift = None
        self._batch_drift_rows = drift_count
        self._update_means_from(entropy_sum, confidence_sum, count)
        if self._latest_round is None or teacher_round > self._latest_round:
            self._latest_round = teacher_round
        if drift_count:
            self._batch_drift = drift_sum / drift_count
            self._add_drift(teacher_round, drift_sum, drift_count)
        return self._batch_drift

    def _update_means(self, statistics: BatchStatistics) -> None:
        # sum / n: np.mean costs several microseconds of Python per call.
        self._update_means_from(
            float(statistics.entropy.sum()),
            float(statistics.rows.max(axis=1).sum()),
            statistics.rows.shape[0],
        )

    def _update_means_from(
        self, entropy_sum: float, confidence_sum: float, count: int
    ) -> None:
        self._batch_entropy = min(max(entropy_sum / count, 0.0), 1.0)
        self._batch_confidence = confidence_sum / count
        if self._mean_entropy is None or self._mean_confidence is None:
            self._mean_entropy = self._batch_entropy
            self._mean_confidence = self._batch_confidence
            return
        keep = self.decay
        self._mean_entropy = keep * self._mean_entropy + (1 - keep) * (
            self._batch_entropy
        )
        self._mean_confidence = keep * self._mean_confidence + (1 - keep) * (
            self._batch_confidence
        )

    def _add_drift(self, teacher_round: int, total: float, count: int) -> None:
        if self._drift_round is not None and teacher_round < self._drift_round:
            return
        if teacher_round != self._drift_round:
            self._drift_round = teacher_round
            self._drift_sum = 0.0
            self._drift_count = 0
        self._drift_sum += total
        self._drift_count += count

    def snapshot(self) -> dict[str, float]:
        """Return the current statistics; all are 0.0 before the first batch.

        Keys: ``mean_entropy`` and ``mean_confidence`` (moving averages),
        ``batch_entropy`` and ``batch_confidence`` (last batch), ``drift``
        (0.0 until a sample reappears in a later round), ``batch_drift``
        (the last batch's drift, 0.0 when it had no such sample) and
        ``latest_round`` (highest teacher round seen, 0 before the first).
        """
        drift = self._drift_sum / self._drift_count if self._drift_count else 0.0
        return {
            "mean_entropy": self._mean_entropy or 0.0,
            "mean_confidence": self._mean_confidence or 0.0,
            "batch_entropy": self._batch_entropy,
            "batch_confidence": self._batch_confidence,
            "drift": drift,
            "batch_drift": self._batch_drift or 0.0,
            "latest_round": float(self._latest_round or 0),
        }

    def state(self) -> tuple[dict[str, object], list[str], np.ndarray]:
        """Return what a checkpoint needs to rebuild the monitor.

        Returns:
            A JSON-ready dict of scalars, the stored ids (least recently used
            first) and an array of shape (len(ids), K + 1) whose rows are the
            last probabilities of each id followed by its round.
        """
        ids, rows, positions = self._store.to_arrays()
        rounds = self._rounds[positions].astype(np.float32)[:, None]
        table = np.concatenate([rows, rounds], axis=1) if ids else rows
        return self._scalars(), ids, table

    def _scalars(self) -> dict[str, object]:
        return {
            "decay": self.decay,
            "mean_entropy": self._mean_entropy,
            "mean_confidence": self._mean_confidence,
            "latest_round": self._latest_round,
            "drift_round": self._drift_round,
            "drift_sum": self._drift_sum,
            "drift_count": self._drift_count,
        }

    def saved_state(
        self,
    ) -> tuple[dict[str, object], list[str], np.ndarray, np.ndarray]:
        """Return ``state`` in row order, plus the rows' use stamps.

        This is the cheaper form for checkpoints.
        ``lru_rows.lru_order(stamps)`` puts ids and table in ``state`` order.
        """
        ids, rows, stamps = self._store.saved_arrays()
        if ids:
            rounds = self._rounds[: len(ids)].astype(np.float32)[:, None]
            rows = np.concatenate([rows, rounds], axis=1)
        return self._scalars(), ids, rows, stamps

    @classmethod
    def from_state(
        cls,
        scalars: dict[str, object],
        ids: Sequence[str],
        table: np.ndarray,
        capacity: int,
        decay: float | None = None,
    ) -> TeacherMonitor:
        """Rebuild a monitor from ``state`` output.

        ``decay`` overrides the decay stored in ``scalars``, so a changed
        configuration takes effect after a restart.

        Rounds are stored as float32 in the table, so they are exact up to
        2**24; a teacher round beyond that is restored rounded.

        Raises:
            ValueError: the table does not have one row per id, or there are
                more ids than ``capacity``.
        """
        if decay is None:
            decay = float(scalars.get("decay", 0.9))  # type: ignore[arg-type]
        monitor = cls(capacity, decay)
        ids = list(ids)
        table = np.asarray(table, dtype=np.float32)
        if ids and (table.ndim != 2 or table.shape[0] != len(ids)):
            raise ValueError(
                f"expected a monitor table of shape ({len(ids)}, K + 1), "
                f"got {table.shape}"
            )
        if len(ids) > capacity:
            raise ValueError(
                f"checkpoint contains {len(ids)} monitored ids, more than "
                f"capacity {capacity}; raise the smoothing capacity"
            )
        if ids:
            monitor._store.check_classes(table.shape[1] - 1)
            written = monitor._store.write(ids, table[:, :-1])
            monitor._rounds[written] = table[:, -1].astype(np.int64)
        monitor._restore_scalars(scalars)
        return monitor

    def _restore_scalars(self, scalars: dict[str, object]) -> None:
        def optional(name: str, kind: type) -> object:
            value = scalars.get(name)
            return None if value is None else kind(value)

        self._mean_entropy = optional("mean_entropy", float)  # type: ignore[assignment]
        self._mean_confidence = optional("mean_confidence", float)  # type: ignore[assignment]
        self._latest_round = optional("latest_round", int)  # type: ignore[assignment]
        self._drift_round = optional("drift_round", int)  # type: ignore[assignment]
        self._drift_sum = float(scalars.get("drift_sum", 0.0))  # type: ignore[arg-type]
        self._drift_count = int(scalars.get("drift_count", 0))  # type: ignore[call-overload]
