"""Take over a dead hub worker's session and serve the requests it held.

mosquitto 2.0.11 sends each shared-subscription message to one member and
keeps it in that member's session until it is acknowledged. A worker that
dies leaves its unacknowledged requests there, and the broker goes on
routing a share of new requests to the dead session until it expires. No
other member ever receives them.

``SessionDrain`` connects under the dead worker's client id with
``clean_start = False``. The broker resumes the session and sends its
requests again (unacknowledged ones with the DUP flag). The drain
unsubscribes at once, so the broker routes nothing new to the session,
passes every request to the worker's batcher, waits until all are
acknowledged and none has arrived for ``DRAIN_IDLE_S``, then disconnects
with session expiry 0, which ends the session. If the dead worker comes
back meanwhile, its connect takes the session over and it answers the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dslo_edge.connection import MqttConnection
from dslo_edge.label_protocol import (
    WORKER_STOPPED,
    device_of_request_topic,
    shared_request_filter,
    worker_status_topic,
)

if TYPE_CHECKING:
    from dslo_edge.hub_service import HubWorker

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
DRAIN_IDLE_S = 1.0
DRAIN_MAX_S = 120.0


class SessionDrain(threading.Thread):
    """A thread that serves the requests left in a dead peer's session."""

    def __init__(self, worker: HubWorker, peer: str, peer_client_id: str):
        super().__init__(name=f"dslo-hub-drain-{peer}", daemon=True)
        self.worker = worker
        self.peer = peer
        self.peer_client_id = peer_client_id
        self.received = 0
        self._outstanding = 0
        self._last_message = time.monotonic()
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._session_present = False
        settings = dataclasses.replace(worker.config.mqtt, client_id=peer_client_id)
        # Used for its client setup (TLS, authentication) only: the drain
        # connects once and must not reconnect, or it would take the session
        # back from a peer that restarted.
        self._connection = MqttConnection(
            settings,
            peer_client_id,
            on_connected=self._on_connected,
            on_message=self._on_message,
            manual_ack=True,
            label=f"hub worker {worker.worker_id} draining {peer}",
        )
        self.client = self._connection.client

    def run(self) -> None:
        try:
            self._drain()
        except Exception:  # a failed drain leaves the requests to device resends
            logger.exception(
                "Hub worker %s failed to drain the session of %s",
                self.worker.worker_id,
                self.peer,
            )

    def _drain(self) -> None:
        settings = self.worker.config.mqtt
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = settings.session_expiry_s
        self.client.connect(
            settings.host,
            settings.port,
            settings.keepalive,
            clean_start=False,
            properties=properties,
        )
        self.client.loop_start()
        try:
            if not self._connected.wait(CONNECT_TIMEOUT_S):
                logger.warning(
                    "Hub worker %s could not resume the session of %s within %.0f s",
                    self.worker.worker_id,
                    self.peer,
                    CONNECT_TIMEOUT_S,
                )
                return
            if self._session_present:
                self._wait_until_answered()
            self._end_session()
        finally:
            self.client.loop_stop()
        logger.info(
            "Hub worker %s drained the session of %s: %d requests received again",
            self.worker.worker_id,
            self.peer,
            self.received,
        )

    def _on_connected(self, session_present: bool) -> None:
        self._session_present = session_present
        if session_present:
            prefix, group = self.worker.prefix, self.worker.config.group
            self.client.unsubscribe(
                [
                    shared_request_filter(prefix, group),
                    worker_status_topic(prefix, "+"),
                ]
            )
        self._connected.set()

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        if device_of_request_topic(message.topic, self.worker.prefix) is None:
            # The peer's session also queued the status messages of the
            # workers, which are not requests, so they do not go to the batcher.
            self.client.ack(message.mid, message.qos)
            return
        with self._lock:
            self.received += 1
            self._outstanding += 1
            self._last_message = time.monotonic()
        self.worker.enqueue(message, _CountingClient(self), drained=True)

    def _acknowledged(self) -> None:
        with self._lock:
            self._outstanding -= 1

    def _wait_until_answered(self) -> None:
        deadline = time.monotonic() + DRAIN_MAX_S
        while time.monotonic() < deadline and self.client.is_connected():
            with self._lock:
                idle = time.monotonic() - self._last_message
                done = self._outstanding == 0 and idle >= DRAIN_IDLE_S
            if done:
                return
            time.sleep(0.1)
        logger.warning(
            "Hub worker %s stops draining %s with %d requests unanswered; devices "
            "resend them",
            self.worker.worker_id,
            self.peer,
            self._outstanding,
        )

    def _end_session(self) -> None:
        if not self.client.is_connected():
            return
        self.client.publish(
            worker_status_topic(self.worker.prefix, self.peer),
            json.dumps({"state": WORKER_STOPPED, "drained_by": self.worker.worker_id}),
            qos=1,
            retain=True,
        ).wait_for_publish(timeout=5)
        properties = Properties(PacketTypes.DISCONNECT)
        properties.SessionExpiryInterval = 0
        self.client.disconnect(properties=properties)


class _CountingClient:
    """Acknowledges on the drain's client and counts what is still open."""

    def __init__(self, drain: SessionDrain):
        self.drain = drain

    def ack(self, mid: int, qos: int) -> Any:
        result = self.drain.client.ack(mid, qos)
        self.drain._acknowledged()
        return result
