"""The daemon's queues of received messages, bounded by count and by bytes.

The daemon keeps one for soft-label updates, one for inference inputs and
one for model update chunks. The count bound of the updates' queue follows
the receive maximum that the device requests from the broker. The byte
bound keeps the memory of waiting payloads below a fixed size whatever the
hub puts in one message, except that one payload goes into an empty queue
whatever its size.
"""

from __future__ import annotations

import queue
import time
from typing import Protocol, TypeVar


class _Payload(Protocol):
    @property
    def payload(self) -> bytes: ...


Item = TypeVar("Item", bound=_Payload)


class UpdateQueue(queue.Queue[Item]):
    """A FIFO queue of received messages whose payloads total at most ``max_bytes``.

    ``put`` waits while the queue contains ``maxsize`` items, or while adding
    the item would take the payloads past ``max_bytes``. An item goes in
    whatever its size when the queue is empty, so one payload larger than
    ``max_bytes`` still passes. ``get`` and the other methods work as in
    ``queue.Queue``.
    """

    def __init__(self, maxsize: int, max_bytes: int):
        if maxsize < 1 or max_bytes < 1:
            raise ValueError(
                f"maxsize and max_bytes must be positive, got {maxsize} and {max_bytes}"
            )
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.queued_bytes = 0

    def put(self, item: Item, block: bool = True, timeout: float | None = None) -> None:
        """Append ``item``, waiting for room as ``queue.Queue.put`` does.

        Raises:
            queue.Full: no room within ``timeout``, or at once when
                ``block`` is false.
            ValueError: ``timeout`` is negative.
        """
        size = len(item.payload)
        with self.not_full:
            if not block:
                if self._is_full(size):
                    raise queue.Full
            elif timeout is None:
                while self._is_full(size):
                    self.not_full.wait()
            elif timeout < 0:
                raise ValueError("'timeout' must be a non-negative number")
            else:
                deadline = time.monotonic() + timeout
                while self._is_full(size):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0.0:
                        raise queue.Full
                    self.not_full.wait(remaining)
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def _is_full(self, size: int) -> bool:
        count = self._qsize()
        return count >= self.maxsize or (
            count > 0 and self.queued_bytes + size > self.max_bytes
        )

    def _put(self, item: Item) -> None:
        self.queue.append(item)
        self.queued_bytes += len(item.payload)

    def _get(self) -> Item:
        item = self.queue.popleft()
        self.queued_bytes -= len(item.payload)
        # queue.Queue.get wakes one waiting put, but the freed bytes may fit
        # a put other than that one, so every waiting put checks again.
        self.not_full.notify_all()
        return item
