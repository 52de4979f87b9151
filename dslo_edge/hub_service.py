"""The hub worker: serves label requests, runs pushes, announces the teacher.

Threads:

- the connection thread (``MqttConnection``) receives requests through the
  shared subscription ``$share/<group>/<prefix>/+/requests`` and only
  enqueues them;
- the batcher thread takes the requests of many devices at once, admits
  them against the shared state (rate limits, privacy budgets, repeats),
  labels all admitted samples, 256 per teacher call, publishes one response
  per request and only then acknowledges the requests (manual PUBACK), so a
  worker that dies before responding leaves them unacknowledged;
- the push scheduler thread (``hub_pushes``) when pushes are configured;
- a drain thread per dead peer (``hub_drain``);
- the watchdog thread (``watchdog``), which exits the process with
  status 70 when the batcher, push scheduler or connection thread died, or
  when the batcher or push scheduler made no progress for
  ``hub.watchdog_stall_s``. Drain threads are not watched.

Requests a dead worker held: mosquitto 2.0.11 keeps them, and a share of
new ones, in the dead worker's persistent session and never passes them to
another member of the group. When a worker sees a peer's will (its status
turns ``offline``) and the peer stays offline for a grace period, it
resumes the peer's session under the peer's client id, receives those
requests again (the broker redelivers them with the DUP flag), answers
them, and ends the session. It drains only peers of its own ``group``,
because their requests are labelled with the group's teacher and charged
to the group's budgets. A restarted worker resumes its own session the
same way. Devices also resend a request that is not answered in time.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dslo_edge import systemd
from dslo_edge.connection import MqttConnection, packet_size_limit
from dslo_edge.errors import BrokerError, ConfigError
from dslo_edge.hub_batch import PUBLISH_TIMEOUT_S as RESPONSE_PUBACK_WAIT_S
from dslo_edge.hub_batch import Acknowledger, BatchLabeller, Incoming
from dslo_edge.hub_config import HubConfig
from dslo_edge.hub_drain import SessionDrain, grace_period, peer_reconnect_max_s
from dslo_edge.hub_push_batches import PUBLISH_TIMEOUT_S as PUSH_PUBACK_WAIT_S
from dslo_edge.hub_pushes import PushScheduler
from dslo_edge.hub_state import HubState
from dslo_edge.hub_teacher import TeacherRegistry
from dslo_edge.hub_worker_lock import WorkerLock
from dslo_edge.json_input import parse_json
from dslo_edge.label_protocol import (
    WORKER_OFFLINE,
    WORKER_ONLINE,
    WORKER_STOPPED,
    correlation_of,
    device_of_request_topic,
    response_topic_of,
    shared_request_filter,
    teacher_topic,
    worker_metrics_topic,
    worker_status_topic,
)
from dslo_edge.repeat_log import RepeatLimiter, repeats_note
from dslo_edge.watchdog import Watchdog, WatchedThread

logger = logging.getLogger(__name__)

# Receive maximum: requests the broker may have in flight to one worker.
RECEIVE_MAXIMUM = 1000
# Idle time after the unsubscribe before a stopping worker ends its session.
STOP_IDLE_S = 0.5
# How often a worker checks that its state file was not deleted or replaced.
# NOTE: after one worker writes a deleted file back, the charges that other
# workers commit to the deleted file within this interval are lost.
STATE_CHECK_S = 1.0
# A warning about a device's QoS 0 requests is logged at most this often, in
# seconds, for at most this many devices at once.
QOS0_LOG_INTERVAL_S = 60.0
QOS0_LOG_MEMORY = 10_000
# A state file error of the batcher is logged at most this often, in seconds,
# per error message.
STATE_ERROR_LOG_INTERVAL_S = 60.0


def status_payload(state: str, client_id: str, group: str, **extra: Any) -> str:
    """Return the JSON text of a worker's retained status."""
    return json.dumps({"state": state, "client_id": client_id, "group": group, **extra})


def end_session_properties() -> Properties:
    """Return DISCONNECT properties that end the session on the broker."""
    properties = Properties(PacketTypes.DISCONNECT)
    properties.SessionExpiryInterval = 0
    return properties


@dataclass
class _Timers:
    next_metrics: float = 0.0
    next_forget: float = 0.0
    next_state_check: float = 0.0
    # The last failure to reopen the state file, so repeats are not logged.
    state_error: str = ""


def _check_top_k(config: HubConfig, class_count: int) -> None:
    """Raise ConfigError unless requests.top_k is 0 or below the class count."""
    top_k = config.requests.top_k
    if top_k >= class_count:
        raise ConfigError(
            f"{config.source}: requests.top_k = {top_k} is invalid for a teacher "
            f"with {class_count} classes; expected 0 (all probabilities) or "
            f"1..{class_count - 1}"
        )


def _takeover_fix(config: HubConfig) -> str:
    """Return what to do when another client takes over this worker's session."""
    if config.mqtt.client_id:
        return (
            f"{config.source} sets mqtt.client_id = {config.mqtt.client_id!r}, "
            "which every worker that reads it uses: leave mqtt.client_id unset "
            "so that each worker connects as dslo-hub-<worker id>"
        )
    # A duplicate id with this state file fails at start on its worker lock.
    return (
        f"another worker probably runs with worker id {config.worker_id} on "
        "another machine or with another hub.state_file: give each worker its "
        "own --worker-id"
    )


class HubWorker:
    """One hub worker process.

    Args:
        config: the validated hub configuration; ``config.worker_id`` must
            differ between the workers that share a broker.

    Raises:
        ConfigError: the state file or teacher cannot be used, or another
            worker with this state file runs with the same worker id.
    """

    def __init__(self, config: HubConfig):
        self.config = config
        self.worker_id = config.worker_id
        self.prefix = config.prefix
        self.state = HubState(config.state_file, config.worker_id)
        try:
            # After HubState, which creates the state file's directory.
            self._lock = WorkerLock(config.state_file, config.worker_id)
        except BaseException:
            self.state.close()
            raise
        try:
            self.teacher = TeacherRegistry(config.teacher, self.state)
            if config.requests.enabled:
                _check_top_k(config, self.teacher.class_count)
        except BaseException:
            self.state.close()
            self._lock.release()
            raise
        self.labeller = BatchLabeller(config, self.state, self.teacher)
        self.incoming: queue.Queue[Incoming] = queue.Queue()
        self.stopping = threading.Event()
        self._reload_requested = threading.Event()
        self._drains: dict[str, SessionDrain] = {}
        self._drains_lock = threading.Lock()
        # The last status state received from each peer.
        self._peer_states: dict[str, str] = {}
        # The group of each peer not drained because it is in another group.
        self._skipped_groups: dict[str, Any] = {}
        # The last problem logged with each peer's reconnect_max_s.
        self._reconnect_problems: dict[str, str] = {}
        # When the current connection was accepted (time.monotonic), or
        # None while disconnected.
        self._connected_at: float | None = None
        # Requests that a worker with requests.enabled = false dropped.
        self._dropped_requests = 0
        # Requests published with QoS 0, dropped before they were queued.
        self._qos0_requests = 0
        self._qos0_log = RepeatLimiter(QOS0_LOG_INTERVAL_S, QOS0_LOG_MEMORY)
        self._state_error_log = RepeatLimiter(STATE_ERROR_LOG_INTERVAL_S, 100)
        self._timers = _Timers()
        self.status_topic = worker_status_topic(self.prefix, self.worker_id)
        self.connection = MqttConnection(
            config.mqtt,
            config.client_id,
            will=(self.status_topic, self._status(WORKER_OFFLINE)),
            on_connected=self._on_connected,
            on_message=self._on_message,
            on_disconnected=self._on_disconnected,
            manual_ack=True,
            receive_maximum=RECEIVE_MAXIMUM,
            # Requests are the largest messages a worker receives.
            maximum_packet_size=packet_size_limit(config.requests.max_payload_bytes),
            label=f"hub worker {self.worker_id}",
            takeover_fix=_takeover_fix(config),
        )
        self.labeller.client = self.connection.client
        self.pushes = (
            PushScheduler(config, self.state, self.teacher, self.connection.client)
            if config.pushes
            else None
        )
        self._batcher = threading.Thread(
            target=self._batch_loop, name="dslo-hub-batcher", daemon=True
        )
        self._watchdog = Watchdog(
            f"Hub worker {self.worker_id}",
            self._watched_threads(),
            config.watchdog_stall_s,
            limit_name="hub.watchdog_stall_s",
            exit_note=(
                ", which releases its worker lock so that another worker can "
                "take over its push runs"
            ),
        )

    def _watched_threads(self) -> list[WatchedThread]:
        watched = [
            WatchedThread("batcher", self._batcher.is_alive, self.labeller.progress),
            WatchedThread("MQTT connection", lambda: self.connection.alive),
        ]
        if self.pushes is not None:
            pushes = self.pushes
            watched.append(
                WatchedThread("push scheduler", pushes.is_alive, pushes.progress)
            )
        return watched

    @property
    def counters(self) -> dict[str, int]:
        """Counts of requests, responses and teacher calls of this worker.

        ``unanswerable`` includes the requests published with QoS 0.
        """
        counts = asdict(self.labeller.counters)
        counts["requests"] += self._qos0_requests
        counts["unanswerable"] += self._qos0_requests
        return counts

    # Lifecycle

    def start(self) -> None:
        """Start the batcher, the connection and the push scheduler."""
        current = self.teacher.current
        logger.info(
            "Starting hub worker %s with teacher %s (round %d), broker %s:%d",
            self.worker_id,
            current.version,
            current.round,
            self.config.mqtt.host,
            self.config.mqtt.port,
        )
        if not self.config.requests.enabled:
            logger.info(
                "Hub worker %s serves no label requests (requests.enabled = false)",
                self.worker_id,
            )
        self._warn_short_stall()
        self._batcher.start()
        self.connection.start()
        if self.pushes is not None:
            self.pushes.start()
        self._watchdog.start()
        systemd.notify("READY=1")

    def _warn_short_stall(self) -> None:
        stall_s = self.config.watchdog_stall_s
        puback_wait_s = max(PUSH_PUBACK_WAIT_S, RESPONSE_PUBACK_WAIT_S)
        if stall_s > puback_wait_s:
            return
        logger.warning(
            "Hub worker %s has hub.watchdog_stall_s = %g, not above the %g s that "
            "it may wait for one PUBACK, so a broker that is slow to acknowledge "
            "makes the watchdog end the worker; set hub.watchdog_stall_s above %g",
            self.worker_id,
            stall_s,
            puback_wait_s,
            puback_wait_s,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Serve what was received, then end the session so no request waits."""
        systemd.notify("STOPPING=1")
        self._watchdog.stop()
        client = self.connection.client
        if self.connection.connected.is_set() and self.config.requests.enabled:
            client.unsubscribe(shared_request_filter(self.prefix, self.config.group))
            self._wait_idle(timeout)
        self.stopping.set()
        self._batcher.join(timeout)
        if self.pushes is not None:
            self.pushes.stop()
        with self._drains_lock:
            drains = list(self._drains.values())
        for drain in drains:
            drain.join(timeout)
        self._publish_metrics()
        if self.connection.connected.is_set():
            client.publish(
                self.status_topic,
                self._status(WORKER_STOPPED),
                qos=1,
                retain=True,
            ).wait_for_publish(timeout=5)
        self.connection.stopping.set()
        client.disconnect(properties=end_session_properties())
        self.connection.stop(timeout)
        self.state.close()
        self._lock.release()
        logger.info(
            "Hub worker %s stopped: %s",
            self.worker_id,
            ", ".join(f"{name} {count}" for name, count in self.counters.items()),
        )

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = self.labeller.counters.requests
        while time.monotonic() < deadline:
            time.sleep(STOP_IDLE_S)
            now = self.labeller.counters.requests
            if now == last and self.incoming.empty():
                return
            last = now

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; SIGHUP reloads the teacher."""
        stop_requested = threading.Event()

        def request_stop(signum: int, _frame: object) -> None:
            logger.info("Hub worker %s received signal %d", self.worker_id, signum)
            stop_requested.set()

        def request_reload(_signum: int, _frame: object) -> None:
            self._reload_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGHUP, request_reload)
        self.start()
        while not stop_requested.wait(0.5):
            pass
        self.stop()
        return 0

    def request_reload(self) -> None:
        """Look for a new teacher version before the next batch."""
        self._reload_requested.set()

    # Connection callbacks, on the connection thread

    def _status(self, state: str) -> str:
        # Peers size the grace period of a drain of this worker by
        # reconnect_max_s, so the will (state offline) must contain it.
        return status_payload(
            state,
            self.config.client_id,
            self.config.group,
            reconnect_max_s=self.config.mqtt.reconnect_max_s,
        )

    def connected_at(self) -> float | None:
        """Return when the current connection was accepted, None if disconnected."""
        return self._connected_at

    def peer_state(self, peer: str) -> str | None:
        """Return the last status state received from worker ``peer``."""
        return self._peer_states.get(peer)

    def _on_disconnected(self) -> None:
        self._connected_at = None

    def _on_connected(self, _session_present: bool) -> None:
        self._connected_at = time.monotonic()
        client = self.connection.client
        requests = shared_request_filter(self.prefix, self.config.group)
        if self.config.requests.enabled:
            client.subscribe(requests, qos=1)
        else:
            # A session resumed from a run with requests enabled still has it.
            client.unsubscribe(requests)
        client.subscribe(worker_status_topic(self.prefix, "+"), qos=1)
        client.publish(
            self.status_topic,
            self._status(WORKER_ONLINE),
            qos=1,
            retain=True,
        )
        self._announce_teacher()

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        if message.topic.endswith("/status"):
            self._on_worker_status(message)
            client = self.connection.client
            client.ack(message.mid, message.qos)
            return
        if not self.config.requests.enabled:
            self._drop_request(message)
            return
        self.enqueue(message, self.connection.client)

    def _drop_request(self, message: mqtt.MQTTMessage) -> None:
        """Acknowledge a request that the resumed session held, without a response.

        The device sends it again, and the broker gives it to a worker of the
        group that serves requests, if one runs.
        """
        self._dropped_requests += 1
        if self._dropped_requests == 1:
            logger.warning(
                "Hub worker %s drops the label requests that its resumed session "
                "held, such as one on %s, because requests.enabled = false; the "
                "devices send them again",
                self.worker_id,
                message.topic,
            )
        self.connection.client.ack(message.mid, message.qos)

    def enqueue(
        self,
        message: mqtt.MQTTMessage,
        ack_client: Acknowledger,
        drained_from: str | None = None,
    ) -> None:
        """Queue a request for the batcher; ``ack_client`` acknowledges it.

        ``drained_from`` names the dead peer whose session a drain received
        the request from.
        """
        device = device_of_request_topic(message.topic, self.prefix)
        if message.qos == 0:
            self._drop_qos0_request(device)
            return
        item = Incoming(
            device=device,
            payload=bytes(message.payload),
            response_topic=response_topic_of(message.properties),
            correlation=correlation_of(message.properties),
            redelivered=bool(message.dup) or drained_from is not None,
            ack=_acker(ack_client, message.mid, message.qos),
            received_at=time.monotonic(),
            drained_from=drained_from,
        )
        self.incoming.put(item)

    def _drop_qos0_request(self, device: str | None) -> None:
        """Count and log a request published with QoS 0, which gets no response.

        The broker's flow control (the Receive Maximum) counts only QoS 1 and
        2 messages, so queued QoS 0 requests could fill the worker's memory.
        """
        self._qos0_requests += 1
        name = device or "(no device)"
        skipped = self._qos0_log.skipped_before(name)
        if skipped is None:
            return
        logger.warning(
            "Ignoring a label request from %s published with QoS 0; label "
            "requests need QoS 1%s",
            name,
            repeats_note(skipped, "such request"),
        )

    def _on_worker_status(self, message: mqtt.MQTTMessage) -> None:
        peer = message.topic.split("/")[-2]
        if peer == self.worker_id:
            return
        try:
            status = parse_json(message.payload)
        except ValueError:
            return
        if not isinstance(status, dict) or not isinstance(status.get("state"), str):
            return
        state = status["state"]
        self._peer_states[peer] = state
        with self._drains_lock:
            pending = self._drains.get(peer)
            if pending is not None and pending.is_alive() and not pending.cancelled:
                if state != WORKER_OFFLINE:
                    pending.cancel()
                return
        if state == WORKER_OFFLINE and self._drains_peer(peer, status):
            self._start_drain(peer, status)

    def _drains_peer(self, peer: str, status: dict[str, Any]) -> bool:
        """Return whether this worker may drain ``peer``: only its own group.

        A worker that serves no label requests drains no peer, because a
        drain serves the requests that the peer's session held.
        """
        if not self.config.requests.enabled:
            return False
        group = status.get("group")
        if group == self.config.group:
            return True
        # The broker sends a status again on each reconnect: log it once.
        if self._skipped_groups.get(peer, "") == group:
            return False
        self._skipped_groups[peer] = group
        logger.info(
            "Hub worker %s does not drain %s, which is offline: %s, and this "
            "worker serves group %s",
            self.worker_id,
            peer,
            f"it served group {group}"
            if group
            else "its status names no group (a worker older than this one)",
            self.config.group,
        )
        return False

    def _peer_grace(self, peer: str, status: dict[str, Any]) -> float:
        """Return the grace period before a drain of ``peer``, from its status."""
        peer_max_s, problem = peer_reconnect_max_s(status)
        # The broker sends a status again on each reconnect: log it once.
        if problem and self._reconnect_problems.get(peer) != problem:
            used = "its own" if peer_max_s is None else f"{peer_max_s:g} s as"
            logger.warning(
                "Hub worker %s received an invalid status from %s: %s. It uses "
                "%s reconnect_max_s for the grace period before a drain of %s; "
                "check the mqtt.reconnect_max_s of worker %s",
                self.worker_id,
                peer,
                problem,
                used,
                peer,
                peer,
            )
        self._reconnect_problems[peer] = problem
        return grace_period(self.config.mqtt, peer_max_s)

    def _start_drain(self, peer: str, status: dict[str, Any]) -> None:
        peer_client_id = str(status.get("client_id") or f"dslo-hub-{peer}")
        grace_s = self._peer_grace(peer, status)
        drain = SessionDrain(self, peer, peer_client_id, grace_s)
        with self._drains_lock:
            self._drains[peer] = drain
        logger.info(
            "Hub worker %s drains the session of %s if it stays offline for %g s",
            self.worker_id,
            peer,
            grace_s,
        )
        drain.start()

    # Batcher thread

    def _batch_loop(self) -> None:
        while not (self.stopping.is_set() and self.incoming.empty()):
            self.labeller.progress.beat()
            try:
                self._housekeeping()
            except Exception:  # requests must still be served
                logger.exception(
                    "Hub worker %s failed a teacher check, metrics report or "
                    "clean-up of stored responses; it tries again at the next "
                    "interval",
                    self.worker_id,
                )
            batch = self._collect()
            if not batch:
                continue
            try:
                self.labeller.serve(batch)
            except BrokerError as error:
                logger.warning(
                    "Hub worker %s did not finish serving %d requests: %s. The "
                    "requests stay unacknowledged, so the broker sends them again "
                    "if it kept the session, and they get their stored responses",
                    self.worker_id,
                    len(batch),
                    error,
                )
            except sqlite3.Error as error:
                self._log_state_error(len(batch), error)
                _acknowledge(batch)
            except Exception:  # one bad batch must not stop the worker
                logger.exception(
                    "Hub worker %s failed to serve %d requests; devices resend them",
                    self.worker_id,
                    len(batch),
                )
                _acknowledge(batch)

    def _log_state_error(self, count: int, error: sqlite3.Error) -> None:
        """Log a state file error of the batcher, at most once a minute per message."""
        skipped = self._state_error_log.skipped_before(str(error))
        if skipped is None:
            return
        logger.error(
            "Hub worker %s did not serve %d requests: hub.state_file %s failed "
            "(%s); the devices resend them, and they are served once the file "
            "can be written again%s",
            self.worker_id,
            count,
            self.config.state_file,
            error,
            repeats_note(skipped, "such batch", "such batches"),
        )

    def _collect(self) -> list[Incoming]:
        try:
            first = self.incoming.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        samples = self.labeller.estimate_samples(first)
        settings = self.config.requests
        deadline = time.monotonic() + settings.batch_wait_s
        while samples < settings.batch_max_samples:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self.incoming.get(timeout=remaining)
                    if remaining > 0
                    else self.incoming.get_nowait()
                )
            except queue.Empty:
                break
            batch.append(item)
            samples += self.labeller.estimate_samples(item)
        return batch

    def _housekeeping(self) -> None:
        force = self._reload_requested.is_set()
        self._reload_requested.clear()
        if self.teacher.reload_if_changed(force=force):
            self._announce_teacher()
        now = time.monotonic()
        if now >= self._timers.next_state_check:
            self._timers.next_state_check = now + STATE_CHECK_S
            self._check_state_file()
        if now >= self._timers.next_metrics:
            self._timers.next_metrics = now + self.config.metrics_every_s
            self._publish_metrics()
        if now >= self._timers.next_forget:
            self._timers.next_forget = now + 60.0
            ttl = self.config.requests.answered_ttl_s
            self.state.forget_answers(time.time() - ttl)

    def _check_state_file(self) -> None:
        try:
            self.state.reopen_if_moved()
        except (ConfigError, OSError, sqlite3.Error) as error:
            if str(error) != self._timers.state_error:
                logger.error(
                    "Hub worker %s cannot restore or reopen hub.state_file %s: "
                    "%s; it keeps using its open copy and tries again every %g s",
                    self.worker_id,
                    self.config.state_file,
                    error,
                    STATE_CHECK_S,
                )
            self._timers.state_error = str(error)
            return
        self._timers.state_error = ""

    # Outputs

    def _announce_teacher(self) -> None:
        self.connection.client.publish(
            teacher_topic(self.prefix),
            self.teacher.current.announcement(),
            qos=1,
            retain=True,
        )

    def metrics(self) -> dict[str, Any]:
        """Return this worker's metrics report."""
        current = self.teacher.current
        return {
            "worker": self.worker_id,
            **self.counters,
            "teacher": {"version": current.version, "round": current.round},
            "pushes": self.pushes.counters() if self.pushes else {},
            "queue_depth": self.incoming.qsize(),
            "timestamp": time.time(),
        }

    def _publish_metrics(self) -> None:
        if not self.connection.connected.is_set():
            return
        self.connection.client.publish(
            worker_metrics_topic(self.prefix, self.worker_id),
            json.dumps(self.metrics()),
            qos=1,
            retain=True,
        )


def _acknowledge(batch: list[Incoming]) -> None:
    """Acknowledge requests that failed, which the broker would not send again.

    The connection stays up, so the broker redelivers an unacknowledged
    request only after a reconnect. Until then each one would take one of
    the RECEIVE_MAXIMUM messages that the broker may have in flight to this
    worker, and 1000 of them would stop its deliveries.
    """
    for item in batch:
        item.ack()


def _acker(client: Acknowledger, mid: int, qos: int) -> Callable[[], None]:
    def ack() -> None:
        client.ack(mid, qos)

    return ack
