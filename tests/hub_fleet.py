"""Simulated devices and hub worker processes for the hub tests.

Each simulated device runs the device's own code path: a ``StudentModel``
on the LiteRT interpreter, a ``Trainer``, a ``LabelRequester`` and a plain
paho client. Many devices share one process; responses are queued and
applied on the driving thread, because an interpreter is not thread-safe.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.bundle import Bundle
from dslo_edge.config import TrainingSettings
from dslo_edge.errors import InvalidUpdate
from dslo_edge.label_requests import (
    LabelRequester,
    RequestSettings,
    Response,
    SelectionSettings,
)
from dslo_edge.models import StudentModel
from dslo_edge.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_hub_config(
    folder: Path, port: int, teacher: Path, extra: dict[str, str] | None = None
) -> Path:
    """Write a hub TOML file for workers on the broker at 127.0.0.1:port.

    ``extra`` adds lines to a section, and a line replaces the default line
    that sets the same key.
    """
    sections = {
        "hub": 'state_file = "state.sqlite"\nmetrics_every_s = 0.5',
        "mqtt": f"port = {port}\nreconnect_min_s = 0.2\nreconnect_max_s = 2.0",
        "teacher": f'path = "{teacher}"\nreload_poll_s = 0.5',
        "rate_limit": "requests_per_s = 1.0\nburst = 2",
        "requests": "batch_wait_s = 0.02",
    }
    for section, text in (extra or {}).items():
        keys = {line.split("=")[0].strip() for line in text.splitlines()}
        default_lines = [
            line
            for line in sections.get(section, "").splitlines()
            if line.split("=")[0].strip() not in keys
        ]
        sections[section] = "\n".join([*default_lines, text])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hub.toml"
    path.write_text("\n".join(f"[{name}]\n{text}\n" for name, text in sections.items()))
    return path


def start_worker(config: Path, worker_id: str, log: Path) -> subprocess.Popen:
    """Start ``dslo-edge hub`` as a child process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])
    )
    with log.open("ab") as stream:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dslo_edge.cli",
                "hub",
                "--config",
                str(config),
                "--worker-id",
                worker_id,
            ],
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
        )


class HubWatcher:
    """Follows the retained status and metrics of every hub worker."""

    def __init__(self, port: int, prefix: str = "dslo"):
        self.status: dict[str, str] = {}
        self.metrics: dict[str, dict] = {}
        self.teacher: dict | None = None
        self._changed = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{prefix}/_hub/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, message) -> None:
        levels = message.topic.split("/")
        document = json.loads(message.payload)
        with self._changed:
            if levels[-1] == "teacher":
                self.teacher = document
            elif levels[-1] == "status":
                self.status[levels[-2]] = document["state"]
            elif levels[-1] == "metrics":
                self.metrics[levels[-2]] = document
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                assert remaining > 0, (
                    f"hub did not reach the expected state within {timeout} s: "
                    f"status {self.status}, teacher {self.teacher}"
                )
                self._changed.wait(remaining)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_online(watcher: HubWatcher, workers: list[str]) -> None:
    """Wait until every named worker reports itself online."""
    watcher.wait_for(
        lambda w: all(w.status.get(worker) == "online" for worker in workers)
    )


@dataclass
class DeviceTally:
    """What one simulated device received and applied."""

    applied: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    first_sent: float | None = None


class SimulatedDevice:
    """One device: student, trainer, requester and its own MQTT client."""

    def __init__(
        self,
        index: int,
        bundle: Bundle,
        port: int,
        inbox: queue.Queue,
        requests: RequestSettings,
    ):
        self.device_id = f"dev-{index:04d}"
        self.student = StudentModel(bundle)
        self.trainer = Trainer(
            self.student, TrainingSettings(smoothing_capacity=256, queue_size=8)
        )
        self.requester = LabelRequester(
            self.device_id,
            selection=SelectionSettings(max_confidence=1.0, max_samples=8),
            settings=requests,
        )
        self.tally = DeviceTally()
        self._rng = np.random.default_rng(index)
        self._inbox = inbox
        self._sample = 0
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.subscribe(self.requester.topics.labels, qos=1)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, message) -> None:
        self._inbox.put((self, self.requester.match(message)))

    def step(self) -> None:
        """See new inputs, request labels for the uncertain ones, resend old ones."""
        x = self._rng.random((16, 64), dtype=np.float32)
        ids = [f"{self.device_id}-{self._sample + i}" for i in range(len(x))]
        self._sample += len(x)
        pending = self.requester.propose(ids, x, self.student.infer(x))
        if pending is not None:
            self.requester.publish(self.client, pending)
            if self.tally.first_sent is None:
                self.tally.first_sent = time.monotonic()
        for again in self.requester.due():
            self.requester.publish(self.client, again)

    def apply(self, response: Response) -> None:
        """Train on an ``ok`` response; count its request id."""
        if response.kind != "ok" or response.request is None:
            return
        try:
            update = self.requester.labels_update(response, self.trainer.decode)
        except InvalidUpdate as error:
            self.tally.rejected[error.reason] += 1
            return
        self.trainer.apply(update)
        self.requester.record_answered(response.latency_s)
        self.tally.applied[response.request.request_id] += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def drain_inbox(inbox: queue.Queue, timeout: float = 0.0) -> int:
    """Apply queued responses on this thread; return how many were handled."""
    handled = 0
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            device, response = (
                inbox.get(timeout=remaining) if remaining > 0 else inbox.get_nowait()
            )
        except queue.Empty:
            return handled
        device.apply(response)
        handled += 1


def subscribed_client(
    port: int, topic: str, keep: Callable[[Any], Any] = lambda message: message
) -> tuple[mqtt.Client, queue.Queue]:
    """Subscribe to ``topic`` and wait for the broker's confirmation.

    Returns the client and a queue of ``keep(message)`` for each message.
    """
    received: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, message: received.put(keep(message))
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    if not subscribed.wait(10):
        client.disconnect()
        client.loop_stop()
        pytest.fail(f"the broker did not confirm the subscription {topic}")
    return client, received
