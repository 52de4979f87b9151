"""Two `dslo-edge ota-send` runs for one device that wait at the same time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest

from dslo_edge.broker import Broker, find_mosquitto

pytest.importorskip("keras")
if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

DEVICE = "porch"
SENT_LINE = re.compile(r"sent .* to device porch as transfer ([0-9a-f]{32}) ")


def start_send(bundle: str, port: int) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "dslo_edge.cli",
        "ota-send",
        bundle,
        "--device",
        DEVICE,
        "--broker",
        f"mqtt://127.0.0.1:{port}",
        "--timeout",
        "20",
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def sent_transfer(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    match = SENT_LINE.match(line)
    assert match, line
    return match.group(1)


def test_overlapping_sends_both_get_outcome(
    mlp_pair, broker_factory: Callable[..., Broker]
) -> None:
    broker = broker_factory("mosquitto")
    # This client acts as the device and publishes each outcome retained,
    # as the daemon does, once both senders wait for theirs.
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="device")
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    first = start_send(str(mlp_pair.bundle), broker.port)
    second = None
    try:
        first_transfer = sent_transfer(first)
        second = start_send(str(mlp_pair.bundle), broker.port)
        second_transfer = sent_transfer(second)
        for transfer in (first_transfer, second_transfer):
            status = {"state": "installed", "transfer": transfer, "release": "r"}
            device.publish(
                f"dslo/{DEVICE}/ota/status", json.dumps(status), qos=1, retain=True
            ).wait_for_publish(5)
            # The next retained status replaces this one, so each sender must
            # receive its own while it is subscribed.
            time.sleep(2)
        first_out, first_err = first.communicate(timeout=30)
        second_out, second_err = second.communicate(timeout=30)
    finally:
        first.kill()
        if second is not None:
            second.kill()
        device.loop_stop()
        device.disconnect()

    assert first_err == ""
    assert second_err == ""
    assert first.returncode == 0
    assert second.returncode == 0
    assert first_out == "device porch installed release r\n"
    assert second_out == "device porch installed release r\n"
