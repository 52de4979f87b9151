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
    """

    def __init__(self, capacity: int = 100_000):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, message_id: bytes) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, message_id: bytes) -> None:
        self._ids[message_id] = None
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def to_array(self) -> np.ndarray:
        """Return the ids, oldest first, as a uint8 array of shape (N, 16)."""
        if not self._ids:
            return np.zeros((0, ID_BYTES), dtype=np.uint8)
        joined = b"".join(self._ids)
        return np.frombuffer(joined, dtype=np.uint8).reshape(-1, ID_BYTES).copy()

    @classmethod
    def from_array(cls, rows: np.ndarray, capacity: int) -> AppliedIds:
        """Rebuild the record from ``to_array`` output."""
        if rows.ndim != 2 or rows.shape[1] != ID_BYTES:
            raise ValueError(f"expected shape (N, {ID_BYTES}), got {rows.shape}")
        record = cls(capacity)
        for row in np.asarray(rows, dtype=np.uint8):
            record.add(row.tobytes())
        return record
