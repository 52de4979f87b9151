"""The edge daemon: MQTT in, train steps out, checkpoints and metrics.

Threads:
- the connection thread (``MqttConnection``) receives updates and only
  enqueues them, so a slow train step never delays keepalives;
- the trainer thread admits (``dslo_edge.admission``) and applies updates,
  writes checkpoints and pauses while the training budget requires it;
- the watchdog thread checks that both are alive and progressing, pings
  systemd, and exits the process with ``EXIT_WATCHDOG`` if one is not, so the
  service manager restarts it;
- the main thread waits for SIGTERM, SIGINT or SIGHUP, then stops in order.

Delivery is at least once and application exactly once. An update is
acknowledged to the broker (MQTT PUBACK) only once two checkpoint generations
contain its effect and its message id. A crash before that makes the broker
deliver it again, and the restored id record skips any copy already applied.
Waiting for the second generation means that falling back to the previous
checkpoint, when the newest one is corrupt, loses no acknowledged update.

``EdgeDaemon`` takes its start-up restore from ``dslo_edge.daemon_restore``,
and its health checks, rollback, checkpoint saves and acknowledgements from
``dslo_edge.daemon_checkpoints``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import queue
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from dslo_edge import systemd
from dslo_edge.admission import (
    DUPLICATE,
    TRAIN_ERROR,
    AckLedger,
    Received,
    RejectionLog,
    admit,
    check_input_range,
    check_new_and_fresh,
)
from dslo_edge.applied_ids import AppliedIds
from dslo_edge.batching import BatchPolicy, UpdateBatcher
from dslo_edge.bundle import Bundle, load_bundle
from dslo_edge.config import DeviceConfig
from dslo_edge.config_service import METRICS_LOG
from dslo_edge.connection import MqttConnection, packet_size_limit
from dslo_edge.costs import AdaptationCosts
from dslo_edge.daemon_checkpoints import CheckpointsMixin
from dslo_edge.daemon_model_switch import ModelSwitchMixin, ModelUpdateOutcomes

# Re-exported, because callers import these names from dslo_edge.daemon.
from dslo_edge.daemon_restore import APPLIED_IDS as APPLIED_IDS
from dslo_edge.daemon_restore import MISMATCHED_CHECKPOINTS as MISMATCHED_CHECKPOINTS
from dslo_edge.daemon_restore import MISMATCHED_SUFFIX as MISMATCHED_SUFFIX
from dslo_edge.daemon_restore import RestoreMixin
from dslo_edge.dropped_ids import DROPPED_IDS_FILE, DroppedIds
from dslo_edge.errors import BundleError, ConfigError, InvalidUpdate
from dslo_edge.health import HealthGuard, load_device_probe
from dslo_edge.inference import (
    MAX_INPUT_BYTES,
    InferenceService,
    inference_topics,
    make_requester,
)
from dslo_edge.metrics import DaemonMetrics
from dslo_edge.model_update import ModelUpdater
from dslo_edge.models import StudentModel, TeacherModel
from dslo_edge.multihead import AnyUpdate, MultiHeadTrainer, make_trainer
from dslo_edge.multihead_model import load_student
from dslo_edge.ota import MAX_CHUNK_BYTES, ota_topics
from dslo_edge.protocol import STATUS_OFFLINE, STATUS_ONLINE, PayloadLimits
from dslo_edge.signing import load_key
from dslo_edge.state_folders import (
    BUNDLES,
    CHECKPOINTS,
    KEPT_CHECKPOINTS,
    OTA,
    STATE_FOLDERS,
    state_folder_problem,
)
from dslo_edge.state_lock import StateLock
from dslo_edge.swap import ACTIVE

# Re-exported: it was defined here before, and code that imports it from here
# keeps working.
from dslo_edge.systemd import EXIT_WATCHDOG as EXIT_WATCHDOG
from dslo_edge.trainer import Trainer
from dslo_edge.update_queue import UpdateQueue
from dslo_edge.watchdog import Heartbeat, Watchdog, WatchedThread

logger = logging.getLogger(__name__)

INFER_QUEUE = 64
# Two inference payloads of the largest size wait at most. Without it, 64
# payloads of 4 MiB could take 256 MiB.
INFER_QUEUE_BYTES = 2 * MAX_INPUT_BYTES
OTA_QUEUE = 256
# 256 chunks of ota-send's default 64 KiB. Without it, 256 chunks of 1 MiB
# (the largest --chunk-size) could take 256 MiB. Chunks past the bound wait
# at the broker until the device reconnects, as when the count is reached.
# The memory estimate of ``profiles check`` and ``flash`` counts both bounds.
OTA_QUEUE_BYTES = 16 * 2**20
# Reports in a burst come at most this often. A report at every idle moment
# still shows the hub how far the device has got.
METRICS_MIN_INTERVAL_S = 0.25
# A train step that has not returned after this long counts as a hang.
TRAINER_STALL_S = 60.0
# Maximum wait of the network thread for room in a full update queue.
QUEUE_WAIT_S = 0.5
# The trainer's wait for the next update: long when idle, short in a burst,
# where a longer gap means the broker has stopped sending.
IDLE_WAIT_S = 0.2
BURST_GAP_S = 0.01
# Updates that arrive this soon after a burst gap's acknowledgements show
# that the broker's in-flight window had stopped it.
WINDOW_PROOF_S = 0.05
# Wait between tries of a rollback whose checkpoints could not be read.
ROLLBACK_RETRY_S = 1.0
# Topics of an earlier config get one warning each, up to this many topics.
# The messages of further topics are still dropped and counted.
MAX_STRAY_TOPICS = 64


def maximum_packet_bytes(limits: PayloadLimits) -> int:
    """Return the largest MQTT packet that the device's broker may send it.

    ``packet_size_limit`` of the largest payload the device takes: an
    update, an inference input or a model update chunk. An update somewhat
    over ``limits.max_payload_bytes`` still arrives and is rejected as
    ``too_large``, and the hub's push names the fix: smaller batches.
    """
    return packet_size_limit(
        max(limits.max_payload_bytes, MAX_INPUT_BYTES, MAX_CHUNK_BYTES)
    )


def burst_checkpoint_every(
    checkpoint_every: int, queue_size: int, ack_window: int | None
) -> int:
    """Return the updates between checkpoints while more wait in the queue.

    An update is acknowledged after two checkpoints, so a save every k
    updates keeps up to 2k unacknowledged. k is half of the broker's
    window: 3/4 of queue_size (the receive maximum that the device
    requests), or ``ack_window`` when the broker stopped there. It is never
    below ``checkpoint_every``.
    """
    window = queue_size * 3 // 4
    if ack_window is not None:
        window = min(window, ack_window)
    return max(checkpoint_every, window // 2)


def _load_hmac_key(config: DeviceConfig) -> bytes | None:
    """Read the key that ``security.hmac_key_file`` names, if it names one.

    Raises:
        ConfigError: the key file is unreadable or does not contain a valid
            key. The message names the config file and the key.
    """
    key_file = config.security.hmac_key_file
    if key_file is None:
        return None
    try:
        return load_key(key_file)
    except ConfigError as error:
        raise ConfigError(
            f"{config.source}: security.hmac_key_file = {str(key_file)!r}: {error}"
        ) from error


class EdgeDaemon(RestoreMixin, CheckpointsMixin, ModelSwitchMixin):
    """Receives soft-label updates for one device and trains its student."""

    def __init__(self, config: DeviceConfig):
        self.config = config
        self.device_id = config.device_id
        self.topics = config.topics
        self.hmac_key = _load_hmac_key(config)
        # Before the lock, so a mistyped profile leaves no state_dir behind.
        self.profile = _load_profile(config)

        self._state_lock = StateLock(config.state_dir, self.device_id)
        try:
            # The active release is read from bundles/ in _init_model.
            self._check_state_folders(BUNDLES, OTA, KEPT_CHECKPOINTS)
            self._init_model()
            self._init_costs_and_inference()
            self._init_queues_and_state()
            self._init_threads_and_connection()
        except BaseException:
            self._state_lock.release()
            raise

    def _init_model(self) -> None:
        """Load the active bundle, its student and trainer, and the OTA updater."""
        config = self.config
        self.ota_topic, self.ota_status_topic = ota_topics(self.topics)
        self.updater = ModelUpdater(
            config.state_dir,
            lambda bundle: load_student(bundle, config.runtime),
            hmac_key=self.hmac_key,
            topic=self.ota_topic,
        )
        self.bundle = self._load_active_bundle()
        self.student = load_student(self.bundle, config.runtime)
        self.trainer = self._new_trainer()
        self.applied_ids = AppliedIds(config.training.applied_id_capacity)
        # A rollback drops the updates applied since the last save, which all
        # still lack their PUBACK, and the broker sends at most queue_size QoS 1
        # updates without one (the MQTT 5 receive maximum). NOTE: QoS 0 updates
        # have no such limit, so more ids can be dropped than headroom allows.
        self.dropped_ids = DroppedIds(
            self.checkpoint_dir / DROPPED_IDS_FILE,
            config.training.applied_id_capacity,
            headroom=config.training.queue_size,
        )

    def _load_active_bundle(self) -> Bundle:
        """Load the installed over-the-air release, else device.bundle.

        Raises:
            BundleError: the bundle is missing or corrupt, or its probe set
                does not fit the student. For a release, the message also
                gives the steps back to device.bundle, because the daemon
                cannot receive a new release without starting.
        """
        path = self._active_bundle_path()
        try:
            bundle = load_bundle(path)
            # Checked here so that a release gets the steps below.
            # _new_health_guard logs the warning.
            load_device_probe(bundle)
            return bundle
        except BundleError as error:
            if path == self.config.bundle:
                raise
            link = self.updater.store.folder / ACTIVE
            # The daemon stops here, before it connects, so it cannot receive
            # another release over the air until it starts from device.bundle.
            raise BundleError(
                f"{error}; this is the over-the-air release that {link} points "
                f"to, and the daemon cannot start to receive another one: stop "
                f"the daemon, remove {link} so that it starts from device.bundle "
                f"{self.config.bundle}, then send a new release with "
                "'dslo-edge ota-send'"
            ) from error

    def _active_bundle_path(self) -> Path:
        """Return the installed over-the-air release, else device.bundle."""
        configured = self.config.bundle
        active = self.updater.active_bundle(configured)
        if active != configured:
            # A changed device.bundle, for example from a new flash, is not
            # loaded while a release is active, so log which one runs.
            logger.info(
                "Device %s runs the over-the-air release in %s, not device.bundle "
                "%s, which is used only until the first release is installed; "
                "send a bundle with 'dslo-edge ota-send' to replace the release",
                self.device_id,
                active,
                configured,
            )
        return active

    def _init_costs_and_inference(self) -> None:
        """Set up the energy budget, health checks and the inference service."""
        config = self.config
        self.costs = AdaptationCosts(
            self.device_id, self.profile, config.budget, battery_wh=config.battery_wh
        )
        self.health = self._new_health_guard()
        self.metrics = DaemonMetrics()
        self.requester = None
        # Latency of each admitted labels response by its request id, until
        # its labels are applied and the requester counts it as answered.
        self._response_latencies: dict[bytes, float] = {}
        self._check_requests_fit(self.bundle)
        if config.requests.enabled:
            self.requester = make_requester(
                self.device_id, config.mqtt.topic_prefix, config.requests
            )
        self.infer_topic, predictions_topic = inference_topics(self.topics)
        self.inference = InferenceService(
            self._publish_inference,
            predictions_topic,
            self.requester,
            self._new_reference(self.bundle),
            self.costs.infer_ms,
            self.config.max_abs_input,
        )

    def _new_reference(self, bundle: Bundle) -> TeacherModel | None:
        """Load the bundle's teacher when the label request rule compares with it."""
        if self.requester is None or self.config.requests.rule == "confidence":
            return None
        return TeacherModel(
            bundle.teacher_path, bundle.teacher_output_kind, self.config.runtime
        )

    def _init_queues_and_state(self) -> None:
        """Create the bounded queues, the batcher and the counters."""
        training = self.config.training
        self.ota_chunks: UpdateQueue[Received] = UpdateQueue(OTA_QUEUE, OTA_QUEUE_BYTES)
        self.model_updates = ModelUpdateOutcomes()
        self.infer_inputs: UpdateQueue[Received] = UpdateQueue(
            INFER_QUEUE, INFER_QUEUE_BYTES
        )
        self.batcher: UpdateBatcher[Received, AnyUpdate] | None = None
        if training.batch_size:
            policy = BatchPolicy(
                training.batch_size,
                training.batch_wait_ms / 1000,
                max_batches=8,
                max_updates=training.checkpoint_every,
            )
            self.batcher = UpdateBatcher(policy)
        # The broker is asked for at most queue_size unacknowledged updates
        # (MQTT 5 receive maximum), and the spare room covers redeliveries.
        self.updates: UpdateQueue[Received] = UpdateQueue(
            training.queue_size * 2, training.max_queued_bytes
        )
        self.stopping = threading.Event()
        self.restored_from = "factory weights"
        self.storage_error: str | None = None
        # The error behind storage_error, for the fix in an OTA status.
        self._storage_failure: OSError | None = None
        self.checkpoints_written = 0
        self.rollbacks = 0
        self.last_rollback: str | None = None
        # The health problem of a rollback that could not read the
        # checkpoints. Training waits until the rollback is done.
        self._pending_rollback: str | None = None
        self.deferred = 0
        self.inference_rejected: Counter[str] = Counter()
        self._deferred_since_reconnect = False
        # True once a full queue was logged, until the reconnect after it.
        # Separate from the flag above, which a rollback also sets.
        self._queue_full_logged = False
        self._ota_full_logged = False
        self._infer_full_logged = False
        self._session_epoch = 0
        self._acks = AckLedger()
        # True from restoring a checkpoint until the next save. The restored
        # ids may be in the newest generation only, so until then a rejected
        # duplicate is acknowledged after checkpoints, like an applied update.
        self._restored_unconfirmed = False
        # The checkpoint that contains the updates saved once: the last one saved,
        # or the one restored at start.
        self._newest_saved: str | None = None
        self._unsaved = 0
        # Message ids of the updates applied since the last save, which a
        # rollback drops.
        self._unsaved_ids: list[bytes] = []
        self._dropped_ids_failed = False
        self._reserve_failed = False
        self._changed_since_save = False
        self._in_burst = False
        # Largest count of unacknowledged updates at which the broker was
        # seen to stop in a burst, or None.
        self._ack_window: int | None = None
        # (unacknowledged count, time) of the last burst gap's save.
        self._gap: tuple[int, float] | None = None
        self._since_probe = 0
        self._paused_reason: str | None = None
        self._trainer_paused = False
        self._last_update_at = time.monotonic()
        self._trainer_progress = Heartbeat()
        self._last_metrics_at = float("-inf")
        # True when the rate limit skipped a report that is not yet sent.
        self._metrics_pending = False
        self._last_logged_at = float("-inf")
        # The last report sent over MQTT but not written to the metrics log.
        self._unlogged_report: str | None = None
        self._rejection_log = RejectionLog()
        self._metrics_log = self._make_metrics_log()

    def _init_threads_and_connection(self) -> None:
        """Create the trainer and watchdog threads and the MQTT connection."""
        self._trainer_thread = threading.Thread(
            target=self._train_loop, name="dslo-trainer", daemon=True
        )
        self._watchdog_thread = Watchdog(
            f"Device {self.device_id}",
            [
                WatchedThread(
                    "trainer", self._trainer_thread.is_alive, self._trainer_progress
                ),
                WatchedThread("MQTT connection", lambda: self.connection.alive),
            ],
            TRAINER_STALL_S,
            stopped=self.stopping,
        )
        self.connection = MqttConnection(
            self.config.mqtt,
            self.config.client_id,
            will=(self.topics.status, STATUS_OFFLINE),
            on_connected=self._on_connected,
            on_message=self._on_message,
            on_disconnected=self._on_disconnected,
            manual_ack=True,
            receive_maximum=self.config.training.queue_size,
            maximum_packet_size=maximum_packet_bytes(self.config.limits),
            label=f"device {self.device_id}",
        )
        # Set while the broker has confirmed this connection's subscriptions, so
        # that a caller can tell that updates published from now on reach the
        # device. Cleared when the connection drops.
        self.subscribed = threading.Event()
        self._subscribe_mid: int | None = None
        self._subscriptions: list[tuple[str, int]] = []
        # Topics of an earlier config that already got their one warning, at
        # most MAX_STRAY_TOPICS of them.
        self._stray_topics: set[str] = set()
        self.stray_dropped = 0
        self.connection.client.on_subscribe = self._on_subscribed

    def _check_requests_fit(self, bundle: Bundle) -> None:
        """Raise ConfigError if label requests are enabled for a multi-head student."""
        if self.config.requests.enabled and bundle.is_multi_head:
            raise ConfigError(
                f"{self.config.source}: requests.enabled = true needs a single-head "
                f"student, but {bundle.path} has the heads "
                f"{', '.join(bundle.heads)}; set requests.enabled = false"
            )

    def _new_trainer(
        self, student: StudentModel | None = None
    ) -> Trainer | MultiHeadTrainer:
        """Build a trainer for ``student`` (the current one by default).

        Raises:
            ConfigError: a ``[training.tasks.<head>]`` table names a head that
                the student lacks.
        """
        config = self.config
        try:
            return make_trainer(
                student or self.student,
                config.training,
                config.limits,
                config.sum_tolerance,
            )
        except ConfigError as error:
            raise ConfigError(f"{config.source}: {error}") from error

    @property
    def checkpoint_dir(self) -> Path:
        return self.config.state_dir / CHECKPOINTS

    @property
    def connected(self) -> threading.Event:
        return self.connection.connected

    @property
    def unacknowledged(self) -> int:
        return len(self._acks)

    def _new_health_guard(self, bundle: Bundle | None = None) -> HealthGuard:
        bundle = bundle or self.bundle
        variables = bundle.manifest["student"].get("variables", {})
        trained = {n for n, v in variables.items() if v.get("kind") == "trained"}
        probe, warning = load_device_probe(bundle)
        if warning is not None:
            logger.warning("Device %s %s", self.device_id, warning)
        return HealthGuard(
            probe,
            self.config.health.max_accuracy_drop,
            self.costs.infer_ms,
            norm_names=trained or None,
        )

    def _make_metrics_log(self) -> logging.Logger:
        settings = self.config.logging
        if settings.metrics_file is None:
            path = self.config.state_dir / METRICS_LOG
            default = f"{METRICS_LOG} in device.state_dir"
            handler = settings.open_file(path, "logging.metrics_file", default)
        else:
            handler = settings.open_file(settings.metrics_file, "logging.metrics_file")
        handler.setFormatter(logging.Formatter("%(message)s"))
        metrics_logger = logging.getLogger(f"dslo_edge.metrics_log.{id(self)}")
        metrics_logger.propagate = False
        metrics_logger.setLevel(logging.INFO)
        metrics_logger.handlers = [handler]
        return metrics_logger

    # Lifecycle

    def start(self) -> None:
        """Restore state, then start the trainer, the watchdog and the connection.

        Raises:
            ConfigError: the newest checkpoint was written by another device,
                or the checkpoints folder in the state directory is a file or
                a broken symlink.
        """
        try:
            self._restore()
        except ConfigError:
            self._state_lock.release()
            raise
        logger.info(
            "Starting device %s with %s (runtime %s, profile %s), broker %s:%d",
            self.device_id,
            self.bundle.path,
            self.student.runtime_name,
            self.profile.name if self.profile else "none",
            self.config.mqtt.host,
            self.config.mqtt.port,
        )
        self._trainer_thread.start()
        self._watchdog_thread.start()
        self.connection.start()
        systemd.notify("READY=1")

    def _check_state_folders(self, *names: str) -> None:
        """Raise ConfigError when a folder of the state directory is a file.

        With a file in place of ``checkpoints`` every save would fail, so no
        update could ever be acknowledged. In place of ``bundles``, ``ota``
        or ``kept-checkpoints`` it would make every over-the-air update fail.
        """
        for name in names:
            folder = self.config.state_dir / name
            problem = state_folder_problem(folder, STATE_FOLDERS[name])
            if problem is not None:
                raise ConfigError(f"{self.config.source}: {problem}")

    def stop(self) -> None:
        """Finish the current step, checkpoint, publish "offline", disconnect."""
        systemd.notify("STOPPING=1")
        self.stopping.set()
        self._trainer_thread.join()
        # Two generations, so every handled update is acknowledged.
        self._checkpoint_and_ack()
        self._checkpoint_and_ack()
        # A pending rollback means that the student must not be saved.
        if self._changed_since_save and self._pending_rollback is None:
            self.save_checkpoint()  # keeps the last rejection counts
        self.publish_metrics()
        if self.connection.connected.is_set():
            info = self.connection.publish(
                self.topics.status, STATUS_OFFLINE, retain=True
            )
            info.wait_for_publish(timeout=5)
        self.connection.stop()
        self._state_lock.release()
        logger.info(
            "Device %s stopped; %d updates left queued for redelivery",
            self.device_id,
            self.updates.qsize(),
        )

    def run(self) -> int:
        """Run until SIGTERM, SIGINT or SIGHUP; return the process exit code."""
        stop_requested = threading.Event()

        def request_stop(signum: int, _frame: object) -> None:
            logger.info(
                "Device %s received signal %d, stopping", self.device_id, signum
            )
            stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        # A closed terminal sends SIGHUP, which would otherwise end the
        # process without a final checkpoint.
        signal.signal(signal.SIGHUP, request_stop)
        self.start()
        # Start-up leaves tens of thousands of long-lived objects: modules,
        # interpreter wrappers and the restored state. A full collection of
        # them took 5 to 15 ms (2-core Xeon, Python 3.11), a pause in the
        # middle of an update. gc.freeze moves them out of the collector's
        # reach. Reference counting still frees them when they are dropped.
        gc.collect()
        gc.freeze()
        try:
            while not stop_requested.wait(0.5):
                pass
            self.stop()
        finally:
            # run() may be called in a process that goes on, such as a test.
            gc.unfreeze()
        return 0

    # Connection callbacks, on the connection thread

    def _on_connected(self, session_present: bool) -> None:
        if not session_present:
            # Packet ids held for acknowledgement belong to the lost session;
            # acknowledging them now could confirm other messages.
            self._session_epoch += 1
        # Subscribing on every connect also covers a broker that lost the session.
        subscriptions = [
            (self.topics.updates, 1),
            (self.ota_topic, 1),
            (self.infer_topic, 1),
        ]
        if self.requester is not None:
            subscriptions.append((self.requester.topics.labels, 1))
        self.subscribed.clear()
        self._subscriptions = subscriptions
        _, self._subscribe_mid = self.connection.client.subscribe(subscriptions)
        self.connection.publish(self.topics.status, STATUS_ONLINE, retain=True)
        if self.config.homeassistant.enabled:
            self._publish_discovery()
        self.publish_metrics()

    def _on_disconnected(self) -> None:
        self.subscribed.clear()

    def _on_subscribed(
        self, _client: Any, _userdata: Any, mid: int, reasons: Any, _props: Any
    ) -> None:
        if mid != self._subscribe_mid:
            return
        rejected = [
            topic
            for (topic, _qos), reason in zip(self._subscriptions, reasons, strict=False)
            if reason.is_failure
        ]
        if rejected:
            logger.error(
                "Device %s: the broker rejected the subscription to %s; give this "
                "client read access to those topics in the broker's access list",
                self.device_id,
                ", ".join(rejected),
            )
            return
        self.subscribed.set()

    def _publish_discovery(self) -> None:
        from dslo_edge.homeassistant import discovery_messages

        model = self.profile.title if self.profile else "dslo-edge device"
        messages = discovery_messages(
            self.device_id,
            self.topics,
            prefix=self.config.homeassistant.prefix,
            model=model,
        )
        for topic, payload in messages:
            self.connection.publish(topic, payload, retain=True)

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        item = Received(
            bytes(message.payload),
            message.mid,
            message.qos,
            time.time(),
            epoch=self._session_epoch,
            connection=self.connection.connects,
        )
        if message.topic == self.ota_topic:
            try:
                self.ota_chunks.put_nowait(item)
            except queue.Full:
                # Left unacknowledged. A broker sends it again only on a
                # reconnect, which the trainer makes once it is idle.
                self._deferred_since_reconnect = True
                if not self._ota_full_logged:
                    self._ota_full_logged = True
                    logger.warning(
                        "Device %s model update chunk queue is full (%d of at "
                        "most %d chunks, %d of at most %d bytes); leaving chunks "
                        "for redelivery after the queue drains",
                        self.device_id,
                        self.ota_chunks.qsize(),
                        self.ota_chunks.maxsize,
                        self.ota_chunks.queued_bytes,
                        self.ota_chunks.max_bytes,
                    )
            return
        if message.topic == self.infer_topic:
            self._queue_inputs(item)
            return
        if self.requester is not None and message.topic == self.requester.topics.labels:
            response = self.requester.match(message)
            if response.kind != "ok":
                # Refusals, repeats and strays change nothing to make durable.
                self.connection.ack(message.mid, message.qos)
                # No update follows, so the idle trainer publishes their count.
                self._metrics_pending = True
                return
            item = Received(
                item.payload,
                item.mid,
                item.qos,
                item.received_at,
                response,
                epoch=item.epoch,
            )
        elif message.topic != self.topics.updates:
            self._drop_stray(message)
            return
        try:
            self.updates.put(item, timeout=self._queue_wait_s())
        except queue.Full:
            # Drop policy: the update is left unacknowledged, and once the
            # queue has drained the trainer reconnects, so the broker sends it
            # again. Brokers that ignore receive-maximum (mosquitto 2.0.11
            # after the first PUBACK, MQTT 3.1.1) can overrun the queue.
            self.deferred += 1
            self._deferred_since_reconnect = True
            if not self._queue_full_logged:
                self._queue_full_logged = True
                logger.warning(
                    "Device %s update queue is full (%d updates of at most %d, "
                    "twice training.queue_size; %d payload bytes of "
                    "training.max_queued_bytes = %d); leaving updates for "
                    "redelivery after the queue drains",
                    self.device_id,
                    self.updates.qsize(),
                    self.updates.maxsize,
                    self.updates.queued_bytes,
                    self.updates.max_bytes,
                )

    def _publish_inference(
        self, topic: str, payload: bytes | str, properties: Properties | None = None
    ) -> mqtt.MQTTMessageInfo:
        """Publish a prediction or a label request on the connection."""
        return self.connection.publish(topic, payload, properties=properties)

    def _drop_stray(self, message: mqtt.MQTTMessage) -> None:
        """Acknowledge and drop a message on a topic this config does not use.

        A resumed broker session keeps the subscriptions of an earlier
        config, for example one with another mqtt.topic_prefix, and the
        broker goes on sending their messages. They are neither trained on
        nor checked against this config's topics, and unsubscribing ends them.
        The metrics' ``stray_dropped`` counts them.
        """
        self.connection.ack(message.mid, message.qos)
        self.stray_dropped += 1
        # Each stray message sends the unsubscribe again, because an earlier
        # one may have been lost with a connection.
        self.connection.client.unsubscribe(message.topic)
        if (
            message.topic in self._stray_topics
            or len(self._stray_topics) >= MAX_STRAY_TOPICS
        ):
            return
        self._stray_topics.add(message.topic)
        logger.warning(
            "Device %s dropped a message on %s, which its config does not "
            "subscribe to; its broker session kept that subscription from an "
            "earlier config, such as one with another mqtt.topic_prefix, so the "
            "device unsubscribes from it. Point the hub at %s",
            self.device_id,
            message.topic,
            self.topics.updates,
        )

    def _queue_wait_s(self) -> float:
        """Return how long the network thread may wait for queue room.

        While it waits it reads nothing, so TCP flow control keeps the
        broker's next messages back. That is worth it only while the
        trainer drains the queue. A paused or stopping trainer does not, so
        the update is then deferred at once.
        """
        if self.stopping.is_set() or self._trainer_paused:
            return 0.0
        return QUEUE_WAIT_S

    def _queue_inputs(self, item: Received) -> None:
        try:
            self.infer_inputs.put_nowait(item)
        except queue.Full:
            self.inference_rejected["queue_full"] += 1
            self._metrics_pending = True
            self.connection.ack(item.mid, item.qos)
            # Logged once until the trainer empties the queue again.
            if not self._infer_full_logged:
                self._infer_full_logged = True
                logger.warning(
                    "Device %s rejected an inference payload of %d bytes "
                    "(queue_full): %d of at most %d payloads wait, %d of at "
                    "most %d bytes; publish the next inputs after their "
                    "predictions",
                    self.device_id,
                    len(item.payload),
                    self.infer_inputs.qsize(),
                    self.infer_inputs.maxsize,
                    self.infer_inputs.queued_bytes,
                    self.infer_inputs.max_bytes,
                )

    # Trainer thread

    def _answer_inputs(self) -> None:
        """Handle queued inference payloads, which come before training."""
        self.inference.requests_paused = self._trainer_paused
        if self.infer_inputs.empty():
            self._infer_full_logged = False
        request_counts = self._request_counts()
        while not self.infer_inputs.empty():
            item = self.infer_inputs.get_nowait()
            try:
                self.inference.handle(item.payload, self.student)
            except InvalidUpdate as error:
                # Counted apart from updates, because hubs pace on those counts.
                self.inference_rejected[error.reason] += 1
                # Published when the trainer is next idle, not only with updates.
                self._metrics_pending = True
                logger.warning(
                    "Rejected inference input for device %s (%s): %s",
                    self.device_id,
                    error.reason,
                    error,
                )
            finally:
                self.connection.ack(item.mid, item.qos)
        self.inference.resend_due()
        if self._request_counts() != request_counts:
            # Sent, resent and abandoned label requests change no update
            # count, so the idle trainer publishes them.
            self._metrics_pending = True

    def _request_counts(self) -> dict[str, int]:
        if self.requester is None:
            return {}
        return self.requester.counters.counts()

    def _train_loop(self) -> None:
        while not self.stopping.is_set():
            self._trainer_progress.beat()
            try:
                self._answer_inputs()
            except Exception:  # a failed inference must not stop training
                logger.exception(
                    "Device %s failed to handle an inference input", self.device_id
                )
            try:
                self._apply_model_updates()
            except Exception:  # a bad bundle must not stop training
                logger.exception(
                    "Device %s failed to apply a model update", self.device_id
                )
            if self._pending_rollback is not None:
                if not self.stopping.wait(ROLLBACK_RETRY_S):
                    self._check_health()
                continue
            if self._budget_paused():
                self.stopping.wait(0.5)
                continue
            try:
                self._take_and_train()
            except queue.Empty:
                if self._in_burst:
                    self._on_burst_gap()
                else:
                    self._on_idle()
                continue
            if (
                self.updates.empty()
                or self.metrics.processed % self.config.training.metrics_every == 0
            ):
                self.publish_metrics(busy=True)

    def _budget_paused(self) -> bool:
        """Check the budget; while paused, updates wait in the queue."""
        decision = self.costs.decision()
        if decision.reason != self._paused_reason:
            self._paused_reason = decision.reason
            self.publish_metrics()
        self._trainer_paused = decision.paused
        return decision.paused

    def _on_idle(self) -> None:
        if self._metrics_pending:
            self.publish_metrics()
        elif self._unlogged_report is not None:
            # The log ends a burst with its last report, as MQTT does.
            self._last_logged_at = time.monotonic()
            self._metrics_log.info(self._unlogged_report)
            self._unlogged_report = None
        if self._deferred_since_reconnect and self.ota_chunks.empty():
            # Chunks still queued are handled first, so they get their PUBACK
            # on the connection that delivered them.
            self._checkpoint_and_ack()
            self._checkpoint_and_ack()
            self._deferred_since_reconnect = False
            self._queue_full_logged = False
            self._ota_full_logged = False
            logger.info(
                "Device %s reconnects to receive the updates it left queued",
                self.device_id,
            )
            self.connection.request_reconnect()
            return
        if not self.unacknowledged and not self._unsaved:
            return
        if (
            self._unsaved == 0
            and self._acks.only_unsaved
            and not self._restored_unconfirmed
        ):
            # Only rejected updates are waiting: nothing to make durable.
            self._send_acks(self._acks.release_unsaved())
            self.publish_metrics()
            return
        idle_s = time.monotonic() - self._last_update_at
        if idle_s >= self.config.training.checkpoint_idle_s:
            self._checkpoint_and_ack()
            self.publish_metrics()

    def _take_and_train(self) -> None:
        """Train on the next queued update, or a coalesced batch of them.

        Raises:
            queue.Empty: nothing arrived within ``IDLE_WAIT_S``, or within
                ``BURST_GAP_S`` in a burst.
        """
        timeout = BURST_GAP_S if self._in_burst else IDLE_WAIT_S
        if self.batcher is None:
            item = self.updates.get(timeout=timeout)
            update = self._admit_or_reject(item)
            updates = [update] if update is not None else []
        else:
            updates = self.batcher.gather(
                self.updates, self._admit_or_reject, timeout=timeout
            )
        try:
            self._apply_all(updates)
        except Exception:  # one bad update must not stop the trainer
            for update in updates:
                self._response_latencies.pop(update.message_id, None)
                self.metrics.record_rejected(TRAIN_ERROR)
            logger.exception(
                "Device %s failed to apply %d updates", self.device_id, len(updates)
            )
        self._after_updates()

    def _admit_or_reject(self, item: Received) -> AnyUpdate | None:
        """Admit one queued item, or count and log its rejection.

        Exceptions are caught here, because ``UpdateBatcher.gather`` would lose
        the items it took before a raising call.
        """
        self._last_update_at = time.monotonic()
        self._changed_since_save = True
        self._acks.add(item.mid, item.qos, item.epoch)
        started = time.perf_counter()
        queue_ms = (time.time() - item.received_at) * 1000
        try:
            update = self._admit(item)
            self.metrics.record_admission(
                queue_ms, (time.perf_counter() - started) * 1000
            )
            return update
        except InvalidUpdate as error:
            if error.reason == DUPLICATE:
                self._acks.mark_duplicate()
            self._reject(error)
        except Exception:
            self.metrics.record_rejected(TRAIN_ERROR)
            logger.exception("Device %s failed to admit an update", self.device_id)
        return None

    def _after_updates(self) -> None:
        training = self.config.training
        probe_every = self.config.health.probe_every
        if probe_every and self._since_probe >= probe_every:
            self._check_health()
        if self._gap is not None:
            waiting, saved_at = self._gap
            self._gap = None
            if time.monotonic() - saved_at <= WINDOW_PROOF_S:
                self._ack_window = max(self._ack_window or 0, waiting)
        every = training.checkpoint_every
        if not self.updates.empty():
            self._in_burst = True
            every = burst_checkpoint_every(
                training.checkpoint_every, training.queue_size, self._ack_window
            )
        if (
            self._unsaved >= every
            or self.unacknowledged >= training.queue_size * 3 // 4
        ):
            self._checkpoint_and_ack()

    def _on_burst_gap(self) -> None:
        """Release acknowledgements when a burst stops for ``BURST_GAP_S``.

        The broker may have stopped because its own in-flight window is
        full of updates that wait for checkpoints. With at least
        ``checkpoint_every`` of them, saving now lets their acknowledgements
        go out, twice when none has its first checkpoint yet. If updates
        then arrive at once, the window was the cause, and
        ``_after_updates`` lowers the burst interval to fit it.

        NOTE: only mosquitto 2.0.11 was tested, and it enforces its window
        only until the first PUBACK. No broker that enforces a window
        throughout a burst has run this path.
        """
        self._in_burst = False
        waiting = self.unacknowledged
        if waiting < self.config.training.checkpoint_every:
            return
        if self._acks.only_unsaved:
            self._checkpoint_and_ack()
        self._checkpoint_and_ack()
        self._gap = (waiting, time.monotonic())
        # Once every update is saved and acknowledged, the idle loop publishes
        # nothing, so this report is the one that shows the released acks.
        self.publish_metrics()

    def _admit(self, item: Received) -> AnyUpdate:
        if item.response is None:
            return admit(
                item,
                self.trainer,
                self.applied_ids,
                self.config.training,
                hmac_key=self.hmac_key,
                topic=self.topics.updates,
                max_abs_input=self.config.max_abs_input,
                dropped_ids=self.dropped_ids,
            )
        assert self.requester is not None
        if not isinstance(self.trainer, Trainer):
            # A model update switched to a multi-head student after start.
            raise InvalidUpdate(
                "shape_mismatch",
                "label responses are single-head updates, but the student now "
                "has several heads",
            )
        update = self.requester.labels_update(
            item.response, self.trainer.decode, self.hmac_key
        )
        check_input_range(update, self.config.max_abs_input)
        check_new_and_fresh(
            update,
            item.received_at,
            self.applied_ids,
            self.config.training,
            dropped_ids=self.dropped_ids,
        )
        self._response_latencies[update.message_id] = item.response.latency_s
        return update

    def _reject(self, error: InvalidUpdate) -> None:
        self.metrics.record_rejected(error.reason)
        should_log, suppressed = self._rejection_log.should_log(
            error.reason, time.monotonic()
        )
        if suppressed:
            logger.warning(
                "Device %s suppressed %d log lines for rejected updates (%s)",
                self.device_id,
                suppressed,
                error.reason,
            )
        if should_log:
            logger.warning(
                "Rejected update %s for device %s (%s): %s",
                error.message_id or "(no id)",
                self.device_id,
                error.reason,
                error,
            )

    def _apply_all(self, updates: list[AnyUpdate]) -> None:
        if not updates:
            return
        # Typed loosely because each update was decoded by this trainer, so
        # it has the kind that the trainer applies.
        trainer: Any = self.trainer
        self.costs.begin_step()
        if self.batcher is None:
            results = [trainer.apply(update) for update in updates]
        else:
            results = trainer.apply_many(updates, self.batcher.policy.batch_size)
        self.costs.end_step(len(updates))
        now = time.time()
        for update, result in zip(updates, results, strict=True):
            self.applied_ids.add(update.message_id)
            self._unsaved += 1
            self._unsaved_ids.append(update.message_id)
            self._since_probe += 1
            # Counted before record_applied, so a report that counts this
            # update as applied also counts its response as answered.
            latency_s = self._response_latencies.pop(update.message_id, None)
            if latency_s is not None and self.requester is not None:
                self.requester.record_answered(latency_s)
            self.metrics.record_applied(
                result.samples,
                result.loss,
                result.mean_alpha,
                result.train_ms,
                (now - update.timestamp) * 1000,
                prepare_ms=result.prepare_ms,
            )

    # Outputs

    def status_report(self) -> dict[str, Any]:
        extra = {
            "pid": os.getpid(),
            "progress": round(self.trainer.progress, 4),
            "applied_total": self.trainer.applied_updates,
            "restored_from": self.restored_from,
            "queue_depth": self.updates.qsize(),
            "unacknowledged": self.unacknowledged,
            "deferred_for_redelivery": self.deferred,
            "inference_rejected": dict(self.inference_rejected),
            "stray_dropped": self.stray_dropped,
            "model_updates": self.model_updates.report(),
            # Survives restarts (both parts are in the checkpoints), so a hub
            # can pace against it across a device restart.
            "processed_total": self.trainer.applied_updates
            + sum(self.metrics.rejected_counts().values()),
            "checkpoints_written": self.checkpoints_written,
            "unsaved": self._unsaved,
            "storage_error": self.storage_error,
            "probe_accuracy": self.health.last_accuracy,
            "rollbacks": self.rollbacks,
            "last_rollback": self.last_rollback,
            "session_takeovers": self.connection.takeovers,
            "connects": self.connection.connects,
            "teacher": self.trainer.teacher_snapshot(),
            "dynamic": self.trainer.dynamic_metrics(),
            "label_requests": self._request_report(),
            **self.costs.report(),
        }
        if self.bundle.is_multi_head:
            # probe_accuracy is then the mean over the heads.
            extra["probe_accuracy_heads"] = self.health.last_head_accuracy
        return self.metrics.snapshot(self.device_id, extra)

    def _request_report(self) -> dict[str, Any] | None:
        if self.requester is None:
            return None
        counters = self.requester.counters
        report: dict[str, Any] = counters.counts()
        latencies = [s * 1000 for s in counters.latencies_s]
        if latencies:
            report["latency_ms_p50"] = round(float(np.percentile(latencies, 50)), 3)
            report["latency_ms_p95"] = round(float(np.percentile(latencies, 95)), 3)
        return report

    def publish_metrics(self, busy: bool = False) -> None:
        """Publish the metrics report, retained so a late subscriber receives it.

        With ``busy`` (reports after updates) the report is skipped when the
        last one is under ``METRICS_MIN_INTERVAL_S`` old. The trainer sends
        the skipped report once the queue has stayed empty for 0.2 s. The
        metrics log keeps at most one line a second of the reports after
        updates, and every other report, such as the one at a burst's end.
        A report after updates that goes out unlogged is logged once the
        trainer is idle, unless a later report is logged first.
        """
        now = time.monotonic()
        if busy and now - self._last_metrics_at < METRICS_MIN_INTERVAL_S:
            self._metrics_pending = True
            return
        self._last_metrics_at = now
        self._metrics_pending = False
        payload = json.dumps(self.status_report())
        self.connection.publish(self.topics.metrics, payload, retain=True)
        if not busy or now - self._last_logged_at >= 1.0:
            self._last_logged_at = now
            self._unlogged_report = None
            self._metrics_log.info(payload)
        else:
            self._unlogged_report = payload


def _load_profile(config: DeviceConfig) -> Any:
    if not config.profile:
        return None
    from dslo_edge.profiles import load_profile

    try:
        profile = load_profile(config.profile)
    except ConfigError as error:
        raise ConfigError(
            f"{config.source}: device.profile = {config.profile!r}: {error}"
        ) from error
    machine = platform.machine()
    if profile.architecture != machine:
        # uname -m names the kernel's architecture, which can differ from the
        # OS image's (a 32-bit OS on a 64-bit kernel), so this only warns.
        logger.warning(
            "Device %s: profile %s is for %s systems, but uname -m reports %s "
            "here, so its power model, thermal limit and interpreter wheels may "
            "not fit; set device.profile in %s to a profile for this machine "
            "(dslo-edge profiles list)",
            config.device_id,
            profile.name,
            profile.architecture,
            machine,
            config.source,
        )
    return profile
