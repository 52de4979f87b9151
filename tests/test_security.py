"""TLS, passwords and the shipped per-device ACL against a real mosquitto."""

from __future__ import annotations

import logging
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from tls_files import make_authority, make_server_certificate

from dslo_edge.broker import Broker, find_mosquitto
from dslo_edge.config import MqttSettings
from dslo_edge.connection import MqttConnection, configure_tls
from dslo_edge.errors import ConfigError

pytest.importorskip("cryptography")
if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
PASSWORDS = {"hub": "hub-secret", "dev-a": "a-secret", "dev-b": "b-secret"}


def shipped_config(folder: Path, certificate: Path, key: Path, ca: Path) -> str:
    """The shipped configuration, with this test's port, files and no persistence."""
    replacements = {
        "listener 8883": "listener {port} 127.0.0.1",
        "/etc/mosquitto/dslo.passwd": str(folder / "passwd"),
        "/etc/mosquitto/dslo.acl": str(DEPLOY / "dslo.acl"),
        "/etc/mosquitto/certs/ca.crt": str(ca),
        "/etc/mosquitto/certs/broker.crt": str(certificate),
        "/etc/mosquitto/certs/broker.key": str(key),
    }
    lines = []
    for line in (DEPLOY / "dslo.conf").read_text().splitlines():
        if line.startswith(("persistence", "autosave_interval")):
            continue
        for old, new in replacements.items():
            line = line.replace(old, new)
        lines.append(line)
    return "\n".join(lines)


def write_password_file(path: Path) -> None:
    for index, (user, password) in enumerate(PASSWORDS.items()):
        command = ["mosquitto_passwd", "-b", str(path), user, password]
        if index == 0:
            command.insert(1, "-c")
        subprocess.run(command, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    authority = make_authority(folder, "test-ca")
    stranger = make_authority(folder, "other-ca")
    good = make_server_certificate(
        authority, folder, "broker", ["localhost", "127.0.0.1"]
    )
    wrong_host = make_server_certificate(
        authority, folder, "elsewhere", ["elsewhere.example"]
    )
    return {
        "ca": authority.path,
        "other_ca": stranger.path,
        "good": good,
        "wrong_host": wrong_host,
    }


def start_broker(tmp_path: Path, pki, certificate: str = "good") -> Broker:
    write_password_file(tmp_path / "passwd")
    cert, key = pki[certificate]
    text = shipped_config(tmp_path, cert, key, pki["ca"])
    return Broker.start(kind="mosquitto", workdir=tmp_path / "broker", config_text=text)


def settings(
    broker: Broker, tmp_path: Path, user: str, ca: Path, **extra
) -> MqttSettings:
    password_file = tmp_path / f"{user}.password"
    password_file.write_text(PASSWORDS.get(user, "wrong") + "\n")
    values = dict(
        host="127.0.0.1",
        port=broker.port,
        username=user,
        password_file=password_file,
        tls_ca_file=ca,
        reconnect_min_s=0.2,
        reconnect_max_s=0.5,
    )
    values.update(extra)
    return MqttSettings(**values)


def connect(config: MqttSettings, client_id: str) -> MqttConnection:
    connection = MqttConnection(config, client_id, label=client_id)
    connection.start()
    return connection


def wait_for_error(connection: MqttConnection, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if connection.last_error:
            return connection.last_error
        time.sleep(0.05)
    return ""


def test_tls_with_password_connects(tmp_path, pki) -> None:
    with start_broker(tmp_path, pki) as broker:
        connection = connect(settings(broker, tmp_path, "dev-a", pki["ca"]), "dev-a")
        try:
            assert connection.connected.wait(10)
        finally:
            connection.stop()


def test_unknown_ca_is_named(tmp_path, pki) -> None:
    with start_broker(tmp_path, pki) as broker:
        connection = connect(
            settings(broker, tmp_path, "dev-a", pki["other_ca"]), "dev-a"
        )
        try:
            error = wait_for_error(connection)
        finally:
            connection.stop()
    assert "unknown CA" in error
    assert not connection.connected.is_set()


def test_hostname_mismatch_is_named(tmp_path, pki) -> None:
    with start_broker(tmp_path, pki, certificate="wrong_host") as broker:
        connection = connect(settings(broker, tmp_path, "dev-a", pki["ca"]), "dev-a")
        try:
            error = wait_for_error(connection)
        finally:
            connection.stop()
    assert "hostname mismatch" in error


def test_insecure_flag_skips_hostname_check_with_warning(tmp_path, pki, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="dslo_edge.connection")
    with start_broker(tmp_path, pki, certificate="wrong_host") as broker:
        config = settings(broker, tmp_path, "dev-a", pki["ca"], tls_insecure=True)
        connection = connect(config, "dev-a")
        try:
            assert connection.connected.wait(10)
        finally:
            connection.stop()
    assert "hostname verification is off" in caplog.text


def test_non_pem_tls_files_are_named(tmp_path, pki) -> None:
    not_pem = tmp_path / "device.toml"
    not_pem.write_text('[device]\nid = "dev-a"\n')
    cases = [
        (
            MqttSettings(tls_ca_file=not_pem),
            f"cannot load the TLS CA file {not_pem} for dev-a: ",
            "expected the PEM certificate of the CA that signed the broker's "
            "certificate",
        ),
        (
            MqttSettings(tls_ca_file=pki["ca"], tls_cert_file=not_pem),
            f"cannot load the TLS client certificate {not_pem} for dev-a: ",
            "expected a PEM certificate and its PEM private key",
        ),
    ]
    for config, start, fix in cases:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        with pytest.raises(ConfigError) as caught:
            configure_tls(client, config, "dev-a")

        assert str(caught.value).startswith(start)
        assert str(caught.value).endswith(fix)


def test_wrong_password_is_refused(tmp_path, pki) -> None:
    with start_broker(tmp_path, pki) as broker:
        config = settings(broker, tmp_path, "dev-a", pki["ca"])
        config.password_file.write_text("not-the-password\n")
        connection = connect(config, "dev-a")
        try:
            error = wait_for_error(connection)
        finally:
            connection.stop()
    assert "refused" in error
    assert not connection.connected.is_set()


def test_refused_login_names_keys(tmp_path, pki) -> None:
    with start_broker(tmp_path, pki) as broker:
        wrong = settings(broker, tmp_path, "dev-a", pki["ca"])
        wrong.password_file.write_text("not-the-password\n")
        anonymous = MqttSettings(
            host="127.0.0.1", port=broker.port, tls_ca_file=pki["ca"]
        )
        errors = []
        for config in (wrong, anonymous):
            connection = connect(config, "dev-a")
            try:
                errors.append(wait_for_error(connection))
            finally:
                connection.stop()

    assert errors[0] == (
        "broker refused the connection: Not authorized; check that the broker's "
        f"password file has user 'dev-a' (mqtt.username) with the password in "
        f"{wrong.password_file}, and that its ACL lets that user connect"
    )
    assert errors[1] == (
        "broker refused the connection: Not authorized; the broker needs a "
        "login: set mqtt.username and mqtt.password_file"
    )


def test_plain_connection_to_tls_names_fix(tmp_path, pki) -> None:
    with start_broker(tmp_path, pki) as broker:
        config = settings(broker, tmp_path, "dev-a", pki["ca"], tls_ca_file=None)
        connection = connect(config, "dev-a")
        try:
            error = wait_for_error(connection)
        finally:
            connection.stop()

    assert error == (
        "disconnected: Unspecified error, before the broker answered the "
        "connect; if its listener expects TLS, set mqtt.tls_ca_file"
    )
    assert not connection.connected.is_set()


class Client:
    """A plain paho client over TLS that records what it receives."""

    def __init__(self, broker: Broker, ca: Path, user: str):
        self.received: list[tuple[str, bytes]] = []
        self.subscribe_codes: list[int] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"acl-{user}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(user, PASSWORDS[user])
        self.client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_message = lambda _c, _u, m: self.received.append(
            (m.topic, m.payload)
        )
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_subscribe(self, _c, _u, _mid, codes, _p) -> None:
        self.subscribe_codes += [code.value for code in codes]
        self.ready.set()

    def subscribe(self, topic: str) -> int:
        self.ready.clear()
        self.client.subscribe(topic, qos=1)
        assert self.ready.wait(10)
        return self.subscribe_codes[-1]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_acl_confines_each_device_to_its_topics(tmp_path, pki) -> None:
    with start_broker(tmp_path, pki) as broker:
        hub = Client(broker, pki["ca"], "hub")
        dev_a = Client(broker, pki["ca"], "dev-a")
        dev_b = Client(broker, pki["ca"], "dev-b")
        try:
            assert dev_a.subscribe("dslo/dev-a/updates") == 1
            # mosquitto grants the subscription but delivers nothing denied.
            dev_b.subscribe("dslo/dev-a/updates")
            assert hub.subscribe("dslo/#") == 1

            hub.publish("dslo/dev-a/updates", b"from hub")
            dev_b.publish("dslo/dev-a/updates", b"forged by dev-b")
            dev_a.publish("dslo/dev-a/status", b"online")
            dev_a.publish("dslo/dev-b/status", b"spoofed by dev-a")
            # Wait for the allowed messages, then 1 s more for any denied one.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (
                dev_a.received and ("dslo/dev-a/status", b"online") in hub.received
            ):
                time.sleep(0.05)
            time.sleep(1.0)
        finally:
            for client in (hub, dev_a, dev_b):
                client.close()

    assert dev_a.received == [("dslo/dev-a/updates", b"from hub")]
    assert dev_b.received == []
    hub_topics = [(topic, payload) for topic, payload in hub.received]
    assert ("dslo/dev-a/status", b"online") in hub_topics
    assert ("dslo/dev-b/status", b"spoofed by dev-a") not in hub_topics
    assert ("dslo/dev-a/updates", b"forged by dev-b") not in hub_topics


def test_password_file_sends_first_line(tmp_path, pki) -> None:
    with start_broker(tmp_path, pki) as broker:
        config = settings(broker, tmp_path, "dev-a", pki["ca"])
        # The line after the password is a note, not part of it.
        config.password_file.write_text(
            f"  {PASSWORDS['dev-a']}  \nrotated on 2026-12-01\n"
        )
        connection = connect(config, "dev-a")
        try:
            assert connection.connected.wait(10)
            assert connection.last_error is None
        finally:
            connection.stop()
