"""Fault suite: the real daemon process against mosquitto, under faults.

Each scenario publishes updates with known message ids, injects one kind of
fault, and reads the daemon's final checkpoint. Because a checkpoint stores
the applied-id record and the applied-update counter together with the
weights, it records exactly which updates are in the model:

- applied: valid updates whose id is in the record;
- applied twice: the counter minus the number of ids in the record;
- lost: valid updates sent but not in the record;
- rejected: the daemon's rejection counters, which checkpoints carry across
  restarts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from dslo_edge.broker import free_port
from dslo_edge.bundle import Bundle
from dslo_edge.errors import BrokerError
from dslo_edge.protocol import SoftLabelUpdate, Topics, new_message_id

logger = logging.getLogger(__name__)

DEVICE = "fault-device"
WAIT_S = 120.0


@dataclass
class Row:
    """One line of the fault table."""

    scenario: str
    sent: int = 0
    applied: int = 0
    rejected: int = 0
    applied_twice: int = 0
    lost: int = 0
    detail: str = ""
    passed: bool = True


@dataclass
class FinalState:
    applied_ids: set[bytes]
    applied_total: int
    rejected: dict[str, int]


def make_updates(
    bundle: Bundle, count: int, seed: int, samples: int = 8
) -> list[SoftLabelUpdate]:
    """Return valid random updates for the bundle's input and class shapes."""
    rng = np.random.default_rng(seed)
    spec = bundle.model_spec()
    updates = []
    for index in range(count):
        updates.append(
            SoftLabelUpdate(
                message_id=new_message_id(),
                teacher_version="fault-suite",
                teacher_round=1,
                timestamp=time.time(),
                sample_ids=[f"u{seed}-{index}-{i}" for i in range(samples)],
                inputs=rng.random((samples, *spec.input_shape), dtype=np.float32),
                labels=rng.dirichlet(np.ones(spec.class_count), size=samples).astype(
                    np.float32
                ),
                label_kind="probabilities",
            )
        )
    return updates


class DaemonProcess:
    """``dslo-edge run`` as a child process, with its log in a file."""

    def __init__(self, config_path: Path, log_path: Path, prefix: Sequence[str] = ()):
        self.config_path = config_path
        self.log_path = log_path
        # A command that starts the daemon, such as setpriv with its options.
        self.prefix = list(prefix)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "dslo_edge.cli",
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise BrokerError(
                f"daemon did not stop within {timeout:.0f} s; see {self.log_path}"
            ) from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Publisher:
    """A hub-side client that publishes raw payloads and follows metrics."""

    def __init__(self, port: int, topics: Topics):
        self.topics = topics
        self.metrics: dict[str, Any] | None = None
        self.status: str | None = None
        self.connected = threading.Event()
        self._changed = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"fault-hub-{os.getpid()}-{random.randrange(1 << 30)}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        # paho annotates the delays as int but only adds and sleeps them, so
        # a fraction of a second works.
        self.client.reconnect_delay_set(0.2, 1.0)  # type: ignore[arg-type]
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe([(self.topics.metrics, 1), (self.topics.status, 1)])
        self.connected.set()

    def _on_disconnect(self, *_: Any) -> None:
        self.connected.clear()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            if message.topic == self.topics.metrics:
                self.metrics = json.loads(message.payload)
            else:
                self.status = message.payload.decode(errors="replace")
            self._changed.notify_all()

    def publish(self, payloads: list[bytes], retain: bool = False) -> None:
        """Publish at QoS 1 and wait until the broker acknowledged each one."""
        if not self.connected.wait(WAIT_S):
            raise BrokerError("the fault-suite hub could not reach the broker")
        infos = [
            self.client.publish(self.topics.updates, payload, qos=1, retain=retain)
            for payload in payloads
        ]
        for info in infos:
            info.wait_for_publish(timeout=WAIT_S)

    def wait(
        self, predicate: Callable[[dict[str, Any]], object], timeout: float = WAIT_S
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.metrics is None or not predicate(self.metrics):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerError(
                        f"timed out waiting for device metrics; last: {self.metrics}"
                    )
                self._changed.wait(remaining)
            return dict(self.metrics)

    def wait_status(self, value: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.status != value:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerError(
                        f"device status stayed {self.status!r}, expected {value!r}"
                    )
                self._changed.wait(remaining)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class TcpProxy:
    """A loopback TCP relay that can drop every connection, for outages."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        """Close the listener and every relayed connection."""
        with self._lock:
            server, self._server = self._server, None
            sockets, self._sockets = self._sockets, []
        for sock in [server, *sockets]:
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), daemon=True
                ).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
