"""The PUBACKs a paho client receives, with their MQTT 5 reason codes.

paho-mqtt 2.2.0 keeps a QoS 1 message published while the client is
disconnected and sends it after the reconnect, but the message's
``wait_for_publish`` and ``is_published`` raise at once for it. Neither
returns the PUBACK's reason code either.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

# How often a wait for a PUBACK checks whether its caller stops.
STOP_CHECK_S = 0.5


class PubackTracker:
    """The sequence number and reason code of each message id's latest PUBACK.

    Each PUBACK gets the next number of a sequence, so a caller that reads
    ``sequence`` before publishing can tell its own PUBACK from an earlier one
    for a message id that paho has since reused.
    """

    def __init__(self, client: mqtt.Client):
        self.client = client
        self._changed = threading.Condition()
        self._sequence = 0
        self._pubacks: dict[int, tuple[int, int]] = {}
        # A handler set on the client before, which still gets every PUBACK.
        self._chained: Callable[..., None] | None = client.on_publish
        client.on_publish = self._on_publish

    @property
    def sequence(self) -> int:
        """The number of the latest PUBACK, 0 before the first."""
        with self._changed:
            return self._sequence

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._changed:
            self._sequence += 1
            self._pubacks[mid] = (self._sequence, reason_code.value)
            self._changed.notify_all()
        if self._chained is not None:
            self._chained(client, userdata, mid, reason_code, properties)

    def reason_code(self, mid: int, since: int) -> int | None:
        """Return the reason code of a PUBACK for ``mid`` numbered after ``since``.

        Returns None while no such PUBACK has arrived.
        """
        with self._changed:
            return self._reason_code(mid, since)

    def wait(self, mid: int, since: int, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for what ``reason_code`` returns."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._reason_code(mid, since) is not None, timeout
            )
            return self._reason_code(mid, since)

    def wait_for_all(
        self,
        messages: list[mqtt.MQTTMessageInfo],
        since: int,
        timeout: float,
        stopping: threading.Event,
    ) -> str:
        """Wait for the PUBACK of each QoS 1 message in turn; return "" or what failed.

        The wait for a message starts once the one before it has its PUBACK,
        and times out after ``timeout`` seconds. It ends early once
        ``stopping`` is set. PUBACKs numbered up to ``since`` do not count.
        """
        for info in messages:
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                return "paho's outgoing queue was full, so it did not keep a message"
            problem = self._wait_for_one(info.mid, since, timeout, stopping)
            if problem:
                return problem
        return ""

    def _wait_for_one(
        self, mid: int, since: int, timeout: float, stopping: threading.Event
    ) -> str:
        deadline = time.monotonic() + timeout
        while True:
            step = min(deadline - time.monotonic(), STOP_CHECK_S)
            if self.wait(mid, since, max(step, 0.0)) is not None:
                return ""
            if stopping.is_set():
                return "stopped waiting, because the worker is stopping"
            if time.monotonic() >= deadline:
                connection = (
                    "" if self.client.is_connected() else " without a broker connection"
                )
                return f"timed out after {timeout:g} s{connection}"

    def _reason_code(self, mid: int, since: int) -> int | None:
        entry = self._pubacks.get(mid)
        if entry is None or entry[0] <= since:
            return None
        return entry[1]
