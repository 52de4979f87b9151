"""The edge daemon: MQTT in, train steps out, checkpoints and metrics.

Threads:
- paho's network thread receives updates and only enqueues the raw payload;
- one trainer thread decodes, validates and trains, so a slow step never
  blocks MQTT keepalives;
- the main thread waits for SIGTERM or SIGINT and then shuts down in order:
  the trainer finishes the queued updates, a checkpoint is written, and the
  retained status becomes "offline".
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from dslo_edge.bundle import load_bundle
from dslo_edge.checkpoint import load_latest_checkpoint, save_checkpoint
from dslo_edge.config import DeviceConfig
from dslo_edge.errors import InvalidUpdate
from dslo_edge.metrics import DaemonMetrics
from dslo_edge.models import StudentModel
from dslo_edge.protocol import STATUS_OFFLINE, STATUS_ONLINE
from dslo_edge.trainer import Trainer

logger = logging.getLogger(__name__)

QUEUE_FULL = "queue_full"
TRAIN_ERROR = "train_error"


def mqtt_protocol(name: str) -> Any:
    """Return paho's protocol constant for "5" or "3.1.1"."""
    return mqtt.MQTTv5 if name == "5" else mqtt.MQTTv311


class EdgeDaemon:
    """Receives soft-label updates for one device and trains its student."""

    def __init__(self, config: DeviceConfig):
        self.config = config
        self.topics = config.topics
        self.bundle = load_bundle(config.bundle)
        self.student = StudentModel(self.bundle, config.runtime)
        self.trainer = Trainer(
            self.student, config.training, config.limits, config.sum_tolerance
        )
        self.metrics = DaemonMetrics()
        self.updates: queue.Queue[tuple[bytes, float]] = queue.Queue(
            maxsize=config.training.queue_size
        )
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.restored_from = "factory weights"
        self._unsaved = 0
        self._trainer_thread = threading.Thread(
            target=self._train_loop, name="dslo-trainer", daemon=True
        )
        self.client = self._make_client()

    @property
    def checkpoint_dir(self) -> Path:
        return self.config.state_dir / "checkpoints"

    def _make_client(self) -> mqtt.Client:
        protocol = mqtt_protocol(self.config.mqtt.protocol)
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=protocol,
        )
        client.will_set(self.topics.status, STATUS_OFFLINE, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # Lifecycle

    def start(self) -> None:
        """Restore state, start the trainer thread and connect in the background."""
        self._restore()
        self._trainer_thread.start()
        mqtt_settings = self.config.mqtt
        logger.info(
            "Starting device %s with %s (runtime %s), broker %s:%d",
            self.config.device_id,
            self.bundle.path,
            self.student.runtime_name,
            mqtt_settings.host,
            mqtt_settings.port,
        )
        # connect_async + loop_start keep retrying while the broker is down.
        self.client.connect_async(
            mqtt_settings.host, mqtt_settings.port, mqtt_settings.keepalive
        )
        self.client.loop_start()

    def _restore(self) -> None:
        checkpoint = load_latest_checkpoint(self.checkpoint_dir)
        if checkpoint is None:
            logger.info(
                "Device %s starts from the factory weights", self.config.device_id
            )
            return
        self.trainer.restore(checkpoint)
        self.restored_from = checkpoint.path.name
        logger.info(
            "Device %s restored %s (%d updates applied before)",
            self.config.device_id,
            checkpoint.path.name,
            self.trainer.applied_updates,
        )

    def stop(self) -> None:
        """Drain queued updates, checkpoint, publish "offline" and disconnect."""
        self.stopping.set()
        self._trainer_thread.join()
        self.save_checkpoint()
        self.publish_metrics()
        info = self.client.publish(
            self.topics.status, STATUS_OFFLINE, qos=1, retain=True
        )
        if self.connected.is_set():
            info.wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()
        logger.info("Device %s stopped", self.config.device_id)

    def run(self) -> None:
        """Run until SIGTERM or SIGINT, then stop cleanly."""
        stop_requested = threading.Event()

        def request_stop(signum: int, _frame: object) -> None:
            logger.info(
                "Device %s received signal %d, stopping", self.config.device_id, signum
            )
            stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.start()
        while not stop_requested.wait(0.5):
            pass
        self.stop()

    # MQTT callbacks run on paho's network thread.

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            logger.error("Broker refused device %s: %s", self.config.device_id, reason)
            return
        # Subscribing here renews the subscription after every reconnect.
        client.subscribe(self.topics.updates, qos=1)
        client.publish(self.topics.status, STATUS_ONLINE, qos=1, retain=True)
        self.connected.set()
        logger.info(
            "Device %s connected, subscribed to %s",
            self.config.device_id,
            self.topics.updates,
        )
        self.publish_metrics()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason: Any,
        _props: Any,
    ) -> None:
        self.connected.clear()
        if not self.stopping.is_set():
            logger.warning(
                "Device %s lost the broker connection (%s); retrying every 1 to 30 s",
                self.config.device_id,
                reason,
            )

    def _on_message(
        self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        try:
            self.updates.put_nowait((bytes(message.payload), time.time()))
        except queue.Full:
            # Drop policy: the newest update is dropped and counted, because
            # blocking here would stall keepalives for every other message.
            self.metrics.record_rejected(QUEUE_FULL)
            logger.warning(
                "Device %s dropped an update: queue of %d is full",
                self.config.device_id,
                self.updates.maxsize,
            )

    # Trainer thread

    def _train_loop(self) -> None:
        while True:
            try:
                payload, received = self.updates.get(timeout=0.2)
            except queue.Empty:
                if self.stopping.is_set():
                    return
                continue
            try:
                self._handle(payload)
            except Exception:  # keep the trainer alive whatever one update does
                self.metrics.record_rejected(TRAIN_ERROR)
                logger.exception(
                    "Device %s failed to apply an update", self.config.device_id
                )
            if self.updates.empty():
                self.publish_metrics()

    def _handle(self, payload: bytes) -> None:
        try:
            update = self.trainer.decode(payload)
        except InvalidUpdate as error:
            self.metrics.record_rejected(error.reason)
            logger.warning(
                "Rejected update %s for device %s (%s): %s",
                error.message_id or "(no id)",
                self.config.device_id,
                error.reason,
                error,
            )
            return
        result = self.trainer.apply(update)
        end_to_end_ms = (time.time() - update.timestamp) * 1000
        self.metrics.record_applied(
            result.samples,
            result.loss,
            result.mean_alpha,
            result.train_ms,
            end_to_end_ms,
        )
        self._unsaved += 1
        training = self.config.training
        if self._unsaved >= training.checkpoint_every:
            self.save_checkpoint()
        if self.metrics.applied % training.metrics_every == 0:
            self.publish_metrics()

    # Outputs

    def save_checkpoint(self) -> None:
        """Write a checkpoint if anything was applied since the last one."""
        if self._unsaved == 0:
            return
        tensors, state = self.trainer.checkpoint_content()
        try:
            path = save_checkpoint(self.checkpoint_dir, tensors, state)
        except OSError as error:
            logger.error(
                "Device %s could not write a checkpoint to %s: %s; trying again later",
                self.config.device_id,
                self.checkpoint_dir,
                error,
            )
            return
        self._unsaved = 0
        logger.info("Device %s saved %s", self.config.device_id, path.name)

    def status_report(self) -> dict[str, Any]:
        extra = {
            "progress": round(self.trainer.progress, 4),
            "applied_total": self.trainer.applied_updates,
            "restored_from": self.restored_from,
            "queue_depth": self.updates.qsize(),
            "teacher": self.trainer.monitor.snapshot(),
        }
        return self.metrics.snapshot(self.config.device_id, extra)

    def publish_metrics(self) -> None:
        """Publish the metrics report, retained so a late subscriber sees it."""
        payload = json.dumps(self.status_report())
        self.client.publish(self.topics.metrics, payload, qos=1, retain=True)
