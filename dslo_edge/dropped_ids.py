"""A durable record of the message ids of updates that a rollback dropped.

A rollback acknowledges the updates it drops, so that the broker does not
deliver them again. Those acknowledgements wait until the restored state is
saved, and a crash before then makes the broker deliver the dropped updates
again, to a daemon whose newest checkpoint lacks their ids. The daemon
writes their ids to this file before it sends any of those
acknowledgements, and rejects copies of them as duplicates.

The file is the 16-byte ids, oldest first, then a sha256 over them. It is
written as checkpoints are, with ``checkpoint.write_durably``.

A rollback often follows failed checkpoint saves on a full disk, where the
record's write fails too. So a reserve file of zeros beside it keeps the
blocks for the record with ``headroom`` more ids. When the write fails for
lack of space, the reserve file is deleted and the write tried once more.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from dslo_edge.applied_ids import ID_BYTES
from dslo_edge.checkpoint import write_durably

logger = logging.getLogger(__name__)

DROPPED_IDS_FILE = "dropped-ids.bin"
DROPPED_IDS_RESERVE_FILE = "dropped-ids.reserve"
DIGEST_BYTES = hashlib.sha256().digest_size
# The errors of a write that found no free block or reached the disk quota.
NO_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)


class DroppedIds:
    """The ids of dropped updates, newest ``capacity`` kept, stored in ``path``.

    Args:
        headroom: the number of ids that one rollback may add, for which
            ``reserve`` keeps free blocks.
    """

    def __init__(self, path: Path, capacity: int, headroom: int = 0):
        self.path = path
        self.reserve_path = path.with_name(DROPPED_IDS_RESERVE_FILE)
        self.capacity = capacity
        self.headroom = headroom
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

    def record(self, message_ids: Iterable[bytes] = ()) -> bool:
        """Add ids and write the file durably before returning.

        The ids stay in memory when the write fails, and ``unwritten`` stays
        True until a later ``record`` writes them.

        Returns:
            True when the disk was full, so the reserve file was deleted to
            make room for the record.

        Raises:
            OSError: the file cannot be written, for example on a full disk
                without a reserve file, or with more ids than it has room for.
        """
        self._add(message_ids)
        self.unwritten = True
        ids = b"".join(self._ids)
        data = ids + hashlib.sha256(ids).digest()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        released = False
        try:
            write_durably(self.path, data)
        except OSError as error:
            if error.errno not in NO_SPACE_ERRORS or not self._release_reserve():
                raise
            # NOTE: another process that writes to the same file system can
            # take the freed blocks first, and then this write fails too.
            write_durably(self.path, data)
            released = True
        self.unwritten = False
        return released

    def reserved_bytes(self) -> int:
        """Return the size of the record with ``headroom`` more ids."""
        count = min(self.capacity, len(self._ids) + self.headroom)
        return count * ID_BYTES + DIGEST_BYTES

    def reserve(self) -> bool:
        """Grow the reserve file to ``reserved_bytes`` of zeros, written and fsynced.

        Returns:
            True when it wrote the file, False when it was large enough.

        Raises:
            OSError: the file cannot be written. The part written is cut off
                again, so that it takes no space from the checkpoints, and a
                reserve file that was there keeps its earlier size.
        """
        size = self.reserved_bytes()
        try:
            present = self.reserve_path.stat().st_size
        except FileNotFoundError:
            present = 0
        if present >= size:
            return False
        self.reserve_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Zeros, because a hole or an unwritten extent would keep no block.
            with open(self.reserve_path, "ab") as stream:
                stream.write(bytes(size - present))
                stream.flush()
                os.fsync(stream.fileno())
        except OSError:
            # A failed growth happens on a nearly full disk, where the blocks
            # reserved before are needed most, so only the new part goes.
            if present:
                os.truncate(self.reserve_path, present)
            else:
                self.reserve_path.unlink(missing_ok=True)
            raise
        return True

    def _release_reserve(self) -> bool:
        """Delete the reserve file; return False when there was none."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        return True

    def _add(self, message_ids: Iterable[bytes]) -> None:
        for message_id in message_ids:
            self._ids[bytes(message_id)] = None
        while len(self._ids) > self.capacity:
            del self._ids[next(iter(self._ids))]
