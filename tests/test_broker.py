"""Tests of the local broker launcher against real mosquitto and amqtt processes."""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from dslo_edge import broker as broker_module
from dslo_edge.broker import Broker, free_port
from dslo_edge.errors import BrokerError, ConfigError

TIMEOUT_S = 10.0
# Every byte value, so that any text decoding on the way would show.
PAYLOAD = bytes(range(256)) * 4


class Subscriber:
    """paho-mqtt client that subscribes on every connect and queues messages."""

    def __init__(self, broker: Broker, topic: str, client_id: str) -> None:
        self.topic = topic
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connects = 0
        self.subscribed = threading.Event()
        self._connect_count_changed = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda client, userdata, message: self.messages.put(
            message
        )
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        self.subscribed.clear()
        client.subscribe(self.topic, qos=1)
        with self._connect_count_changed:
            self.connects += 1
            self._connect_count_changed.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if all(not code.is_failure for code in reason_codes):
            self.subscribed.set()

    def wait_for_connects(self, count: int) -> bool:
        with self._connect_count_changed:
            return self._connect_count_changed.wait_for(
                lambda: self.connects >= count, timeout=TIMEOUT_S
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def subscriber(broker: Broker, topic: str, client_id: str) -> Iterator[Subscriber]:
    sub = Subscriber(broker, topic, client_id)
    try:
        assert sub.subscribed.wait(TIMEOUT_S), "subscription not acknowledged"
        yield sub
    finally:
        sub.close()


def publish_qos1(broker: Broker, topic: str, payload: bytes, client_id: str) -> None:
    """Publish one QoS 1 message and wait for the broker's PUBACK."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=TIMEOUT_S)
        assert info.is_published(), "PUBACK not received"
    finally:
        client.disconnect()
        client.loop_stop()


def assert_round_trip(broker: Broker, topic: str, tag: str) -> None:
    with subscriber(broker, topic, f"sub-{tag}") as sub:
        publish_qos1(broker, topic, PAYLOAD, f"pub-{tag}")
        message = sub.messages.get(timeout=TIMEOUT_S)
    assert message.topic == topic
    assert message.qos == 1
    assert message.payload == PAYLOAD


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_broker_fixture_attributes(broker: Broker) -> None:
    assert broker.host == "127.0.0.1"
    assert broker.kind in ("mosquitto", "amqtt")
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert port_accepts(broker.port)


def test_mosquitto_delivers_qos1_payload(
    broker_factory: Callable[..., Broker],
) -> None:
    broker = broker_factory("mosquitto")
    assert broker.kind == "mosquitto"
    config = (broker.workdir / "mosquitto.conf").read_text()
    assert f"listener {broker.port} 127.0.0.1" in config
    assert "allow_anonymous true" in config
    assert_round_trip(broker, "dslo/test/mosquitto", "mosquitto")


def test_amqtt_delivers_qos1_payload(broker_factory: Callable[..., Broker]) -> None:
    broker = broker_factory("amqtt")
    assert broker.kind == "amqtt"
    assert_round_trip(broker, "dslo/test/amqtt", "amqtt")


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_restart_keeps_port(broker_factory: Callable[..., Broker], kind: str) -> None:
    broker = broker_factory(kind)
    port = broker.port
    first_pid = broker.pid

    broker.restart()

    assert broker.port == port
    assert broker.pid != first_pid
    assert first_pid is not None
    assert not process_exists(first_pid)
    assert_round_trip(broker, f"dslo/test/restart/{kind}", f"restart-{kind}")


def test_client_reconnects_after_restart(
    broker_factory: Callable[..., Broker],
) -> None:
    broker = broker_factory("mosquitto")
    topic = "dslo/test/reconnect"
    with subscriber(broker, topic, "sub-reconnect") as sub:
        broker.restart()
        assert sub.wait_for_connects(2), "client did not reconnect after restart"
        assert sub.subscribed.wait(TIMEOUT_S), "resubscription not acknowledged"
        publish_qos1(broker, topic, PAYLOAD, "pub-reconnect")
        message = sub.messages.get(timeout=TIMEOUT_S)
    assert message.payload == PAYLOAD


def test_stop_ends_process() -> None:
    if broker_module.find_mosquitto() is None and not broker_module.amqtt_available():
        pytest.skip("no MQTT broker: neither mosquitto nor amqtt is installed")
    with Broker.start() as broker:
        pid = broker.pid
        workdir = broker.workdir
        assert pid is not None
        assert workdir.is_dir()
    assert broker.pid is None
    assert not process_exists(pid)
    assert not port_accepts(broker.port)
    assert not workdir.exists()
    broker.stop()  # A second stop does nothing.


def test_start_rejects_port_in_use(broker_factory: Callable[..., Broker]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} .* already in use"):
            broker_factory("auto", port=port)


def test_start_retries_port_taken_after_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A socket that listens on the port free_port returned, as when another
    # process binds it between the check and the broker's start.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port, broker_module.free_port()])
        monkeypatch.setattr(broker_module, "free_port", lambda: next(ports))
        broker = Broker.start(kind="auto", workdir=tmp_path)
        try:
            port = broker.port
            accepts = port_accepts(port)
        finally:
            broker.stop()

    assert port != taken_port
    assert accepts


def test_start_retries_port_the_broker_cannot_bind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if broker_module.find_mosquitto() is None:
        pytest.skip("mosquitto not found on PATH or at /usr/sbin/mosquitto")
    # Bound without listening, as a client's local port is, so that only
    # mosquitto's exit shows the port taken, not the readiness probe.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port, broker_module.free_port()])
        monkeypatch.setattr(broker_module, "free_port", lambda: next(ports))
        # The check passes, so only mosquitto's own bind finds the port taken.
        monkeypatch.setattr(broker_module, "_check_port_free", lambda port: None)
        broker = Broker.start(kind="mosquitto", workdir=tmp_path)
        try:
            port = broker.port
            accepts = port_accepts(port)
            log = broker.log_path.read_text()
        finally:
            broker.stop()

    assert port != taken_port
    assert accepts
    assert "Address already in use" not in log


def test_start_gives_up_after_three_taken_ports(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        calls = []

        def taken_free_port() -> int:
            calls.append(taken_port)
            return taken_port

        monkeypatch.setattr(broker_module, "free_port", taken_free_port)
        with pytest.raises(
            BrokerError, match=f"port {taken_port} \\(already in use\\)"
        ) as error:
            Broker.start(kind="auto", workdir=tmp_path)

    assert len(calls) == broker_module.PORT_ATTEMPTS
    message = str(error.value)
    assert message.startswith(
        "3 free ports on 127.0.0.1 were taken before the broker could bind them"
    )
    # The caller passed no port, so the advice of the port check does not apply.
    assert "port=None" not in message


def test_start_rejects_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'rabbitmq'.*auto, mosquitto, amqtt"):
        Broker.start(kind="rabbitmq", workdir=tmp_path)


def test_start_failure_reports_log_tail(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if broker_module.find_mosquitto() is None:
        pytest.skip("mosquitto not found on PATH or at /usr/sbin/mosquitto")
    monkeypatch.setattr(
        broker_module,
        "_mosquitto_config",
        lambda port, log_path, *_: f"listener {port} 127.0.0.1\nno_such_option 1\n",
    )
    with pytest.raises(BrokerError) as raised:
        Broker.start(kind="mosquitto", workdir=tmp_path)
    message = str(raised.value)
    assert "exited with code" in message
    assert "no_such_option" in message


def test_missing_mosquitto_names_demo_option(monkeypatch) -> None:
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)

    with pytest.raises(BrokerError) as caught:
        broker_module.Broker.start(kind="mosquitto")

    assert str(caught.value).endswith(
        "install it (apt-get install mosquitto) or use the amqtt broker "
        "(dslo-edge demo --broker amqtt, or kind='amqtt' in Broker.start)"
    )
