"""The record of message ids already applied, saved with each checkpoint.

QoS 1 delivers at least once, and a restored device receives the updates
it applied after its last checkpoint again. Because the record and the weights
are written in the same checkpoint, an id is in the record exactly when its
update is in the weights, so a redelivered, replayed or retained update is
skipped instead of trained on twice.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

ID_BYTES = 16


class AppliedIds:
    """A bounded set of 16-byte message ids; the oldest id is evicted first.

    An update older than the eviction horizon can be replayed, so the
    freshness window (payload timestamp) must expire updates before their id
    could be evicted: at 100,000 ids and one update per second that is more
    than a day.

    The ids are also kept joined in insertion order, so a checkpoint copies
    one buffer instead of joining up to ``capacity`` bytes objects (about
    7 ms at 100,000 ids, against 0.1 ms for the copy).
    """

    def __init__(self, capacity: int = 100_000):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[bytes, None] = OrderedDict()
        self._joined = bytearray()
        # Bytes at the front of _joined that belong to evicted ids.
        self._evicted_bytes = 0

    def __contains__(self, message_id: bytes) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, message_id: bytes) -> None:
        key = bytes(message_id)
        if len(key) != ID_BYTES:
            raise ValueError(f"message ids have {ID_BYTES} bytes, got {len(key)}")
        if key in self._ids:
            return
        # The buffer first: if it cannot grow, the record stays as it was.
        self._joined += key
        self._ids[key] = None
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
            self._evicted_bytes += ID_BYTES
        if self._evicted_bytes > len(self._joined) // 2:
            del self._joined[: self._evicted_bytes]
            self._evicted_bytes = 0

    def to_array(self) -> np.ndarray:
        """Return the ids, oldest first, as a uint8 array of shape (N, 16)."""
        ids = np.frombuffer(self._joined, dtype=np.uint8, offset=self._evicted_bytes)
        return ids.reshape(-1, ID_BYTES).copy()

    @classmethod
    def from_array(cls, rows: np.ndarray, capacity: int) -> AppliedIds:
        """Rebuild the record from ``to_array`` output."""
        if rows.ndim != 2 or rows.shape[1] != ID_BYTES:
            raise ValueError(f"expected shape (N, {ID_BYTES}), got {rows.shape}")
        record = cls(capacity)
        for row in np.asarray(rows, dtype=np.uint8):
            record.add(row.tobytes())
        return record
