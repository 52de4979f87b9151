"""A fixed-capacity table of float32 rows keyed by sample id, with LRU eviction.

The smoothing store and the teacher monitor keep one row per sample id. Both
sit on the per-update hot path, so the table avoids per-id Python work where
it can. The least-recently-used order is a stamp per row (a counter that
grows with every write) instead of a linked list, and a lookup is one
``dict.get`` per id. Eviction takes rows from a queue sorted by stamp that
is rebuilt only when it runs out. Queue entries whose row was written after the
sort are stale and skipped, so eviction is exact LRU at an amortised cost of
O(log capacity) per evicted id.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from dslo_edge.dynamic_kernel import kernel
from dslo_edge.errors import ConfigError


class LruRowTable:
    """Rows of shape (K,) keyed by id, in one preallocated (capacity, K) array.

    K is fixed by the first call to ``check_classes``. Each written id becomes
    the most recently used. When the table is full, a new id takes the row of
    the least recently used id that the same write does not touch.
    """

    def __init__(self, capacity: int, owner: str) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(
                f"invalid {owner} capacity {capacity!r}: expected an integer >= 1"
            )
        self.capacity = capacity
        self._owner = owner
        self._index: dict[str, int] = {}
        self._row_ids: list[str] = []
        self._rows: np.ndarray | None = None
        self._last_used = np.zeros(capacity, dtype=np.int64)
        self._clock = 0
        self._queue = np.zeros(0, dtype=np.int64)
        self._queue_stamps = np.zeros(0, dtype=np.int64)
        self._queue_position = 0
        self._view: tuple[dict[str, int], np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._index)

    @property
    def num_classes(self) -> int | None:
        """K fixed by the first write, or None before it."""
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
        if kernel is not None:
            positions = self.lookup_compiled(ids)[0]
            return positions >= 0, positions
        positions = np.fromiter(
            map(self._index.get, ids, itertools.repeat(-1)),
            dtype=np.int64,
            count=len(ids),
        )
        return positions >= 0, positions

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Return a copy of the rows at ``positions`` (all must be >= 0)."""
        assert self._rows is not None
        return self._rows[positions]

    def write(
        self,
        ids: Sequence[str],
        values: np.ndarray,
        positions: np.ndarray | None = None,
    ) -> np.ndarray:
        """Store ``values[i]`` under ``ids[i]`` and return the row index used.

        ``positions`` may pass the result of ``lookup(ids)`` to skip a second
        lookup. If an id repeats, its last value is stored. If the call contains
        more distinct ids than the capacity, only the ``capacity`` ids that
        occur last are stored and the others get row -1.
        """
        assert self._rows is not None
        if positions is None:
            positions = self.lookup(ids)[1]
        count = len(ids)
        stamps = np.arange(self._clock + 1, self._clock + count + 1, dtype=np.int64)
        self._clock += count
        unique = len(set(ids)) == count
        if positions.min(initial=0) >= 0 and unique:
            # The common case on the hot path: known ids, no repeats.
            self._last_used[positions] = stamps
            self._rows[positions] = values
            return positions
        positions = positions.copy()
        if (positions < 0).any():
            self._allocate(ids, positions, stamps)
        kept = positions >= 0
        sources = np.flatnonzero(kept) if unique else _last_occurrences(ids, kept)
        self._last_used[positions[sources]] = stamps[sources]
        self._rows[positions[sources]] = values[sources]
        return positions

    def lookup_compiled(self, ids: Sequence[str]) -> tuple[np.ndarray, int]:
        """Return the row index of each id (-1 if absent) and the absent count.

        Needs the compiled loops (``dynamic_kernel.kernel``).
        """
        assert kernel is not None
        positions = np.empty(len(ids), dtype=np.int64)
        return positions, kernel.lookup(self._index, ids, positions)

    def reserve(
        self, ids: Sequence[str], positions: np.ndarray, missing: int
    ) -> tuple[np.ndarray, int]:
        """Give each id a row as ``write`` would, without writing the rows.

        This is for compiled loops that write the rows themselves. The caller
        must store ``ids[i]``'s row at the returned index ``i`` and set its entry
        of ``last_used`` to ``first_stamp + i``. ``ids`` must be unique and
        no more than the capacity, and ``positions`` and ``missing`` must
        come from ``lookup_compiled(ids)``. ``positions`` is not changed.

        Returns:
            The row index of each id and ``first_stamp``.
        """
        assert self._rows is not None and len(ids) <= self.capacity
        first_stamp = self._clock + 1
        self._clock += len(ids)
        if missing:
            positions = positions.copy()
            stamps = np.arange(first_stamp, self._clock + 1, dtype=np.int64)
            self._allocate(ids, positions, stamps)
        return positions, first_stamp

    def compiled_view(self) -> tuple[dict[str, int], np.ndarray, np.ndarray] | None:
        """Return the id index, row array and stamps for compiled loops to use.

        The loops write rows and stamps in place. None until the first
        ``check_classes`` allocates the rows.
        """
        if self._view is None and self._rows is not None:
            self._view = (self._index, self._rows, self._last_used)
        return self._view

    @property
    def next_stamp(self) -> int:
        """The stamp that the next written row gets."""
        return self._clock + 1

    def advance(self, count: int) -> None:
        """Count ``count`` stamps as used by rows written in compiled loops."""
        self._clock += count

    def _allocate(
        self, ids: Sequence[str], positions: np.ndarray, stamps: np.ndarray
    ) -> None:
        """Give each new id a row, evicting LRU rows the call does not touch."""
        last_seen = {sample_id: i for i, sample_id in enumerate(ids)}
        if len(last_seen) > self.capacity:
            ordered = sorted(last_seen, key=last_seen.__getitem__)
            for sample_id in ordered[: len(ordered) - self.capacity]:
                del last_seen[sample_id]
            for i, sample_id in enumerate(ids):
                if sample_id not in last_seen:
                    positions[i] = -1
        # Stamp the rows this call keeps first, so eviction skips them.
        found = [i for i in last_seen.values() if positions[i] >= 0]
        self._last_used[positions[found]] = stamps[found]

        new_ids = [sid for sid, i in last_seen.items() if positions[i] < 0]
        rows = self._free_rows(len(new_ids), int(stamps[0]))
        for sample_id, row in zip(new_ids, rows.tolist(), strict=True):
            self._index[sample_id] = row
            if row < len(self._row_ids):
                self._row_ids[row] = sample_id
            else:
                self._row_ids.append(sample_id)
        for i, sample_id in enumerate(ids):
            if positions[i] < 0 and sample_id in last_seen:
                positions[i] = self._index[sample_id]

    def _free_rows(self, count: int, first_stamp: int) -> np.ndarray:
        unused = self.capacity - len(self._row_ids)
        fresh = np.arange(len(self._row_ids), len(self._row_ids) + min(count, unused))
        if count <= unused:
            return fresh
        evicted = self._evict(count - unused, first_stamp)
        for row in evicted.tolist():
            del self._index[self._row_ids[row]]
        return np.concatenate([fresh, evicted])

    def _evict(self, count: int, first_stamp: int) -> np.ndarray:
        """Return ``count`` least recently used rows and mark them as taken.

        Rows stamped by the current write (stamp >= ``first_stamp``) are left
        out of a queue rebuild. They are protected, and keeping them out means
        that every row stamped after a rebuild is newer than all queue entries,
        which is what makes skipping stale entries exact.
        """
        taken: list[np.ndarray] = []
        needed = count
        while needed:
            if self._queue_position >= len(self._queue):
                stamps = self._last_used[: len(self._row_ids)]
                older = np.flatnonzero(stamps < first_stamp)
                self._queue = older[np.argsort(stamps[older], kind="stable")]
                self._queue_stamps = stamps[self._queue]
                self._queue_position = 0
            start = self._queue_position
            end = min(len(self._queue), start + needed)
            candidates = self._queue[start:end]
            current = self._last_used[candidates] == self._queue_stamps[start:end]
            chosen = candidates[current]
            self._queue_position = end
            # A row taken here must not be chosen again after a queue rebuild.
            self._last_used[chosen] = np.iinfo(np.int64).max
            taken.append(chosen)
            needed -= len(chosen)
        return np.concatenate(taken)

    def saved_arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Return ids, rows and stamps in row order, for a checkpoint.

        This is ``to_arrays`` without the sort and the per-id Python work,
        because a checkpoint is written every few dozen updates. The stamps
        give the least recently used order: ``lru_order(stamps)``.
        """
        count = len(self._row_ids)
        if self._rows is None or not count:
            width = 0 if self._rows is None else self._rows.shape[1]
            empty = np.zeros((0, width), dtype=np.float32)
            return [], empty, np.zeros(0, dtype=np.int64)
        return (
            list(self._row_ids),
            self._rows[:count].copy(),
            self._last_used[:count].copy(),
        )

    def to_arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Return ids, their rows and their row indices, least recently used first."""
        if self._rows is None or not self._index:
            width = 0 if self._rows is None else self._rows.shape[1]
            empty = np.zeros((0, width), dtype=np.float32)
            return [], empty, np.zeros(0, dtype=np.int64)
        used = np.fromiter(self._index.values(), dtype=np.int64, count=len(self))
        order = used[np.argsort(self._last_used[used], kind="stable")]
        ids = [self._row_ids[row] for row in order.tolist()]
        return ids, self._rows[order].copy(), order


def _last_occurrences(ids: Sequence[str], kept: np.ndarray) -> np.ndarray:
    """Return the index of the last occurrence of each kept id, in id order."""
    last = {sample_id: i for i, sample_id in enumerate(ids) if kept[i]}
    return np.fromiter(sorted(last.values()), dtype=np.int64, count=len(last))


def lru_order(stamps: np.ndarray) -> np.ndarray:
    """Return the indices that put rows of ``saved_arrays`` oldest first."""
    return np.argsort(stamps, kind="stable")


# Ids are joined with NUL, which sample ids almost never contain.
_ID_SEPARATOR = "\x00"


def pack_ids(ids: Sequence[str]) -> np.ndarray | None:
    """Return ids as one uint8 array of NUL-separated UTF-8.

    Returns None when an id contains NUL or is not valid Unicode (a lone
    surrogate). The caller then saves the ids another way, such as a JSON
    list. ``unpack_ids`` needs the id count to read the array back.
    """
    joined = _ID_SEPARATOR.join(ids)
    if joined.count(_ID_SEPARATOR) != max(len(ids) - 1, 0):
        return None
    try:
        encoded = joined.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return np.frombuffer(encoded, dtype=np.uint8).copy()


def unpack_ids(packed: np.ndarray, count: int) -> list[str]:
    """Return the ``count`` ids that ``pack_ids`` packed.

    Raises:
        ValueError: the array is not 1-D uint8, is not UTF-8, or contains
            another number of ids.
    """
    if packed.ndim != 1 or packed.dtype != np.uint8:
        raise ValueError(
            f"expected packed ids as a 1-D uint8 array, got {packed.dtype} "
            f"of shape {packed.shape}"
        )
    if count == 0 and packed.size == 0:
        return []
    try:
        ids = packed.tobytes().decode("utf-8").split(_ID_SEPARATOR)
    except UnicodeDecodeError as error:
        raise ValueError(f"packed ids are not valid UTF-8: {error}") from error
    if len(ids) != count:
        raise ValueError(f"expected {count} packed ids, found {len(ids)}")
    return ids
