"""Device settings for connection, security, health, logging and costs.

Each table of the device TOML file outside training has a frozen dataclass
here and a ``read_<table>`` function that validates it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dslo_edge.budget import BudgetSettings
from dslo_edge.config_reader import TableReader
from dslo_edge.errors import ConfigError
from dslo_edge.log_files import RotatingLogFile
from dslo_edge.protocol import TOPIC_LEVEL_EXPECTED, is_topic_level

MQTT_PROTOCOLS = ("5", "3.1.1")


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "dslo"
    keepalive: int = 30
    client_id: str = ""
    protocol: str = "5"
    # MQTT 5 only: how long the broker keeps the session and queued updates
    # while the device is offline.
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    username: str = ""
    password_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_insecure: bool = False

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca_file is not None


@dataclass(frozen=True)
class SecuritySettings:
    """Update authentication: HMAC-SHA256 with a per-device key."""

    hmac_key_file: Path | None = None


@dataclass(frozen=True)
class HealthSettings:
    """Health checks every ``probe_every`` updates and before every checkpoint.

    With ``probe_every`` 0 the checks run only before checkpoints.
    """

    probe_every: int = 0
    max_accuracy_drop: float = 0.1


@dataclass(frozen=True)
class RequestsSettings:
    """Label requests for uncertain inputs seen on ``dslo/<id>/infer``.

    Off by default; they need MQTT 5 and a running ``dslo-edge hub``.
    """

    enabled: bool = False
    rule: str = "confidence"
    max_confidence: float = 0.6
    min_disagreement: float = 0.3
    max_samples: int = 32
    timeout_s: float = 5.0
    max_attempts: int = 4
    max_pending: int = 8


@dataclass(frozen=True)
class HomeAssistantSettings:
    """MQTT discovery messages published by the device on every connect."""

    enabled: bool = True
    prefix: str = "homeassistant"


@dataclass(frozen=True)
class LoggingSettings:
    """Optional log and metrics files, each rotated at ``max_bytes``."""

    file: Path | None = None
    metrics_file: Path | None = None
    max_bytes: int = 5 * 1024 * 1024
    backups: int = 2

    def open_file(
        self, path: Path, key: str, default: str | None = None
    ) -> RotatingLogFile:
        """Open ``path`` for appending, rotated at max_bytes, creating its directories.

        ``key`` is the config key that sets the path, such as ``logging.file``.
        ``default`` describes where the path comes from when ``key`` is unset,
        such as ``metrics.jsonl in device.state_dir``, and None means that
        ``key`` set it.

        Raises:
            ConfigError: the path is a directory, part of it is a file, or
                it cannot be created or written.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return RotatingLogFile(str(path), self.max_bytes, self.backups)
        except IsADirectoryError:
            problem = "it is a directory"
        except (FileExistsError, NotADirectoryError):
            problem = "part of its path is a file, not a directory"
        except OSError as error:
            problem = error.strerror or str(error)
        if default is None:
            raise ConfigError(
                f"cannot open {key} {path}: {problem}; set {key} to a file in a "
                "directory that the daemon's user can write"
            )
        raise ConfigError(
            f"cannot open {path} ({key} is unset, so the daemon uses {default}): "
            f"{problem}; make {path} a file that the daemon's user can write, or "
            f"set {key} to another file"
        )


MACHINE_ID_PATHS = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))


def machine_id() -> str:
    """Return this machine's id from systemd or D-Bus, else a hash of the hostname."""
    for path in MACHINE_ID_PATHS:
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value:
            return value
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()


def default_client_id(device_id: str, role: str) -> str:
    """Return a client id unique per device, role and machine."""
    return f"dslo-{role}-{device_id}-{machine_id()[:12]}"


MQTT_HOST_EXPECTED = (
    "a host name or IP address without a scheme, port, '/' or whitespace, such "
    "as hub.local or 192.168.1.10; set the port in mqtt.port"
)


def is_mqtt_host(value: str) -> bool:
    """Return whether ``value`` can be a broker host name or IP address.

    Rejects the usual slips that no lookup can resolve: a URL such as
    ``mqtt://hub.lan``, a ``host:port`` pair, whitespace and control
    characters. An IPv6 address has at least two colons, so it passes.
    """
    if not value or "/" in value or value.count(":") == 1:
        return False
    return value.isprintable() and not any(c.isspace() for c in value)


def read_mqtt(reader: TableReader) -> MqttSettings:
    settings = MqttSettings(
        host=reader.get("host", str, "127.0.0.1", is_mqtt_host, MQTT_HOST_EXPECTED),
        port=reader.get(
            "port", int, 1883, lambda v: 0 < v < 65536, "a port in 1..65535"
        ),
        topic_prefix=reader.get(
            "topic_prefix",
            str,
            "dslo",
            is_topic_level,
            f"{TOPIC_LEVEL_EXPECTED}, for example 'dslo'",
        ),
        keepalive=reader.get(
            "keepalive", int, 30, lambda v: 5 <= v <= 3600, "seconds in 5..3600"
        ),
        client_id=reader.get("client_id", str, ""),
        protocol=reader.get(
            "protocol", str, "5", lambda v: v in MQTT_PROTOCOLS, "'5' or '3.1.1'"
        ),
        session_expiry_s=reader.get(
            "session_expiry_s",
            int,
            7 * 24 * 3600,
            lambda v: 0 <= v < 2**32,
            "seconds in 0..4294967295",
        ),
        reconnect_min_s=reader.get(
            "reconnect_min_s",
            float,
            1.0,
            lambda v: 0.1 <= v <= 60,
            "seconds in 0.1..60",
        ),
        reconnect_max_s=reader.get(
            "reconnect_max_s",
            float,
            60.0,
            lambda v: 1 <= v <= 3600,
            "seconds in 1..3600",
        ),
        username=reader.get("username", str, ""),
        password_file=reader.file("password_file"),
        tls_ca_file=reader.file("tls_ca_file"),
        tls_cert_file=reader.file("tls_cert_file"),
        tls_key_file=reader.file("tls_key_file"),
        tls_insecure=reader.get("tls_insecure", bool, False),
    )
    if settings.reconnect_max_s < settings.reconnect_min_s:
        raise reader.fail(
            "reconnect_max_s", settings.reconnect_max_s, "at least reconnect_min_s"
        )
    check_tls_client_files(reader, settings)
    check_login(reader, settings)
    reader.reject_unknown()
    return settings


def check_login(reader: TableReader, settings: MqttSettings) -> None:
    """Raise ConfigError when ``password_file`` is set without ``username``.

    The broker checks a password against a user name, so a password
    without one is not a usable login. A password file whose first line is
    empty would log in with an empty password. ``dslo-edge push`` rejects
    both too.
    """
    if not settings.password_file:
        return
    if not settings.username:
        raise reader.fail(
            "password_file",
            str(settings.password_file),
            "username to be set too, because the broker checks the password "
            "of a named user",
        )
    try:
        password = read_password(settings.password_file)
    except (OSError, UnicodeDecodeError):
        # The connect reads the file again and reports the error, and this
        # user may lack the service user's read permission.
        return
    if not password:
        raise reader.fail(
            "password_file",
            str(settings.password_file),
            f"a file whose first line is the password of user "
            f"{settings.username!r}, not an empty line",
        )


def read_password(path: Path) -> str:
    """Return the first line of a password file, without surrounding whitespace.

    Raises:
        OSError, UnicodeDecodeError: the file cannot be read as text.
    """
    lines = path.read_text().splitlines()
    return lines[0].strip() if lines else ""


def check_tls_client_files(reader: TableReader, settings: MqttSettings) -> None:
    """Raise ConfigError when a TLS client file is set without ``tls_ca_file``.

    TLS is on only with a CA file, so a client certificate or key alone
    would be ignored and the client would connect without TLS.
    """
    for key in ("tls_cert_file", "tls_key_file"):
        value = getattr(settings, key)
        if value and not settings.tls_ca_file:
            raise reader.fail(key, str(value), "tls_ca_file to be set too")


def read_security(reader: TableReader) -> SecuritySettings:
    settings = SecuritySettings(hmac_key_file=reader.file("hmac_key_file"))
    reader.reject_unknown()
    return settings


def read_health(reader: TableReader) -> HealthSettings:
    settings = HealthSettings(
        probe_every=reader.get(
            "probe_every",
            int,
            0,
            lambda v: v >= 0,
            "a count of updates >= 0 (0 checks only before checkpoints)",
        ),
        max_accuracy_drop=reader.get(
            "max_accuracy_drop", float, 0.1, lambda v: 0 < v <= 1, "a number in (0, 1]"
        ),
    )
    reader.reject_unknown()
    return settings


def _check_default_resume_percent(reader: TableReader, values: dict[str, Any]) -> None:
    """Raise ConfigError when battery_min_percent exceeds an unset resume default."""
    minimum = values["battery_min_percent"]
    resume = values["battery_resume_percent"]
    if "battery_resume_percent" in reader.table or minimum <= resume:
        return
    raise ConfigError(
        f"{reader.source}: [budget] battery_resume_percent = {resume} (the "
        f"default) is invalid; expected {minimum}..100, at least "
        "battery_min_percent; set battery_resume_percent in [budget] too"
    )


def read_budget(reader: TableReader) -> BudgetSettings:
    def optional(key: str, check: Any, expected: str) -> float | None:
        # A missing key means "not set"; any written value must be valid.
        return reader.get(key, float, None, lambda v: v is None or check(v), expected)

    percent = (lambda v: 0 <= v <= 100, "a percentage in 0..100")
    # The reader's errors name the file and key. Only the cross-key checks of
    # BudgetSettings need the prefix added below.
    values = {
        "battery_min_percent": reader.get("battery_min_percent", float, 20.0, *percent),
        "battery_resume_percent": reader.get(
            "battery_resume_percent", float, 25.0, *percent
        ),
        "thermal_limit_c": optional(
            "thermal_limit_c", lambda v: 20 <= v <= 150, "degrees C in 20..150"
        ),
        "thermal_resume_margin_c": reader.get(
            "thermal_resume_margin_c",
            float,
            5.0,
            lambda v: 0 <= v <= 50,
            "degrees in 0..50",
        ),
        "energy_budget_j_per_hour": optional(
            "energy_budget_j_per_hour", lambda v: v > 0, "finite positive joules"
        ),
    }
    _check_default_resume_percent(reader, values)
    try:
        settings = BudgetSettings(**values)
    except ConfigError as error:
        raise ConfigError(f"{reader.source}: [budget] {error}") from error
    reader.reject_unknown()
    return settings


def read_requests(reader: TableReader, mqtt: MqttSettings) -> RequestsSettings:
    unit = (lambda v: 0 < v <= 1, "a number in (0, 1]")
    settings = RequestsSettings(
        enabled=reader.get("enabled", bool, False),
        rule=reader.get(
            "rule",
            str,
            "confidence",
            lambda v: v in ("confidence", "disagreement", "either"),
            "'confidence', 'disagreement' or 'either'",
        ),
        max_confidence=reader.get("max_confidence", float, 0.6, *unit),
        min_disagreement=reader.get("min_disagreement", float, 0.3, *unit),
        max_samples=reader.get(
            "max_samples", int, 32, lambda v: 1 <= v <= 4096, "a count in 1..4096"
        ),
        timeout_s=reader.get(
            "timeout_s", float, 5.0, lambda v: 0.1 <= v <= 3600, "seconds in 0.1..3600"
        ),
        max_attempts=reader.get(
            "max_attempts", int, 4, lambda v: 1 <= v <= 100, "a count in 1..100"
        ),
        max_pending=reader.get(
            "max_pending", int, 8, lambda v: 1 <= v <= 1000, "a count in 1..1000"
        ),
    )
    if settings.enabled and mqtt.protocol != "5":
        raise reader.fail(
            "enabled",
            True,
            "false, or mqtt.protocol = '5': label requests use MQTT 5 response topics",
        )
    reader.reject_unknown()
    return settings


def _publishable_prefix(value: str) -> bool:
    # Discovery messages are published under this prefix, and MQTT forbids
    # wildcards and NUL in a publish topic.
    return bool(value) and not any(char in value for char in "+#\0")


def read_homeassistant(reader: TableReader) -> HomeAssistantSettings:
    settings = HomeAssistantSettings(
        enabled=reader.get("enabled", bool, True),
        prefix=reader.get(
            "prefix",
            str,
            "homeassistant",
            _publishable_prefix,
            "a topic prefix without '+', '#' or NUL, such as 'homeassistant'",
        ),
    )
    reader.reject_unknown()
    return settings


# The daemon's metrics log in device.state_dir when logging.metrics_file is unset.
METRICS_LOG = "metrics.jsonl"


def read_logging(reader: TableReader, state_dir: Path | None = None) -> LoggingSettings:
    """Read the [logging] table; ``state_dir`` places the default metrics log."""

    def optional_path(key: str) -> Path | None:
        value = reader.get(key, str, "")
        return reader.source.parent / value if value else None

    settings = LoggingSettings(
        file=optional_path("file"),
        metrics_file=optional_path("metrics_file"),
        max_bytes=reader.get(
            "max_bytes",
            int,
            5 * 1024 * 1024,
            lambda v: v >= 4096,
            "a byte count of at least 4096",
        ),
        backups=reader.get("backups", int, 2, lambda v: 0 <= v <= 100, "0..100"),
    )
    reader.reject_unknown()
    _check_log_files(reader.source, settings)
    if state_dir is not None and settings.metrics_file is None:
        _check_default_metrics_log(reader.source, settings, state_dir / METRICS_LOG)
    return settings


def _check_default_metrics_log(
    source: Path, settings: LoggingSettings, metrics: Path
) -> None:
    """Raise ConfigError when logging.file names the default metrics log."""
    if settings.file is not None and _same_file(settings.file, metrics):
        raise ConfigError(
            f"{source}: logging.file {settings.file} is the metrics log that the "
            f"daemon writes to {METRICS_LOG} in device.state_dir, because "
            "logging.metrics_file is unset; give logging.file another path"
        )


def _check_log_files(source: Path, settings: LoggingSettings) -> None:
    """Reject log paths whose rotation would destroy a file of other content.

    Rotation renames the file to ``.1`` and deletes the oldest copy, so a
    log path that names the config file or another file ends up deleted.

    Raises:
        ConfigError: a path is the config file, both paths name one file,
            ``file`` is a non-empty file that is not a daemon log, or
            ``metrics_file`` is a non-empty file that is not a metrics log.
    """
    paths = {"file": settings.file, "metrics_file": settings.metrics_file}
    for key, path in paths.items():
        if path is not None and _same_file(path, source):
            raise ConfigError(
                f"{source}: logging.{key} {path} is this config file, which the "
                "daemon would append to and rotate away; choose another path"
            )
    if settings.file is not None and settings.metrics_file is not None:
        if _same_file(settings.file, settings.metrics_file):
            raise ConfigError(
                f"{source}: logging.file and logging.metrics_file both name "
                f"{settings.file}; give each its own file"
            )
    log = settings.file
    if log is not None and not _starts_like_daemon_log(log):
        raise ConfigError(
            f"{source}: logging.file {log} is a file that is not a dslo-edge log "
            "(it does not start with a 'YYYY-MM-DD ' time stamp); the daemon "
            "would append to it and delete it after rotations, so choose "
            "another path or move the file aside"
        )
    metrics = settings.metrics_file
    if metrics is not None and not _starts_like_metrics_log(metrics):
        raise ConfigError(
            f"{source}: logging.metrics_file {metrics} is a file that is not a "
            "metrics log (its first byte is not '{'); the daemon would append "
            "to it and delete it after rotations, so choose another path or "
            "move the file aside"
        )


def _same_file(first: Path, second: Path) -> bool:
    try:
        return first.samefile(second)
    except OSError:
        # A missing path, or a symlink loop, which open_file reports later.
        # Path.resolve raises RuntimeError for a loop up to Python 3.12, and
        # os.path.realpath does not.
        return os.path.realpath(first) == os.path.realpath(second)


# The start of each line of the daemon's log, such as "2026-12-05 17:20:01,123",
# with "d" for any decimal digit.
DAEMON_LOG_START = b"dddd-dd-dd "
# The start of each line of the metrics log, one JSON object per line.
METRICS_LOG_START = b"{"


def _starts_like_daemon_log(path: Path) -> bool:
    """Check that ``path`` is missing, empty, not a file, or starts with a date.

    A key, certificate or other program's log does not start with the
    daemon's time stamp, so rotating it away would destroy data.
    """
    return _starts_like(path, DAEMON_LOG_START)


def _starts_like_metrics_log(path: Path) -> bool:
    """Check that ``path`` is missing, empty, not a file, or starts with '{'."""
    return _starts_like(path, METRICS_LOG_START)


def _starts_like(path: Path, line_start: bytes) -> bool:
    """Check that ``path`` is missing, empty, not a file, or starts with ``line_start``.

    A start shorter than ``line_start``, as after a first line that a crash
    cut short, is checked as far as it goes. A file starting with a zero byte
    passes, because a power cut can leave one on some file systems and a
    device that lost power must still start.
    """
    if not path.is_file():
        # Opening a named pipe or a terminal to read would wait for a writer
        # or for keyboard input, and RotatingFileHandler never rotates them.
        return True
    try:
        with path.open("rb") as stream:
            start = stream.read(len(line_start))
    except OSError:
        # An unreadable file is left to the handler, which opens it to append.
        return True
    if start.startswith(b"\0"):
        return True
    return all(
        byte == expected or (expected == ord("d") and ord("0") <= byte <= ord("9"))
        for byte, expected in zip(start, line_start, strict=False)
    )
