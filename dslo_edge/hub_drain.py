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
and passes every request to the worker's batcher. mosquitto sends at most
``max_inflight_messages`` requests at a time, and the next ones only after
the drain acknowledges earlier ones. So the drain waits until all requests
are acknowledged and no request has arrived for ``DRAIN_IDLE_S`` since it
connected or last acknowledged one. Then it disconnects with session
expiry 0, which ends the session. If the dead worker comes back
meanwhile, its connect takes the session over and it serves the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import threading
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dslo_edge.config import MqttSettings
from dslo_edge.connection import Backoff, MqttConnection, packet_size_limit
from dslo_edge.hub_config import RECONNECT_MAX_S_LIMIT
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
# NOTE: if the broker takes longer than this to send the next request after
# an acknowledgement, the drain ends the session early, and only device
# resends serve the requests still queued in it.
DRAIN_IDLE_S = 1.0
DRAIN_MAX_S = 120.0
# paho-mqtt 2.2.0's default socket connect timeout, which bounds one
# reconnect attempt of a peer.
PEER_CONNECT_S = 5.0
# Connect attempts of one drain before it gives up.
DRAIN_ATTEMPTS = 5
# How often a drain in its grace period checks the worker's connection.
GRACE_POLL_S = 0.2


def peer_reconnect_max_s(status: dict[str, Any]) -> tuple[float | None, str]:
    """Read ``reconnect_max_s`` from a peer's retained status.

    Returns the value to use and a description of what was wrong with the
    received one ("" if nothing). The value is None when the status has no
    such field, or when the field is not a finite number >= 0. A value above
    the largest that a hub config accepts is capped there.
    """
    if "reconnect_max_s" not in status:
        return None, ""
    value = status["reconnect_max_s"]
    # JSON true arrives as bool, a subclass of int, and is no number of seconds.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"reconnect_max_s = {value!r} is not a number"
    # An int is finite, and math.isfinite raises OverflowError for one beyond
    # the float range, which a JSON number can be.
    finite = isinstance(value, int) or math.isfinite(value)
    if not finite or value < 0:
        return None, f"reconnect_max_s = {value!r} is not a finite number >= 0"
    if value > RECONNECT_MAX_S_LIMIT:
        return RECONNECT_MAX_S_LIMIT, (
            f"reconnect_max_s = {value!r} is above the maximum "
            f"{RECONNECT_MAX_S_LIMIT:g}, so it is capped there"
        )
    return float(value), ""


def grace_period(settings: MqttSettings, peer_max_s: float | None = None) -> float:
    """Return how long a peer must stay offline before a worker drains it.

    A live worker retries its connection at most ``reconnect_max_s`` apart
    (``Backoff`` caps each delay there), and one attempt takes at most
    ``PEER_CONNECT_S``. So a live peer has reconnected and published
    ``online`` within this time after the broker accepts connections again.

    Args:
        settings: this worker's MQTT settings.
        peer_max_s: the ``reconnect_max_s`` in the peer's status, from
            ``peer_reconnect_max_s``. The larger of it and this worker's
            value is used.
    """
    reconnect_max_s = settings.reconnect_max_s
    if peer_max_s is None:
        # NOTE: a status without the value (from a dslo-edge version before
        # it was added, or with an invalid one) gets this worker's value, so
        # such a peer with a larger value can still be drained while live.
        return reconnect_max_s + PEER_CONNECT_S
    return max(reconnect_max_s, peer_max_s) + PEER_CONNECT_S


class SessionDrain(threading.Thread):
    """A thread that serves the requests left in a dead peer's session.

    Args:
        worker: the worker that serves the drained requests.
        peer: the peer's worker id.
        peer_client_id: the client id of the peer's session.
        grace_s: how long the peer must stay offline, and the worker stay
            connected, before the drain connects; see ``grace_period``.
    """

    def __init__(
        self, worker: HubWorker, peer: str, peer_client_id: str, grace_s: float
    ):
        super().__init__(name=f"dslo-hub-drain-{peer}", daemon=True)
        self.worker = worker
        self.peer = peer
        self.peer_client_id = peer_client_id
        self.grace_s = grace_s
        self.received = 0
        self._seen_offline_at = time.monotonic()
        self._outstanding = 0
        # When the drain connected or last received or acknowledged a
        # request. The idle time that ends the drain counts from here.
        self._last_activity = time.monotonic()
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._cancelled = threading.Event()
        self._session_present = False
        self._settings = dataclasses.replace(
            worker.config.mqtt, client_id=peer_client_id
        )
        self._backoff = Backoff(
            self._settings.reconnect_min_s, self._settings.reconnect_max_s
        )
        # Set by run, because the client setup reads the password and TLS
        # files, which can fail, and this constructor runs on the worker's
        # network thread, which an exception would end.
        self._connection: MqttConnection
        self.client: mqtt.Client

    @property
    def cancelled(self) -> bool:
        """Whether the peer came back before the drain connected."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop a drain that has not connected yet: the peer is back."""
        self._cancelled.set()

    def run(self) -> None:
        try:
            self._open_connection()
            self._attempt_drain()
        except Exception:  # a failed drain leaves the requests to device resends
            logger.exception(
                "Hub worker %s failed to drain the session of %s",
                self.worker.worker_id,
                self.peer,
            )

    def _open_connection(self) -> None:
        # Used for its client setup (TLS, authentication) only: the drain
        # does not reconnect after its connection closes, or it would take
        # the session back from a peer that restarted.
        self._connection = MqttConnection(
            self._settings,
            self.peer_client_id,
            on_connected=self._on_connected,
            on_message=self._on_message,
            on_disconnected=self._closed.set,
            manual_ack=True,
            maximum_packet_size=packet_size_limit(
                self.worker.config.requests.max_payload_bytes
            ),
            label=f"hub worker {self.worker.worker_id} draining {self.peer}",
        )
        self.client = self._connection.client

    def _attempt_drain(self) -> None:
        rng = random.Random()
        for attempt in range(1, DRAIN_ATTEMPTS + 1):
            if not self._wait_for_grace():
                return
            error = self._connect()
            if error is None:
                self._drain()
                return
            if attempt == DRAIN_ATTEMPTS:
                logger.warning(
                    "Hub worker %s gives up draining the session of %s after %d "
                    "failed connects as %s: %s. Devices resend its requests, and "
                    "the worker tries again when it next receives %s's offline "
                    "status, after its own reconnect",
                    self.worker.worker_id,
                    self.peer,
                    DRAIN_ATTEMPTS,
                    self.peer_client_id,
                    error,
                    self.peer,
                )
                return
            delay = self._backoff.delay(attempt - 1, rng)
            logger.warning(
                "Hub worker %s could not connect as %s to drain the session of %s "
                "(attempt %d of %d): %s; trying again in %.1f s",
                self.worker.worker_id,
                self.peer_client_id,
                self.peer,
                attempt,
                DRAIN_ATTEMPTS,
                error,
                delay,
            )
            self._cancelled.wait(delay)

    def _wait_for_grace(self) -> bool:
        """Wait out the grace period; return False if the drain must not run."""
        while not self.worker.stopping.is_set():
            if self._cancelled.is_set():
                logger.info(
                    "Hub worker %s does not drain %s: its status is %s again",
                    self.worker.worker_id,
                    self.peer,
                    self.worker.peer_state(self.peer),
                )
                return False
            connected_at = self.worker.connected_at()
            if connected_at is not None:
                due = max(self._seen_offline_at, connected_at) + self.grace_s
                if time.monotonic() >= due:
                    return True
            self._cancelled.wait(GRACE_POLL_S)
        return False

    def _connect(self) -> str | None:
        """Connect under the peer's client id; return the error, None on success."""
        settings = self.worker.config.mqtt
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = settings.session_expiry_s
        self._connected.clear()
        self._closed.clear()
        try:
            self.client.connect(
                settings.host,
                settings.port,
                settings.keepalive,
                clean_start=False,
                properties=properties,
            )
        except OSError as error:  # includes ssl.SSLError
            return str(error) or type(error).__name__
        self.client.loop_start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._connected.is_set() or self._closed.is_set():
                break
            time.sleep(0.05)
        if self._connected.is_set():
            return None
        self.client.disconnect()
        self.client.loop_stop()
        if self._closed.is_set():
            return self._connection.last_error or "connection closed"
        return f"no CONNACK within {CONNECT_TIMEOUT_S:g} s"

    def _drain(self) -> None:
        try:
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
        with self._lock:
            self._last_activity = time.monotonic()
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
            self._last_activity = time.monotonic()
        self.worker.enqueue(message, _CountingClient(self), drained_from=self.peer)

    def _acknowledged(self) -> None:
        with self._lock:
            self._outstanding -= 1
            self._last_activity = time.monotonic()

    def _wait_until_answered(self) -> None:
        deadline = time.monotonic() + DRAIN_MAX_S
        while time.monotonic() < deadline and self.client.is_connected():
            with self._lock:
                idle = time.monotonic() - self._last_activity
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
            json.dumps(
                {
                    "state": WORKER_STOPPED,
                    "client_id": self.peer_client_id,
                    "group": self.worker.config.group,
                    "drained_by": self.worker.worker_id,
                }
            ),
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
