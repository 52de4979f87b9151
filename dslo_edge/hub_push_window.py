"""The updates of one device's push that wait for their PUBACK, for ``BatchPublisher``.

The pusher marks stored batches as acknowledged in the state file while it
publishes. Before it charges each next batch, it waits until fewer than
``PUBLISH_WINDOW`` updates lack a PUBACK, and it marks those whose PUBACK
arrived in the transaction that charges the next batch. When that transaction
fails, for example on a full disk, the window keeps the marks, and the next
write to the state file stores them. So unless that write fails too, a worker
killed at any point leaves at most ``PUBLISH_WINDOW`` stored updates without
the mark, not counting those the broker dropped or rejected, which are marked
with their refund after the device's last PUBACK. The run that resumes the
push sends the device at most that many updates a second time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from dslo_edge.hub import FIRST_FAILURE_CODE, NO_MATCHING_SUBSCRIBERS
from dslo_edge.pubacks import PubackTracker
from dslo_edge.watchdog import Heartbeat

# paho-mqtt 2.2.0's default max_inflight_messages, which the hub's client does
# not change. paho sends at most this many QoS 1 messages at once and queues the
# rest, so a wider window would not publish any faster.
PUBLISH_WINDOW = 20


@dataclass(frozen=True)
class Published:
    """One update published to a device, and its batch index in the push."""

    info: mqtt.MQTTMessageInfo
    samples: int
    batch: int
    # A stored update published again, which the device may have received at
    # the first publish, so its charge is never taken back.
    republished: bool = False


def is_delivered(reason_code: int) -> bool:
    """Return whether a PUBACK reason code means the broker kept the update."""
    return reason_code != NO_MATCHING_SUBSCRIBERS and reason_code < FIRST_FAILURE_CODE


class PublishWindow:
    """The updates published in one device's push, oldest first, and their PUBACKs.

    Only PUBACKs numbered after ``since`` count, as in ``PubackTracker``.
    ``progress`` gets a beat each time the wait for one PUBACK ends, timed
    out or not.
    """

    def __init__(
        self,
        pubacks: PubackTracker,
        since: int,
        size: int,
        progress: Heartbeat | None = None,
    ):
        self.published: list[Published] = []
        self._progress = progress or Heartbeat()
        self.since = since
        self._pubacks = pubacks
        self._size = size
        # The index of the oldest update not yet seen with a PUBACK.
        self._next_to_wait = 0
        # The index of the oldest update that _take_acknowledged has not gone past.
        self._next_to_take = 0
        # Batches acknowledged by the broker whose marks are not stored yet.
        self._unmarked: list[int] = []

    @property
    def unchecked(self) -> int:
        """The number of newest updates not yet seen with a PUBACK."""
        return len(self.published) - self._next_to_wait

    def wait_for_room(self, timeout: float, stopping: threading.Event) -> str:
        """Wait until fewer than the window's size lack a PUBACK; return "" or why not.

        Waits for the PUBACKs in publishing order, each up to ``timeout``
        seconds, and ends early once ``stopping`` is set.
        """
        return self._wait_until(len(self.published) - self._size + 1, timeout, stopping)

    def wait_for_next(self, timeout: float, stopping: threading.Event) -> str:
        """Wait for the oldest missing PUBACK; return "" or why it did not come."""
        return self._wait_until(self._next_to_wait + 1, timeout, stopping)

    def wait_for_rest(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds in all for each missing PUBACK.

        Unlike the other waits, this one does not end when the worker stops.
        """
        deadline = time.monotonic() + timeout
        never_set = threading.Event()
        while self.unchecked:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.wait_for_next(remaining, never_set):
                return

    @property
    def unmarked(self) -> int:
        """The number of batches acknowledged by the broker and not yet marked."""
        return len(self._unmarked)

    @contextmanager
    def marking(self) -> Iterator[list[int]]:
        """Yield the batches acknowledged and kept by the broker, not yet marked.

        The caller marks them in the state file inside the ``with`` block. The
        window removes them only when the block ends without an exception, so
        the marks of a failed transaction are yielded again by the next call.
        """
        self._unmarked.extend(self._take_acknowledged())
        batches = list(self._unmarked)
        yield batches
        del self._unmarked[: len(batches)]

    def _take_acknowledged(self) -> list[int]:
        """Return the batches that the broker acknowledged and kept since the last call.

        It goes through the updates in publishing order and stops at the first
        without a PUBACK. MQTT 5 (section 4.6) requires a broker to send PUBACKs
        in that order, and one that arrives after a gap waits until it fills.
        """
        batches = []
        while self._next_to_take < len(self.published):
            entry = self.published[self._next_to_take]
            reason_code = self._pubacks.reason_code(entry.info.mid, self.since)
            if reason_code is None:
                break
            if is_delivered(reason_code):
                batches.append(entry.batch)
            self._next_to_take += 1
        return batches

    def _wait_until(self, end: int, timeout: float, stopping: threading.Event) -> str:
        """Wait until each update before index ``end`` has its PUBACK."""
        while self._next_to_wait < min(end, len(self.published)):
            info = self.published[self._next_to_wait].info
            problem = self._pubacks.wait_for_all([info], self.since, timeout, stopping)
            self._progress.beat()
            if problem:
                return problem
            self._next_to_wait += 1
        return ""
