"""The reconnect warning of MqttConnection for a broker address with no listener."""

from __future__ import annotations

import logging
import time

import pytest

from dslo_edge.broker import free_port
from dslo_edge.config_service import MqttSettings
from dslo_edge.connection import MqttConnection

ADDRESS_HINT = "check the host and port in the [mqtt] table"


def reconnect_warnings(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    """Wait for ``count`` reconnect warnings and return their messages."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        messages = [
            record.getMessage()
            for record in caplog.records
            if "reconnecting in" in record.getMessage()
        ]
        if len(messages) >= count:
            return messages
        time.sleep(0.05)
    return messages


def test_refused_address_names_mqtt_keys(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="dslo_edge.connection")
    port = free_port()
    settings = MqttSettings(port=port, reconnect_min_s=0.1, reconnect_max_s=0.2)
    connection = MqttConnection(settings, "dev-a", label="device dev-a")
    connection.start()
    try:
        messages = reconnect_warnings(caplog, 2)
    finally:
        connection.stop()

    assert len(messages) >= 2
    assert messages[0].startswith(f"device dev-a: broker 127.0.0.1:{port} unavailable")
    assert "Connection refused" in messages[0]
    assert ADDRESS_HINT in messages[0]
    assert ADDRESS_HINT in messages[1]


def test_broker_restart_warning_has_no_hint(mosquitto, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="dslo_edge.connection")
    settings = MqttSettings(
        port=mosquitto.port, reconnect_min_s=0.1, reconnect_max_s=0.2
    )
    connection = MqttConnection(settings, "dev-b", label="device dev-b")
    connection.start()
    try:
        assert connection.connected.wait(10)
        mosquitto.stop()
        messages = reconnect_warnings(caplog, 1)
    finally:
        connection.stop()

    assert messages
    assert messages[0].startswith(
        f"device dev-b: broker 127.0.0.1:{mosquitto.port} unavailable"
    )
    assert ADDRESS_HINT not in messages[0]
