"""A supervised MQTT connection: persistent session, TLS, backoff with jitter.

paho's own reconnect loop backs off without jitter, so two devices that share
a client id by mistake would kick each other off in lockstep. This module
runs paho's network loop in its own thread and reconnects with capped
exponential backoff and random jitter, logging one line per attempt, and
names the check that failed when a TLS handshake is rejected.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dslo_edge.config import MAX_MQTT_PACKET_BYTES, MqttSettings
from dslo_edge.config_service import read_password
from dslo_edge.errors import ConfigError

logger = logging.getLogger(__name__)
# Room in a packet for the topic, whose levels take up to 32,000 bytes each,
# and the properties.
PACKET_HEADROOM_BYTES = 256 * 1024


def packet_size_limit(largest_payload: int) -> int:
    """Return the MQTT 5 Maximum Packet Size of a client, from its largest payload.

    An MQTT 5 broker discards a larger message for the client without
    sending it, so one message cannot make the network thread read hundreds
    of MiB before any check. The bound is twice the largest payload, so that
    a payload somewhat over the client's own limit still arrives and is
    rejected with a message that names the limit, for its sender to fix.
    MQTT 3.1.1 has no such bound.
    """
    return min(2 * largest_payload + PACKET_HEADROOM_BYTES, MAX_MQTT_PACKET_BYTES)


# MQTT 5 DISCONNECT reason code sent when another client connects with the
# same client id.
SESSION_TAKEN_OVER = 142
# CONNACK reason codes of a refused login: MQTT 5 "Bad user name or password"
# and "Not authorized". paho-mqtt 2.2.0 maps the MQTT 3.1.1 return codes 4 and
# 5 to them.
LOGIN_REFUSALS = (0x86, 0x87)
# A connection that stayed up this long resets the backoff to its minimum.
STABLE_CONNECTION_S = 10.0


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with "equal jitter": half fixed, half random."""

    minimum: float
    maximum: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.maximum, self.minimum * 2 ** min(attempt, 30))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


def describe_tls_failure(
    error: ssl.SSLError, ca_key: str = "mqtt.tls_ca_file", host_key: str = "mqtt.host"
) -> str:
    """Return which TLS check failed, in words an operator can act on.

    ``ca_key`` and ``host_key`` name the setting or option to check.
    """
    if isinstance(error, ssl.SSLCertVerificationError):
        code = getattr(error, "verify_code", None)
        message = getattr(error, "verify_message", "") or str(error)
        if code in (19, 20, 21):
            return f"unknown CA ({message}); check {ca_key}"
        if code in (62, 64) or "mismatch" in message.lower():
            return f"hostname mismatch ({message}); check {host_key}"
        if code == 10:
            return f"certificate expired ({message})"
        return f"certificate verification failed ({message})"
    return f"TLS handshake failed ({error.reason or error})"


def describe_refusal(reason: Any, settings: MqttSettings) -> str:
    """Return a refused CONNACK's reason with the [mqtt] keys to check."""
    text = f"broker refused the connection: {reason}"
    if getattr(reason, "value", None) not in LOGIN_REFUSALS:
        return text
    if not settings.username:
        return (
            f"{text}; the broker needs a login: set mqtt.username and "
            "mqtt.password_file"
        )
    return (
        f"{text}; check that the broker's password file has user "
        f"{settings.username!r} (mqtt.username) with the password in "
        f"{settings.password_file or 'mqtt.password_file, which is not set'}, "
        "and that its ACL lets that user connect"
    )


def configure_auth(client: mqtt.Client, settings: MqttSettings) -> None:
    """Set the user name and the password read from ``settings.password_file``.

    Raises:
        ConfigError: the password file cannot be read as UTF-8 text.
    """
    if not settings.username:
        return
    password = None
    if settings.password_file is not None:
        try:
            password = read_password(settings.password_file)
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(
                f"cannot read mqtt.password_file {settings.password_file}: {error}; "
                "expected a UTF-8 text file that the service's user can read, "
                "with the password on its first line"
            ) from error
    client.username_pw_set(settings.username, password)


def _check_tls_files(settings: MqttSettings, label: str) -> None:
    """Load each TLS file on its own, so an error names the file that failed.

    Raises:
        ConfigError: the CA file, or the client certificate and key, cannot
            be read or are not PEM.
    """
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=str(settings.tls_ca_file))
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(
            f"cannot load the TLS CA file {settings.tls_ca_file} for {label}: "
            f"{error}; expected the PEM certificate of the CA that signed the "
            "broker's certificate"
        ) from error
    if settings.tls_cert_file is None:
        return
    key = settings.tls_key_file
    files = f"{settings.tls_cert_file}" + (f" and key {key}" if key else "")
    try:
        context.load_cert_chain(settings.tls_cert_file, key)
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(
            f"cannot load the TLS client certificate {files} for {label}: "
            f"{error}; expected a PEM certificate and its PEM private key"
        ) from error


def configure_tls(client: mqtt.Client, settings: MqttSettings, label: str) -> None:
    """Turn on TLS with the settings' CA and client files, if a CA file is set.

    Raises:
        ConfigError: a TLS file cannot be read or is not PEM.
    """
    if not settings.uses_tls:
        return
    _check_tls_files(settings, label)
    try:
        client.tls_set(
            ca_certs=str(settings.tls_ca_file),
            certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
            keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f"cannot load the TLS files for {label}: {error}") from error
    if settings.tls_insecure:
        logger.warning(
            "TLS hostname verification is off for %s (mqtt.tls_insecure); "
            "anyone holding a certificate from this CA can impersonate the broker",
            label,
        )
        client.tls_insecure_set(True)


class MqttConnection:
    """One client, its network thread, and the reconnect policy.

    Args:
        settings: broker address, session, TLS and authentication settings.
        client_id: the MQTT client id; keep it stable so the broker can resume
            the persistent session.
        will: (topic, payload) published retained by the broker if the
            connection drops without a DISCONNECT.
        on_connected: called on the network thread after each accepted
            CONNACK, with the session-present flag.
        on_message: called on the network thread for each message; with
            ``manual_ack`` the callee must later call ``ack``.
        on_disconnected: called on the network thread each time the
            connection drops or closes.
        label: a name for log lines, such as "device kitchen-pi".
        takeover_fix: what to do when another client uses the same client
            id, ending the log line about the takeover.
    """

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        will: tuple[str, str] | None = None,
        on_connected: Callable[[bool], None] | None = None,
        on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        maximum_packet_size: int | None = None,
        label: str = "client",
        takeover_fix: str = "give each device its own id",
    ):
        self.settings = settings
        self.takeover_fix = takeover_fix
        self.client_id = client_id
        self.label = label
        self.receive_maximum = receive_maximum
        self.maximum_packet_size = maximum_packet_size
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self.last_error: str | None = None
        # Whether nothing listened at the broker's address on the last attempt.
        self._refused = False
        # Whether the broker sent a CONNACK on the current connection.
        self._answered = False
        self.takeovers = 0
        self.connects = 0
        # Counts request_reconnect calls. A connection during which it grew
        # was dropped on purpose, so it is neither a failure nor a takeover.
        self._reconnect_requests = 0
        # Makes a request's count and its disconnect one step for _supervise.
        self._reconnect_lock = threading.Lock()
        self._short_connections = 0
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_disconnected = on_disconnected
        self._rng = random.Random()
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._thread = threading.Thread(
            target=self._supervise, name=f"mqtt-{label}", daemon=True
        )
        self.client = self._make_client(will, manual_ack)

    @property
    def is_v5(self) -> bool:
        return self.settings.protocol == "5"

    def _make_client(
        self, will: tuple[str, str] | None, manual_ack: bool
    ) -> mqtt.Client:
        protocol = mqtt.MQTTv5 if self.is_v5 else mqtt.MQTTv311
        extra: dict[str, Any] = {} if self.is_v5 else {"clean_session": False}
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
            **extra,
        )
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        self._configure_auth(client)
        self._configure_tls(client)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        return client

    def _configure_auth(self, client: mqtt.Client) -> None:
        configure_auth(client, self.settings)

    def _configure_tls(self, client: mqtt.Client) -> None:
        configure_tls(client, self.settings, self.label)

    def _connect_properties(self) -> Properties | None:
        if not self.is_v5:
            return None
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        if self.receive_maximum:
            properties.ReceiveMaximum = self.receive_maximum
        if self.maximum_packet_size:
            properties.MaximumPacketSize = self.maximum_packet_size
        return properties

    # Lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly (the broker then discards the will) and join."""
        self.stopping.set()
        self.client.disconnect()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def request_reconnect(self) -> None:
        """Drop the connection and reconnect at once, resuming the session.

        The broker then sends every unacknowledged message again. Does
        nothing while no connection is up, because the next connection
        resumes the session too. A disconnect then could drop a connection
        before its CONNACK, which counts as a failure.
        """
        with self._reconnect_lock:
            if not self.connected.is_set():
                return
            self._reconnect_requests += 1
            self.client.disconnect()

    def _supervise(self) -> None:
        attempt = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            with self._reconnect_lock:
                requests = self._reconnect_requests
            if self._connect_once():
                self.client.loop_forever(timeout=0.5)
                lasted = time.monotonic() - started
                if lasted >= STABLE_CONNECTION_S:
                    attempt = 0
                    self._short_connections = 0
                if self._reconnect_requests == requests:
                    self._check_takeover(lasted)
            if self.stopping.is_set():
                return
            if self._reconnect_requests != requests:
                continue
            delay = self._backoff.delay(attempt, self._rng)
            attempt += 1
            logger.warning(
                "%s: broker %s:%d unavailable (%s); reconnecting in %.1f s%s",
                self.label,
                self.settings.host,
                self.settings.port,
                self.last_error or "connection closed",
                delay,
                self._address_hint(),
            )
            self.stopping.wait(delay)

    def _address_hint(self) -> str:
        """Return a hint to check the address while no connection has succeeded.

        A refused first connection is what a mistyped host or port gives, and
        the retries alone do not tell it apart from a broker still starting.
        """
        if self.connects or not self._refused:
            return ""
        return (
            "; no connection has succeeded since the start, so check the host "
            "and port in the [mqtt] table unless the broker is still starting"
        )

    def _check_takeover(self, lasted: float) -> None:
        # Brokers that send no DISCONNECT reason (mosquitto 2.0.11 closes the
        # socket) show a takeover only as connections that keep dropping
        # right after they were accepted.
        if self.connects == 0:
            return
        closed_without_reason = self.last_error == "disconnected: Unspecified error"
        if lasted < STABLE_CONNECTION_S and closed_without_reason:
            self._short_connections += 1
            if self._short_connections == 3:
                self.takeovers += 1
                logger.error(
                    "%s: the broker closed 3 connections in a row within %.0f s of "
                    "accepting them; another client is probably using client id %s "
                    "(session taken over); %s",
                    self.label,
                    STABLE_CONNECTION_S,
                    self.client_id,
                    self.takeover_fix,
                )

    def _connect_once(self) -> bool:
        clean_start: Any = False if self.is_v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY
        self._answered = False
        self._refused = False
        try:
            self.client.connect(
                self.settings.host,
                self.settings.port,
                self.settings.keepalive,
                clean_start=clean_start,
                properties=self._connect_properties(),
            )
        except ssl.SSLError as error:
            self.last_error = describe_tls_failure(error)
            return False
        except OSError as error:
            self.last_error = str(error) or type(error).__name__
            self._refused = isinstance(error, ConnectionRefusedError)
            return False
        return True

    # paho callbacks, on this connection's thread

    def _handle_connect(
        self, _c: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any
    ) -> None:
        self._answered = True
        if reason.is_failure:
            self.last_error = describe_refusal(reason, self.settings)
            logger.error("%s: %s", self.label, self.last_error)
            self.client.disconnect()
            return
        self.connects += 1
        self.last_error = None
        self.connected.set()
        session_present = bool(getattr(flags, "session_present", False))
        logger.info(
            "%s connected to %s:%d as %s (session %s)",
            self.label,
            self.settings.host,
            self.settings.port,
            self.client_id,
            "resumed" if session_present else "new",
        )
        if self._on_connected:
            self._on_connected(session_present)

    def _handle_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any
    ) -> None:
        self.connected.clear()
        if self._on_disconnected:
            self._on_disconnected()
        if self.stopping.is_set():
            return
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            self.takeovers += 1
            self.last_error = (
                f"session taken over: another client connected with id "
                f"{self.client_id}; {self.takeover_fix}"
            )
            logger.error("%s: %s", self.label, self.last_error)
        elif not self._answered and not self.settings.uses_tls:
            # mosquitto closes a plain connection to a TLS listener this way.
            self.last_error = (
                f"disconnected: {reason}, before the broker answered the "
                "connect; if its listener expects TLS, set mqtt.tls_ca_file"
            )
        elif not (self.last_error or "").startswith("broker refused"):
            # A refused CONNACK already set the more useful reason.
            self.last_error = f"disconnected: {reason}"

    def _handle_message(
        self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage
    ) -> None:
        if self._on_message:
            self._on_message(message)

    # Used from any thread

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        if not self.is_v5:
            properties = None
        return self.client.publish(
            topic, payload, qos=1, retain=retain, properties=properties
        )

    def ack(self, mid: int, qos: int) -> None:
        self.client.ack(mid, qos)
