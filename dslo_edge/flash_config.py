"""The device config and firmware profile that flash installs on a device."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from dslo_edge.config import load_config, render_config
from dslo_edge.errors import ConfigError
from dslo_edge.label_protocol import HUB_LEVEL
from dslo_edge.profiles import FirmwareProfile
from dslo_edge.protocol import Topics
from dslo_edge.service import DEFAULT_CONFIG, DEFAULT_STATE_DIR

PROFILES_DIR = PurePosixPath("/etc/dslo-edge/profiles")
# A DNS name (at most 253 characters) or an IPv4 or IPv6 address literal.
# It keeps quotes, spaces and other characters that no host has out of
# device.toml. It does not check label lengths or IP address syntax.
BROKER_HOST_PATTERN = re.compile(r"[A-Za-z0-9.:-]{1,253}")
# An IPv6 address with a zone id, such as the link-local fe80::1%eth0, which
# the device config accepts as mqtt.host too.
SCOPED_IPV6_PATTERN = re.compile(r"[0-9A-Fa-f:.]{2,45}%[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class FlashOptions:
    """Values written into the generated device config."""

    device_id: str
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    batch_size: int = 32


def check_device_id(device_id: str, name: str = "device id", fix: str = "") -> None:
    """Raise ConfigError unless ``device_id`` can be one MQTT topic level.

    The level ``HUB_LEVEL`` is invalid too, because the hub workers' own
    topics use it. ``name`` is what the message calls the value, such as an
    option name, and ``fix`` is appended to the message.
    """
    try:
        Topics.for_device(device_id)
    except ConfigError:
        raise ConfigError(
            f"{name} {device_id!r} is invalid: expected a non-empty name without "
            f"'/', '+', '#', whitespace or NUL, for example 'kitchen-cam'{fix}"
        ) from None
    if device_id == HUB_LEVEL:
        raise ConfigError(
            f"{name} {device_id!r} is invalid: the hub workers' own topics use "
            f"that level, so no device can have it{fix}"
        )


def check_broker_host(host: str, name: str = "broker host") -> None:
    """Raise ConfigError unless ``host`` is a host name or an IP address.

    ``host`` must match ``BROKER_HOST_PATTERN``, or ``SCOPED_IPV6_PATTERN``
    with at least two colons. ``name`` is what the message calls the value,
    such as an option name.
    """
    if "://" in host:
        # A URL such as mqtt://hub.local:1883 would otherwise be read as the
        # host 'mqtt' with the port '//hub.local'.
        try:
            bare = urlsplit(host).hostname
        except ValueError:
            # urlsplit rejects a bracketed IPv6 host without its "]".
            bare = None
        example = f", such as {bare!r}," if bare else ""
        raise ConfigError(
            f"{name} {host!r} is invalid: it is a URL; give the host "
            f"alone{example} and the port with --broker-port"
        )
    if host.count(":") == 1:
        # The device config rejects a HOST:PORT pair, but its message names
        # mqtt.port, which a flash user does not set.
        raise ConfigError(
            f"{name} {host!r} is invalid: it contains a port; give the host "
            f"alone, such as {host.partition(':')[0]!r}, and the port with "
            "--broker-port"
        )
    scoped = host.count(":") >= 2 and SCOPED_IPV6_PATTERN.fullmatch(host)
    if not BROKER_HOST_PATTERN.fullmatch(host) and not scoped:
        raise ConfigError(
            f"{name} {host!r} is invalid: expected a host name or IP address of "
            "1 to 253 letters, digits, '-', '.' or ':', without spaces or quotes, "
            "for example hub.local or 192.168.1.10, or an IPv6 address with a "
            "zone id, such as fe80::1%eth0"
        )


def check_broker_port(port: int | str, name: str = "broker port") -> int:
    """Return ``port`` as an int if it is a TCP port number, 1 to 65535.

    Raises:
        ConfigError: ``port`` is not an integer in that range.
    """
    text = str(port)
    digits = text.isascii() and text.isdigit()
    if isinstance(port, bool) or not digits or not 1 <= int(text) <= 65535:
        raise ConfigError(
            f"{name} {text!r} is invalid: expected a port number from 1 to 65535, "
            "for example 1883 (MQTT) or 8883 (MQTT over TLS)"
        )
    return int(text)


def profile_reference(profile: FirmwareProfile) -> tuple[str, bytes | None]:
    """Return the ``device.profile`` value and the profile file to install, if any.

    A profile that dslo-edge ships unchanged is referenced by name, which the
    daemon finds in its installed ``firmware_profiles``. Any other profile
    file is installed under ``PROFILES_DIR`` and referenced by that path.
    """
    content = profile.source.read_bytes()
    shipped = _shipped_profile(profile.name)
    if shipped is not None and shipped.read_bytes() == content:
        return profile.name, None
    return str(PROFILES_DIR / f"{profile.name}.toml"), content


def _shipped_profile(name: str) -> Path | None:
    import firmware_profiles

    path = Path(firmware_profiles.__file__).resolve().parent / f"{name}.toml"
    return path if path.is_file() else None


def render_device_config(
    options: FlashOptions, bundle: PurePosixPath, profile: str
) -> str:
    """Return the device.toml text flash installs, validated by the loader.

    ``bundle`` is the bundle directory and ``profile`` the ``device.profile``
    value, both as paths on the device.

    Raises:
        ConfigError: an option makes the config invalid.
    """
    text = render_config(
        options.device_id,
        Path(str(bundle)),
        Path(str(DEFAULT_STATE_DIR)),
        options.broker_port,
        overrides={"device": {"profile": profile}},
    )
    # NOTE: render_config has no broker host parameter yet, so the host line it
    # writes is replaced here and the result is validated below.
    text = text.replace(
        'host = "127.0.0.1"', f"host = {json.dumps(options.broker_host)}"
    )
    _validate_config(text)
    return text


def _validate_config(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "device.toml"
        path.write_text(text)
        try:
            load_config(path)
        except ConfigError as error:
            message = str(error).replace(str(path), f"generated {DEFAULT_CONFIG}")
            raise ConfigError(message) from None
