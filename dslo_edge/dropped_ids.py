"""A durable record of the message ids of updates that a rollback dropped.

A rollback acknowledges the updates it drops, so that the broker does not
deliver them again. Those acknowledgements wait until the restored state is
saved, and a crash before then makes the broker deliver the dropped updates
again, to a daemon whose newest checkpoint lacks their ids. The daemon
writes their ids to this file before it sends any of those
acknowledgements, and rejects copies of them as duplicates.

The file is the 16-byte ids, oldest first, then a sha256 over them. It is
written as checkpoints are, with ``checkpoint.write_durably``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from dslo_edge.applied_ids import ID_BYTES
from dslo_edge.checkpoint import write_durably

logger = logging.getLogger(__name__)

DROPPED_IDS_FILE = "dropped-ids.bin"
DIGEST_BYTES = hashlib.sha256().digest_size


class DroppedIds:
    """The ids of dropped updates, newest ``capacity`` kept, stored in ``path``."""

    def __init__(self, path: Path, capacity: int):
        self.path = path
        self.capacity = capacity
        self._ids: dict[bytes, None] = {}
        # True when ids in memory are missing from the file.
        self.unwritten = False

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def load(self) -> None:
        """Read the ids from the file, if it exists.

        A damaged file is logged and gives no ids, because it only reopens
        the window that it closes. The next ``record`` replaces it.

        Raises:
            OSError: the file exists but cannot be read.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        ids, digest = data[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
        if (
            len(data) < DIGEST_BYTES
            or len(ids) % ID_BYTES
            or hashlib.sha256(ids).digest() != digest
        ):
            logger.warning(
                "Ignoring damaged record of dropped updates %s (%d bytes, "
                "checksum or length does not match); copies of updates dropped "
                "before it was written may be applied again",
                self.path,
                len(data),
            )
            return
        self._add(ids[i : i + ID_BYTES] for i in range(0, len(ids), ID_BYTES))

    def record(self, message_ids: Iterable[bytes] = ()) -> None:
        """Add ids and write the file durably before returning.

        The ids stay in memory when the write fails, and ``unwritten`` stays
        True until a later ``record`` writes them.

        Raises:
            OSError: the file cannot be written, for example on a full disk.
        """
        self._add(message_ids)
        self.unwritten = True
        ids = b"".join(self._ids)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(self.path, ids + hashlib.sha256(ids).digest())
        self.unwritten = False

    def _add(self, message_ids: Iterable[bytes]) -> None:
        for message_id in message_ids:
            self._ids[bytes(message_id)] = None
        while len(self._ids) > self.capacity:
            del self._ids[next(iter(self._ids))]
