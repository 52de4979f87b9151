"""Broker URL, login and TLS of the hub's command-line clients.

``push`` and ``ota-send`` take ``--broker mqtt://HOST[:PORT]`` (or
``mqtts://HOST[:PORT]`` for TLS) and the login options. The user name,
password file and TLS files are applied to the paho client by the same code
that ``MqttConnection`` uses for the ``[mqtt]`` table of a device or hub
config.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from dslo_edge.config import MqttSettings
from dslo_edge.config_service import read_password
from dslo_edge.connection import configure_auth, configure_tls, describe_tls_failure
from dslo_edge.errors import BrokerError, ConfigError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BrokerLogin:
    """User name, password file and TLS files for a broker connection.

    TLS is on when ``tls_ca_file`` is set, as for the ``[mqtt]`` config table.
    """

    username: str = ""
    password_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    def settings(self, host: str, port: int) -> MqttSettings:
        """Return the MqttSettings of a connection to ``host:port``."""
        return MqttSettings(
            host=host,
            port=port,
            username=self.username,
            password_file=self.password_file,
            tls_ca_file=self.tls_ca_file,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
        )

    def check(self) -> None:
        """Raise a ConfigError for options that only work together.

        It also rejects a password file that cannot be read or whose first
        line is empty or whitespace, which would log in with an empty password.
        """
        if self.password_file is not None and not self.username:
            raise ConfigError(
                "--password-file needs --username: the broker checks the "
                "password of a named user"
            )
        if self.password_file is not None:
            _check_password_file(self.password_file, self.username)
        for option, path in (
            ("--tls-cert-file", self.tls_cert_file),
            ("--tls-key-file", self.tls_key_file),
        ):
            if path is not None and self.tls_ca_file is None:
                raise ConfigError(
                    f"{option} {path} needs --tls-ca-file and an mqtts:// broker "
                    "URL: a client certificate is only sent over TLS"
                )


def _check_password_file(path: Path, username: str) -> None:
    try:
        password = read_password(path)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"cannot read --password-file {path}: {error}; expected a readable "
            "text file with the password on its first line"
        ) from error
    if not password:
        raise ConfigError(
            f"--password-file {path} contains no password; write the password of user "
            f"{username!r} on its first line, or drop --username and "
            "--password-file for a broker that accepts anonymous clients"
        )


def parse_broker_url(url: str) -> tuple[str, str, int]:
    """Split ``mqtt[s]://HOST[:PORT]`` into scheme, host and port.

    The port defaults to 1883 for ``mqtt`` and 8883 for ``mqtts``.

    Raises:
        ConfigError: another scheme, no host, an unbalanced or invalid IPv6
            address in brackets, an IPv6 address without brackets, user info,
            a path, query or fragment, or a port outside 1..65535.
    """
    expected = "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
    try:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    except ValueError as error:
        raise ConfigError(
            f"broker URL {_without_user_info(url)!r} is invalid ({error}); "
            f"{expected}, with an IPv6 address in brackets, such as "
            "mqtt://[::1]:1883"
        ) from None
    if parsed.username is not None or parsed.password is not None:
        raise ConfigError(
            f"broker URL {_without_user_info(url)!r} contains a user name or "
            "password, which would show in the process list; remove it and "
            "pass --username and --password-file"
        )
    if parsed.netloc.count(":") >= 2 and "[" not in parsed.netloc:
        # urlparse reads the text after the last colon as the port.
        raise ConfigError(
            f"broker URL {url!r} is invalid: an IPv6 address needs brackets; "
            f"{expected}, such as mqtt://[::1]:1883"
        )
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if parsed.scheme not in DEFAULT_PORTS or not parsed.hostname:
        raise ConfigError(f"broker URL {url!r} is invalid; {expected}")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ConfigError(
            f"broker URL {url!r} is invalid: MQTT uses no path, query or "
            f"fragment after the host and port; {expected}, and give the "
            "first topic level with --topic-prefix"
        )
    if port is not None and not 0 < port < 65536:
        raise ConfigError(
            f"broker URL {url!r} has an invalid port; {expected} with a port "
            "in 1..65535, or no port for the default"
        )
    return parsed.scheme, parsed.hostname, port or DEFAULT_PORTS[parsed.scheme]


def _without_user_info(url: str) -> str:
    scheme, _, rest = url.rpartition("://")
    host_part = rest.rpartition("@")[2]
    return f"{scheme}://{host_part}" if scheme else host_part


def broker_settings(url: str, login: BrokerLogin) -> MqttSettings:
    """Check a broker URL and its login options together.

    Raises:
        ConfigError: the URL is invalid, ``mqtts://`` lacks ``--tls-ca-file``,
            ``mqtt://`` has TLS files, or the login options do not fit.
    """
    scheme, host, port = parse_broker_url(url)
    login.check()
    if scheme == "mqtts" and login.tls_ca_file is None:
        raise ConfigError(
            f"broker URL {url!r} uses TLS; pass --tls-ca-file with the CA "
            "certificate that signed the broker's certificate"
        )
    if scheme == "mqtt" and login.tls_ca_file is not None:
        raise ConfigError(
            f"--tls-ca-file is given but the broker URL {url!r} is plain MQTT; "
            f"use mqtts://{host}:{port} to connect with TLS"
        )
    return login.settings(host, port)


def start_client(client: mqtt.Client, settings: MqttSettings, label: str) -> None:
    """Log in with ``settings``, start the network loop and wait for the CONNACK.

    ``client.on_connect``, if set, is then called for each accepted CONNACK.

    Raises:
        ConfigError: a TLS file cannot be read.
        BrokerError: the broker cannot be reached, the TLS handshake failed,
            the broker refused the login, closed the connection before its
            CONNACK, or sent no CONNACK within 10 s.
    """
    configure_auth(client, settings)
    configure_tls(client, settings, label)
    address = f"{settings.host}:{settings.port}"
    answered = threading.Event()
    failure_reasons: list[str] = []
    accepted_callback: Any = client.on_connect
    closed_before_answer: list[str] = []
    disconnected_callback: Any = client.on_disconnect

    def on_disconnect(
        own: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if not answered.is_set():
            closed_before_answer.append(str(reason))
            answered.set()
        elif disconnected_callback is not None:
            disconnected_callback(own, userdata, flags, reason, properties)

    def on_connect(
        own: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            failure_reasons.append(str(reason))
        elif accepted_callback is not None:
            accepted_callback(own, userdata, flags, reason, properties)
        answered.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect(settings.host, settings.port, keepalive=30)
    except ssl.SSLError as error:
        failure = describe_tls_failure(error, "--tls-ca-file", "the --broker host")
        raise BrokerError(f"TLS connection to {address} failed: {failure}") from error
    except OSError as error:
        raise BrokerError(
            f"cannot reach the broker at {address}: {error}; expected an MQTT "
            "broker listening there, so start it or pass its URL with --broker"
        ) from error
    client.loop_start()
    try:
        answered_in_time = answered.wait(CONNECT_TIMEOUT_S)
    except KeyboardInterrupt:
        # The caller gets no client to close, so stop the network thread here.
        client.disconnect()
        client.loop_stop()
        raise
    if answered_in_time and not (failure_reasons or closed_before_answer):
        client.on_disconnect = disconnected_callback
        return
    client.disconnect()
    client.loop_stop()
    if closed_before_answer and not settings.uses_tls:
        # mosquitto closes a plain connection to a TLS listener this way.
        raise BrokerError(
            f"the broker at {address} closed the connection before answering "
            f"it ({closed_before_answer[0]}); if its listener expects TLS, use "
            f"mqtts://{address} with --tls-ca-file"
        )
    if closed_before_answer:
        raise BrokerError(
            f"the broker at {address} closed the connection before answering "
            f"it ({closed_before_answer[0]})"
        )
    if failure_reasons:
        raise BrokerError(
            f"the broker at {address} refused the connection ({failure_reasons[0]}); "
            "check --username and --password-file"
        )
    raise BrokerError(
        f"the broker at {address} did not accept the connection within "
        f"{CONNECT_TIMEOUT_S:.0f} s"
    )
