"""Ctrl-C (SIGINT) while `dslo-edge ota-send` waits for the device's outcome."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest

from dslo_edge.broker import Broker, find_mosquitto
from dslo_edge.cli import EXIT_INTERRUPTED

pytest.importorskip("keras")
if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

DEVICE = "porch"
SENT_LINE = re.compile(r"sent .* to device porch as transfer ([0-9a-f]{32}) \((\d+) ")


def test_sigint_after_send_names_transfer(
    mlp_pair, broker_factory: Callable[..., Broker]
) -> None:
    broker = broker_factory("mosquitto")
    chunks: list[bytes] = []
    # Stands in for the device's subscription, so the test receives the chunks
    # that reached the broker. No device runs, so no outcome ever arrives.
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="listener")
    listener.on_message = lambda _client, _userdata, message: chunks.append(
        message.payload
    )
    listener.connect("127.0.0.1", broker.port)
    listener.subscribe(f"dslo/{DEVICE}/ota", qos=1)
    listener.loop_start()
    command = [
        sys.executable,
        "-m",
        "dslo_edge.cli",
        "ota-send",
        str(mlp_pair.bundle),
        "--device",
        DEVICE,
        "--broker",
        f"mqtt://127.0.0.1:{broker.port}",
        "--timeout",
        "60",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        sent_line = process.stdout.readline()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
        listener.loop_stop()
        listener.disconnect()

    match = SENT_LINE.match(sent_line)
    assert match, sent_line
    transfer, sent = match.group(1), int(match.group(2))
    assert process.returncode == EXIT_INTERRUPTED
    assert stdout == ""
    assert "Traceback" not in stderr
    assert stderr == (
        f"interrupted after every chunk of transfer {transfer} was sent, so "
        f"device {DEVICE} may still install it; its outcome is the retained "
        f"message on dslo/{DEVICE}/ota/status\n"
    )
    assert len(chunks) == sent
