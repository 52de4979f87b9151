"""A `dslo-edge push` stopped by SIGINT, and --skip-samples to resume it."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from dslo_edge.broker import Broker, find_mosquitto
from dslo_edge.cli import main
from dslo_edge.hub import load_samples
from dslo_edge.protocol import decode_update

pytest.importorskip("keras")
if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

DEVICE = "kitchen"
BATCH = 8

INTERRUPTED_LINE = re.compile(
    r"interrupted: published (\d+) and the broker acknowledged (\d+) \(PUBACK\) "
    r"of the (\d+) messages of this push, (\d+) of its (\d+) samples acknowledged"
)


class UpdateWatcher:
    """A client subscribed to the device's updates, as the device would be."""

    def __init__(self, broker: Broker):
        self.payloads: list[bytes] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher")
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = lambda _c, _u, message: self.payloads.append(
            message.payload
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(f"dslo/{DEVICE}/updates", qos=1)
        assert subscribed.wait(10)

    def sample_ids(self) -> list[str]:
        """Return the sample ids of the received updates, in order."""
        return [i for p in self.payloads for i in decode_update(p).sample_ids]

    def wait_for(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.payloads) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def push_arguments(bundle: Path, data: Path, broker: Broker, *extra: str) -> list:
    return [
        "push",
        "--bundle",
        str(bundle),
        "--data",
        str(data),
        "--device",
        DEVICE,
        "--broker",
        broker.url,
        "--batch-size",
        str(BATCH),
        "--no-wait",
        *extra,
    ]


def test_push_sigint_prints_acknowledged_counts(mlp_pair, broker_factory, tmp_path):
    broker = broker_factory("mosquitto")
    samples = 80_000
    data = tmp_path / "large.npz"
    rng = np.random.default_rng(3)
    np.savez(data, x=rng.random((samples, 64), dtype=np.float32))
    watcher = UpdateWatcher(broker)
    command = [sys.executable, "-m", "dslo_edge.cli"]
    command += push_arguments(mlp_pair.bundle, data, broker)
    push = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Interrupt once updates are arriving, so one may be in flight.
        watcher.wait_for(20, timeout=60)
        assert len(watcher.payloads) >= 20, "the push sent nothing within 60 s"
        push.send_signal(signal.SIGINT)
        stdout, stderr = push.communicate(timeout=60)
        # The broker may still be delivering acknowledged updates: wait for
        # them, then 1 s more for any published one beyond them.
        interrupted = INTERRUPTED_LINE.search(stderr)
        if interrupted:
            watcher.wait_for(int(interrupted.group(2)), timeout=30)
        time.sleep(1)
        received = watcher.sample_ids()
    finally:
        if push.poll() is None:
            push.kill()
        watcher.close()

    assert push.returncode == 130, stderr
    assert "Aborted!" not in stderr
    assert "Traceback" not in stderr
    assert stdout == ""
    match = INTERRUPTED_LINE.search(stderr)
    assert match, stderr
    published, acknowledged, total, acked_samples, total_samples = map(
        int, match.groups()
    )
    assert total == math.ceil(samples / BATCH)
    assert total_samples == samples
    assert acknowledged >= 20
    assert acknowledged <= published <= acknowledged + 1
    assert published < total
    assert acked_samples == acknowledged * BATCH
    assert f"--skip-samples {acked_samples}" in stderr
    # LiteRT prints a notice when it creates its XNNPACK delegate.
    lines = [line for line in stderr.splitlines() if "XNNPACK" not in line]
    assert len(lines) == 1
    assert lines[0].startswith("interrupted: ")
    # The broker delivered every acknowledged update, and none beyond the
    # published ones, in the file's order.
    ids = load_samples(data).ids
    assert acked_samples <= len(received) <= published * BATCH
    assert received == ids[: len(received)]


def test_push_sigterm_prints_acknowledged_counts(mlp_pair, broker_factory, tmp_path):
    broker = broker_factory("mosquitto")
    samples = 80_000
    data = tmp_path / "large.npz"
    rng = np.random.default_rng(5)
    np.savez(data, x=rng.random((samples, 64), dtype=np.float32))
    watcher = UpdateWatcher(broker)
    command = [sys.executable, "-m", "dslo_edge.cli"]
    command += push_arguments(mlp_pair.bundle, data, broker)
    push = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        watcher.wait_for(20, timeout=60)
        assert len(watcher.payloads) >= 20, "the push sent nothing within 60 s"
        push.send_signal(signal.SIGTERM)
        stdout, stderr = push.communicate(timeout=60)
    finally:
        if push.poll() is None:
            push.kill()
        watcher.close()

    # 128 + SIGTERM, as a process that a service manager stopped.
    assert push.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert stdout == ""
    match = INTERRUPTED_LINE.search(stderr)
    assert match, stderr
    acknowledged = int(match.group(2))
    acked_samples = int(match.group(4))
    assert acknowledged >= 20
    assert acked_samples == acknowledged * BATCH
    assert f"--skip-samples {acked_samples}" in stderr


def test_push_skip_samples_sends_the_rest(mlp_pair, broker_factory, tmp_path):
    broker = broker_factory("mosquitto")
    data = tmp_path / "samples.npz"
    rng = np.random.default_rng(4)
    np.savez(data, x=rng.random((40, 64), dtype=np.float32))
    watcher = UpdateWatcher(broker)
    try:
        arguments = push_arguments(mlp_pair.bundle, data, broker)
        result = CliRunner().invoke(main, [*arguments, "--skip-samples", "24"])
        watcher.wait_for(2)
        time.sleep(0.3)
    finally:
        watcher.close()

    assert result.exit_code == 0, result.output
    assert "sent 2 messages (16 samples" in result.output
    # The ids are those of the whole file, so the device keeps its state
    # per sample across the interrupted push and the resumed one.
    assert watcher.sample_ids() == load_samples(data).ids[24:]


def test_push_skip_samples_rejects_all(mlp_pair, tmp_path):
    data = tmp_path / "samples.npz"
    np.savez(data, x=np.ones((5, 64), dtype=np.float32))
    arguments = [
        "push",
        "--bundle",
        str(mlp_pair.bundle),
        "--data",
        str(data),
        "--device",
        DEVICE,
        "--skip-samples",
        "5",
    ]

    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 2
    assert "--skip-samples" in result.output
    assert "5 skips all 5 samples" in result.output


def interrupt_when(ready, command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command``, send SIGINT once ``ready()`` is true, and collect its output."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not ready() and process.poll() is None:
            assert time.monotonic() < deadline, "the push never reached the step"
            time.sleep(0.05)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_push_sigint_before_connack_exits_130(mlp_pair, tmp_path):
    data = tmp_path / "samples.npz"
    np.savez(data, x=np.ones((40, 64), dtype=np.float32))
    # A listener that accepts the connection and never sends a CONNACK.
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        port = server.getsockname()[1]
        command = [sys.executable, "-m", "dslo_edge.cli", "push"]
        command += ["--bundle", str(mlp_pair.bundle), "--data", str(data)]
        command += ["--device", DEVICE, "--broker", f"mqtt://127.0.0.1:{port}"]
        connections: list[socket.socket] = []

        def connected() -> bool:
            connections.append(server.accept()[0])
            return True

        result = interrupt_when(connected, command)
        for connection in connections:
            connection.close()

    assert result.returncode == 130, result.stderr
    assert "Aborted!" not in result.stderr
    assert "published 0 and the broker acknowledged 0 (PUBACK)" in result.stderr
    assert "Nothing was sent" in result.stderr


def test_push_sigint_while_reading_data_exits_130(mlp_pair, tmp_path):
    # push blocks reading a FIFO until the test writes to it, which it never does.
    data = tmp_path / "samples.npz"
    os.mkfifo(data)
    writers: list[int] = []

    def reading() -> bool:
        try:
            writers.append(os.open(data, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as error:
            # ENXIO: no process has the FIFO open for reading yet.
            assert error.errno == errno.ENXIO
            return False
        return True

    command = [sys.executable, "-m", "dslo_edge.cli", "push"]
    command += ["--bundle", str(mlp_pair.bundle), "--data", str(data)]
    command += ["--device", DEVICE, "--broker", "mqtt://127.0.0.1:1"]
    try:
        result = interrupt_when(reading, command)
    finally:
        for writer in writers:
            os.close(writer)

    assert result.returncode == 130, result.stderr
    assert "Aborted!" not in result.stderr
    assert "interrupted before the push connected to the broker" in result.stderr


def ledger_count(ledger: Path) -> int:
    """Return the vectors the privacy ledger file charges to DEVICE."""
    if not ledger.exists():
        return 0
    devices = json.loads(ledger.read_text())["devices"]
    return sum(devices.get(DEVICE, {}).values())


def test_push_sigint_refunds_unsent_charge(mlp_pair, broker_factory, tmp_path):
    pytest.importorskip("dp_accounting")
    broker = broker_factory("mosquitto")
    data = tmp_path / "samples.npz"
    rng = np.random.default_rng(5)
    np.savez(data, x=rng.random((129, 64), dtype=np.float32))
    ledger = tmp_path / "ledger.json"
    # A device that is online and subscribed but applies nothing, so a push
    # with --wait stops before its 129th update, after 128 outstanding ones.
    watcher = UpdateWatcher(broker)
    status = f"dslo/{DEVICE}/status"
    watcher.client.publish(status, "online", qos=1, retain=True).wait_for_publish(10)
    metrics = json.dumps({"applied_total": 0})
    watcher.client.publish(
        f"dslo/{DEVICE}/metrics", metrics, qos=1, retain=True
    ).wait_for_publish(10)
    command = [sys.executable, "-m", "dslo_edge.cli", "push"]
    command += ["--bundle", str(mlp_pair.bundle), "--data", str(data)]
    command += ["--device", DEVICE, "--broker", broker.url, "--batch-size", "1"]
    command += ["--dp-noise-multiplier", "1", "--dp-epsilon", "1000"]
    command += ["--dp-ledger", str(ledger)]
    try:
        # The ledger charges the 129th update before the push waits to send it.
        result = interrupt_when(lambda: ledger_count(ledger) == 129, command)
        watcher.wait_for(128)
    finally:
        watcher.close()

    assert result.returncode == 130, result.stderr
    assert "published 128 and the broker acknowledged 128" in result.stderr
    assert "--skip-samples 128" in result.stderr
    assert len(watcher.payloads) == 128
    # Only the 128 sent vectors stay charged, so a push resumed with
    # --skip-samples 128 charges the last sample once.
    assert ledger_count(ledger) == 128


def test_push_sigint_while_encoding_refunds(
    mlp_pair, broker_factory, tmp_path, monkeypatch
):
    pytest.importorskip("dp_accounting")
    from dslo_edge import hub
    from dslo_edge.bundle import load_bundle
    from dslo_edge.privacy import PrivacyLedger, PrivacySettings, PrivateRelease

    broker = broker_factory("mosquitto")
    rng = np.random.default_rng(6)
    data = tmp_path / "samples.npz"
    np.savez(data, x=rng.random((40, 64), dtype=np.float32))
    ledger_path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(PrivacySettings(1.0, 1000.0), ledger_path)
    privacy = PrivateRelease(ledger, DEVICE, rng)
    bundle = load_bundle(mlp_pair.bundle)
    encode = hub.encode_update
    encoded: list[int] = []

    def encode_then_interrupt(update):
        # SIGINT arrives while the third update, already charged, is encoded.
        encoded.append(update.sample_count)
        if len(encoded) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return encode(update)

    monkeypatch.setattr(hub, "encode_update", encode_then_interrupt)
    watcher = UpdateWatcher(broker)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(hub.PushInterrupted) as caught:
            hub.push(
                [bundle.teacher_path],
                bundle.teacher_output_kind,
                load_samples(data),
                DEVICE,
                broker.url,
                batch_size=BATCH,
                wait=False,
                privacy=privacy,
            )
    finally:
        signal.signal(signal.SIGINT, previous)
        watcher.close()

    assert len(encoded) == 3
    assert caught.value.result.samples == 2 * BATCH
    assert caught.value.unacknowledged == 0
    # The third update was charged but never handed to the broker.
    assert ledger_count(ledger_path) == 2 * BATCH
