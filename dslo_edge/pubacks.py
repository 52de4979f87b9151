"""The PUBACKs a paho client receives, with their MQTT 5 reason codes.

paho-mqtt 2.2.0's ``MQTTMessageInfo`` reports whether the broker acknowledged
a QoS 1 message, but not the reason code of that PUBACK.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode


class PubackTracker:
    """The sequence number and reason code of each message id's latest PUBACK.

    Each PUBACK gets the next number of a sequence, so a caller that reads
    ``sequence`` before publishing can tell its own PUBACK from an earlier one
    for a message id that paho has since reused.
    """

    def __init__(self, client: mqtt.Client):
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

    def _reason_code(self, mid: int, since: int) -> int | None:
        entry = self._pubacks.get(mid)
        if entry is None or entry[0] <= since:
            return None
        return entry[1]
