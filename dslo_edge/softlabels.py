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

import math
import numbers
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dslo_edge.errors import ConfigError

SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential", "step")

# Added to the second argument of KL inside the log, so that a class the
# previous teacher gave probability 0 yields a large finite term, not inf.
KL_EPSILON = 1e-12


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
    """Return H(p) / log K per row in float64, with 0 log 0 = 0."""
    num_classes = rows.shape[1]
    if num_classes == 1:
        # A single class carries no uncertainty, and log 1 = 0 would divide by 0.
        return np.zeros(rows.shape[0], dtype=np.float64)
    positive = rows > 0
    log_p = np.log(np.where(positive, rows, 1.0))
    entropy = -np.sum(np.where(positive, rows * log_p, 0.0), axis=1)
    return np.clip(entropy / math.log(num_classes), 0.0, 1.0)


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
    positive = p > 0
    log_ratio = np.log(np.where(positive, p, 1.0)) - np.log(q + KL_EPSILON)
    return np.sum(np.where(positive, p * log_ratio, 0.0), axis=1)


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
        # The weight is a bounded convex mix, not 1 / (entropy + eps): that
        # form is unbounded, and a one-hot teacher (entropy 0) would get an
        # alpha near 1e5 with eps = 1e-5, which swamps the hard-label term.
        confidence = 1.0 - _entropy_rows(_as_probability_rows(probabilities))
        time_term = self.schedule.value(progress)
        mix = self.w_conf * confidence + self.w_time * time_term
        alpha = self.alpha_end + (self.alpha_start - self.alpha_end) * mix
        low = min(self.alpha_start, self.alpha_end)
        high = max(self.alpha_start, self.alpha_end)
        # Clipping only absorbs float rounding because mix is already in [0, 1].
        return np.clip(alpha, low, high).astype(np.float32)


class _RowStore:
    """Fixed-capacity table of float32 rows keyed by id, with LRU eviction.

    Rows live in one preallocated (capacity, K) array; ``_index`` maps each id
    to its row and keeps ids in least-recently-used-first order. K is fixed by
    the first write.
    """

    def __init__(self, capacity: int, owner: str) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(
                f"invalid {owner} capacity {capacity!r}: expected an integer >= 1"
            )
        self.capacity = capacity
        self._owner = owner
        self._index: OrderedDict[str, int] = OrderedDict()
        self._rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._index)

    @property
    def num_classes(self) -> int | None:
        return None if self._rows is None else self._rows.shape[1]

    def check_classes(self, num_classes: int) -> None:
        """Allocate the row array on first use, else raise ValueError on a new K."""
        if self._rows is None:
            self._rows = np.zeros((self.capacity, num_classes), dtype=np.float32)
        elif self._rows.shape[1] != num_classes:
            raise ValueError(
                f"{self._owner} was created for {self._rows.shape[1]} classes, "
                f"got rows of {num_classes}; use one store per task head"
            )

    def lookup(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return a found-mask and the row index of each id (-1 if absent)."""
        positions = np.fromiter(
            (self._index.get(sample_id, -1) for sample_id in ids),
            dtype=np.int64,
            count=len(ids),
        )
        return positions >= 0, positions

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        assert self._rows is not None
        return self._rows[positions]

    def write(self, ids: Sequence[str], values: np.ndarray) -> np.ndarray:
        """Store ``values[i]`` under ``ids[i]`` and return the row index used.

        Each written id becomes the most recently used. When the store is full,
        a new id takes the row of the least-recently-used id. If an id repeats,
        or a later new id evicts an earlier one of the same call, the later
        value is what remains stored.
        """
        assert self._rows is not None
        positions = np.empty(len(ids), dtype=np.int64)
        owner_of_row: dict[int, int] = {}
        for i, sample_id in enumerate(ids):
            row = self._index.get(sample_id)
            if row is not None:
                self._index.move_to_end(sample_id)
            elif len(self._index) < self.capacity:
                row = len(self._index)
                self._index[sample_id] = row
            else:
                _, row = self._index.popitem(last=False)
                self._index[sample_id] = row
            positions[i] = row
            owner_of_row[row] = i
        rows = np.fromiter(owner_of_row.keys(), dtype=np.int64)
        sources = np.fromiter(owner_of_row.values(), dtype=np.int64)
        self._rows[rows] = values[sources]
        return positions

    def to_arrays(self) -> tuple[list[str], np.ndarray]:
        ids = list(self._index)
        if self._rows is None:
            return ids, np.zeros((0, 0), dtype=np.float32)
        positions = np.fromiter(self._index.values(), dtype=np.int64, count=len(ids))
        return ids, self._rows[positions].copy()


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
        self._store = _RowStore(capacity, "smoothing store")

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
        smoothed = rows.copy()
        if lam > 0 and found.any():
            previous = self._store.rows_at(positions[found]).astype(np.float64)
            smoothed[found] = (rows[found] + lam * previous) / (1.0 + lam)
        result = smoothed.astype(np.float32)
        self._store.write(sample_ids, result)
        return result

    def to_arrays(self) -> tuple[list[str], np.ndarray]:
        """Return ids and their stored rows, least recently used first.

        The rows array has shape (len(self), K), or (0, 0) if nothing was stored.
        """
        return self._store.to_arrays()

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
    had such samples. A new teacher version shows as a drift spike.

    The last raw ``p`` and its round are kept for at most ``capacity`` ids,
    evicting the least recently observed id, like ``SmoothingStore``.
    """

    def __init__(self, capacity: int = 10_000, decay: float = 0.9) -> None:
        if not (_is_real(decay) and 0.0 <= decay < 1.0):
            raise ConfigError(f"invalid monitor decay {decay!r}: expected [0, 1)")
        self.decay = float(decay)
        self._store = _RowStore(capacity, "teacher monitor")
        self._rounds = np.full(capacity, -1, dtype=np.int64)
        self._mean_entropy: float | None = None
        self._mean_confidence: float | None = None
        self._batch_entropy = 0.0
        self._batch_confidence = 0.0
        self._drift_round: int | None = None
        self._drift_sum = 0.0
        self._drift_count = 0

    def observe(self, sample_ids: list[str], p: np.ndarray, teacher_round: int) -> None:
        """Update the statistics with one batch of teacher probabilities (N, K).

        Rows whose id was last stored with a later round (a stale, reordered
        update) count towards entropy and confidence but neither add drift
        nor replace the stored row.

        Raises:
            ValueError: shapes disagree or K differs from the first call.
        """
        rows = _validate_batch(sample_ids, p)
        if rows.shape[0] == 0:
            return
        self._store.check_classes(rows.shape[1])
        self._update_means(rows)

        found, positions = self._store.lookup(sample_ids)
        stored_rounds = np.where(found, self._rounds[np.maximum(positions, 0)], -1)
        earlier = found & (stored_rounds < teacher_round)
        if earlier.any():
            previous = self._store.rows_at(positions[earlier]).astype(np.float64)
            self._add_drift(teacher_round, _kl_rows(rows[earlier], previous))

        current = ~found | (stored_rounds <= teacher_round)
        if current.any():
            kept_ids = [sample_ids[i] for i in np.flatnonzero(current)]
            written = self._store.write(kept_ids, rows[current].astype(np.float32))
            self._rounds[written] = teacher_round

    def _update_means(self, rows: np.ndarray) -> None:
        self._batch_entropy = float(np.mean(_entropy_rows(rows)))
        self._batch_confidence = float(np.mean(np.max(rows, axis=1)))
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

    def _add_drift(self, teacher_round: int, kl: np.ndarray) -> None:
        if self._drift_round is not None and teacher_round < self._drift_round:
            return
        if teacher_round != self._drift_round:
            self._drift_round = teacher_round
            self._drift_sum = 0.0
            self._drift_count = 0
        self._drift_sum += float(np.sum(kl))
        self._drift_count += int(kl.shape[0])

    def snapshot(self) -> dict[str, float]:
        """Return the current statistics; all are 0.0 before the first batch.

        Keys: ``mean_entropy`` and ``mean_confidence`` (moving averages),
        ``batch_entropy`` and ``batch_confidence`` (last batch), ``drift``
        (0.0 until a sample reappears in a later round).
        """
        drift = self._drift_sum / self._drift_count if self._drift_count else 0.0
        return {
            "mean_entropy": self._mean_entropy or 0.0,
            "mean_confidence": self._mean_confidence or 0.0,
            "batch_entropy": self._batch_entropy,
            "batch_confidence": self._batch_confidence,
            "drift": drift,
        }
