"""Ctrl-C (SIGINT) and SIGTERM while `dslo-edge ota-send` sends or waits."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest

from dslo_edge.broker import Broker, find_mosquitto
from dslo_edge.cli import EXIT_INTERRUPTED
from dslo_edge.ota import split_archive
from dslo_edge.ota_sender import pack_bundle
from tests.mqtt_proxy import PubackProxy

pytest.importorskip("keras")
if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

DEVICE = "porch"
TRANSFER_LINE = re.compile(r"interrupted .* of (\d+) chunks of transfer ([0-9a-f]{32})")
SENT_LINE = re.compile(r"sent .* to device porch as transfer ([0-9a-f]{32}) \((\d+) ")


def start_listener(port: int, chunks: list[bytes]) -> mqtt.Client:
    """Subscribe to the device's OTA topic, appending each chunk to ``chunks``.

    It takes the place of the device's subscription, so the test receives the
    chunks that reached the broker. No device runs, so no outcome arrives.
    """
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="listener")
    listener.on_message = lambda _client, _userdata, message: chunks.append(
        message.payload
    )
    listener.connect("127.0.0.1", port)
    listener.subscribe(f"dslo/{DEVICE}/ota", qos=1)
    listener.loop_start()
    return listener


def start_ota_send(bundle, port: int, *options: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "dslo_edge.cli",
        "ota-send",
        str(bundle),
        "--device",
        DEVICE,
        "--broker",
        f"mqtt://127.0.0.1:{port}",
        "--timeout",
        "60",
        *options,
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize(
    ("signal_number", "status"),
    [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, 143)],
)
def test_signal_after_send_names_transfer(
    mlp_pair, broker_factory: Callable[..., Broker], signal_number, status
) -> None:
    broker = broker_factory("mosquitto")
    chunks: list[bytes] = []
    listener = start_listener(broker.port, chunks)
    process = start_ota_send(mlp_pair.bundle, broker.port)
    try:
        sent_line = process.stdout.readline()
        process.send_signal(signal_number)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        listener.loop_stop()
        listener.disconnect()

    match = SENT_LINE.match(sent_line)
    assert match, sent_line
    transfer, sent = match.group(1), int(match.group(2))
    # 128 + the signal number.
    assert process.returncode == status
    assert stdout == ""
    assert "Traceback" not in stderr
    assert stderr == (
        f"interrupted after every chunk of transfer {transfer} was sent, so "
        f"device {DEVICE} may still install it; its outcome is the retained "
        f"message on dslo/{DEVICE}/ota/status\n"
    )
    assert len(chunks) == sent


def test_sigterm_during_send_counts_chunks(
    mlp_pair, broker_factory: Callable[..., Broker]
) -> None:
    broker = broker_factory("mosquitto")
    # The broker acknowledges only the first 3 chunks, so ota-send waits for
    # the PUBACK of the fourth until the signal arrives.
    proxy = PubackProxy(broker.port, f"dslo/{DEVICE}/ota", acknowledged=3)
    chunks: list[bytes] = []
    listener = start_listener(broker.port, chunks)
    process = start_ota_send(mlp_pair.bundle, proxy.port, "--chunk-size", "1024")
    try:
        deadline = time.monotonic() + 30
        while len(chunks) < 4:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the fourth chunk did not arrive"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        listener.loop_stop()
        listener.disconnect()
        proxy.close()

    match = TRANSFER_LINE.match(stderr)
    assert match, stderr
    chunk_count = int(match.group(1))
    assert process.returncode == 143
    assert stdout == ""
    assert "Traceback" not in stderr
    assert chunk_count == len(split_archive(pack_bundle(mlp_pair.bundle), 1024))
    assert chunk_count > 4
    assert stderr == (
        f"interrupted after the broker acknowledged 3 of {chunk_count} chunks of "
        f"transfer {match.group(2)}, so device {DEVICE} installs nothing and "
        "deletes the chunks it stored when the next transfer starts; run "
        "ota-send again to send the whole bundle\n"
    )
    assert len(chunks) == 4


def test_sigterm_before_connack_exits_143(mlp_pair) -> None:
    # A listener that accepts the connection and never sends a CONNACK, so
    # ota-send waits for it until the signal arrives.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    process = start_ota_send(mlp_pair.bundle, port)
    try:
        server.settimeout(30)
        connection, _ = server.accept()
        # The CONNECT packet arrived, so ota-send now waits for the CONNACK.
        connection.settimeout(30)
        assert connection.recv(1) == bytes([0x10])
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        server.close()

    assert process.returncode == 143
    assert stdout == ""
    assert stderr == (
        "error: dslo-edge ota-send stopped on SIGTERM before it completed\n"
    )
    connection.close()


def test_sigterm_before_last_puback_may_install(
    mlp_pair, broker_factory: Callable[..., Broker]
) -> None:
    broker = broker_factory("mosquitto")
    chunk_count = len(split_archive(pack_bundle(mlp_pair.bundle), 1024))
    # Every chunk reaches the broker and the listener, but the PUBACK of the
    # last one is withheld, so ota-send waits for it until the signal arrives.
    proxy = PubackProxy(broker.port, f"dslo/{DEVICE}/ota", acknowledged=chunk_count - 1)
    chunks: list[bytes] = []
    listener = start_listener(broker.port, chunks)
    process = start_ota_send(mlp_pair.bundle, proxy.port, "--chunk-size", "1024")
    try:
        deadline = time.monotonic() + 30
        while len(chunks) < chunk_count:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the last chunk did not arrive"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        listener.loop_stop()
        listener.disconnect()
        proxy.close()

    match = TRANSFER_LINE.match(stderr)
    assert match, stderr
    assert process.returncode == 143
    assert stdout == ""
    # The device received the whole transfer, so it can install it.
    assert len(chunks) == chunk_count
    assert "installs nothing" not in stderr
    assert stderr == (
        f"interrupted after the broker acknowledged {chunk_count - 1} of "
        f"{chunk_count} chunks of transfer {match.group(2)}, but the last chunk "
        f"may have reached it, so device {DEVICE} may still install it; its "
        f"outcome is the retained message on dslo/{DEVICE}/ota/status\n"
    )
