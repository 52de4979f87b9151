"""HMAC-SHA256 authentication of update payloads with a per-device key.

A signed payload is an envelope around the plain update:

    offset 0   4 bytes   magic "DSLS"
    offset 4   1 byte    envelope version, 1
    offset 5  32 bytes   HMAC-SHA256(key, "dslo-update" NUL topic NUL body)
    offset 37  ...       the update body (starts with "DSLO")

The topic is inside the MAC, so an update signed for one device cannot be
replayed to another device that shares the key. Replays to the same device
are caught by the message-id record and the freshness window.
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
import logging
import os
import secrets
import string
from pathlib import Path

from dslo_edge.errors import ConfigError, InvalidUpdate

SIGNED_MAGIC = b"DSLS"
ENVELOPE_VERSION = 1
TAG_BYTES = 32
HEADER_BYTES = len(SIGNED_MAGIC) + 1 + TAG_BYTES
MIN_KEY_BYTES = 16
KEYGEN_KEY_BYTES = 32
# Share of hex digits among a key file's non-whitespace characters from which
# the file is read as hex text and must decode.
HEX_TEXT_SHARE = 0.9
UNEXPECTED_SIGNATURE = "unexpected_signature"
_HEX_TEXT = frozenset(string.hexdigits + string.whitespace)
# Byte order marks that text editors, Windows Notepad among them, may write at
# the start of a key file saved as text, and the codec each one selects.
_TEXT_ENCODINGS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_NEW_KEY_FIX = (
    "make a new key with 'dslo-edge keygen KEYFILE' and copy it to both the "
    "device (security.hmac_key_file) and the hub (keys_dir/DEVICE.key)"
)

logger = logging.getLogger(__name__)


def load_key(path: Path) -> bytes:
    """Read a key file: hex text (as ``generate_key_file`` writes) or raw bytes.

    A file whose characters, apart from whitespace and a byte order mark,
    are at least 90% hex digits is read as hex text and must decode as hex.
    So a damaged hex key is rejected rather than taken as a raw key. A key of
    16 to 31 bytes is used with a warning, because ``keygen`` writes 32 and a
    shorter one may be a hex key cut short.

    Raises:
        ConfigError: the file is unreadable, contains fewer than 16 key
            bytes, or is hex text that does not decode as hex.
    """
    try:
        content = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the HMAC key file {path}: {error}") from error
    data = content.strip()
    text = _key_text(content).strip()
    if _is_hex_text(text):
        key = _key_from_hex(path, text)
    else:
        key = data
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"HMAC key in {path} has {len(key)} bytes, expected at least "
            f"{MIN_KEY_BYTES}; {_NEW_KEY_FIX}"
        )
    if len(key) < KEYGEN_KEY_BYTES:
        logger.warning(
            "HMAC key in %s has %d bytes, fewer than the %d that 'dslo-edge "
            "keygen' writes, so it may be cut short; if updates are rejected "
            "as bad_signature, %s",
            path,
            len(key),
            KEYGEN_KEY_BYTES,
            _NEW_KEY_FIX,
        )
    return key


def key_file_present(path: Path) -> bool:
    """Return whether a key file is there, even one that ``load_key`` rejects.

    A directory or a dangling symbolic link at ``path`` counts as present, so
    that ``load_key`` reports it as unreadable rather than as missing.
    """
    return path.exists() or path.is_symlink()


def _key_text(content: bytes) -> str:
    """Decode a key file as text, or return "" when it is not text.

    A byte order mark selects UTF-8 or UTF-16, so that a hex key that an
    editor saved with one is read as hex and not as a raw key. A file
    without one is text only when it is ASCII.
    """
    encoding = "ascii"
    for mark, codec in _TEXT_ENCODINGS:
        if content.startswith(mark):
            encoding = codec
            break
    try:
        return content.decode(encoding)
    except UnicodeDecodeError:
        return ""


def _is_hex_text(text: str) -> bool:
    """Return whether ``text`` is meant as hex: 90% or more hex digits.

    Of a random raw key's bytes about 9% are hex digits (22 of 256), and a
    passphrase usually has well under 90%, so neither is taken as hex.
    """
    characters = [c for c in text if c not in string.whitespace]
    if not characters:
        return False
    digits = sum(c in string.hexdigits for c in characters)
    return digits >= HEX_TEXT_SHARE * len(characters)


def _key_from_hex(path: Path, text: str) -> bytes:
    """Decode a key file that ``_is_hex_text`` takes as hex text.

    Read as raw bytes, a hex key with one damaged or missing digit would sign
    with another key, which every device rejects as bad_signature.
    """
    for position, character in enumerate(text, start=1):
        if character not in _HEX_TEXT:
            raise ConfigError(
                f"HMAC key file {path} looks like hex text, but character "
                f"{position} is {character!r}, which is not a hex digit, so the "
                f"key is damaged; expected {2 * KEYGEN_KEY_BYTES} hex digits as "
                f"'dslo-edge keygen' writes them, so {_NEW_KEY_FIX}"
            )
    try:
        return bytes.fromhex(text)
    except ValueError:
        digits = sum(c in string.hexdigits for c in text)
        raise ConfigError(
            f"HMAC key file {path} contains hex text that does not decode "
            f"({digits} hex digits; expected an even number, with no space "
            "inside a pair), so the key may be cut short; copy the whole file "
            f"that 'dslo-edge keygen' wrote, or {_NEW_KEY_FIX}"
        ) from None


def generate_key_file(path: Path) -> None:
    """Write a new random 32-byte key as hex, readable by the owner only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(secrets.token_hex(KEYGEN_KEY_BYTES) + "\n")


def _tag(key: bytes, topic: str, body: bytes) -> bytes:
    message = b"dslo-update\x00" + topic.encode() + b"\x00" + body
    return hmac.new(key, message, hashlib.sha256).digest()


def sign(key: bytes, topic: str, body: bytes) -> bytes:
    """Wrap an encoded update in a signed envelope for ``topic``."""
    return SIGNED_MAGIC + bytes([ENVELOPE_VERSION]) + _tag(key, topic, body) + body


def unverified_body(payload: bytes) -> bytes:
    """Return the update body of a payload, removing its envelope unchecked.

    For payloads that the caller signed itself, as a hub re-signing a stored
    update with a device's new key.
    """
    if payload.startswith(SIGNED_MAGIC):
        return payload[HEADER_BYTES:]
    return payload


def verified_body(key: bytes | None, topic: str, payload: bytes) -> bytes:
    """Return the update body of a payload, verifying its envelope with ``key``.

    A device without a key takes plain payloads only. It rejects a signed
    one with a reason of its own, because the envelope's magic "DSLS" would
    otherwise fail the body's magic check with a message that blames another
    publisher.

    Raises:
        InvalidUpdate: as ``verify`` when ``key`` is set. Without a key,
            reason "unexpected_signature" for a signed payload.
    """
    if key is not None:
        return verify(key, topic, payload)
    if payload.startswith(SIGNED_MAGIC):
        raise InvalidUpdate(
            UNEXPECTED_SIGNATURE,
            "update is signed, but this device has no HMAC key to verify it; "
            "set security.hmac_key_file in the device config to the key the "
            "sender signs with, or send unsigned (no --hmac-key-file, and no "
            "key for this device in the hub's keys_dir)",
        )
    return payload


def verify(key: bytes, topic: str, payload: bytes) -> bytes:
    """Return the update body of a correctly signed payload.

    Raises:
        InvalidUpdate: reason "unsigned" for a payload without an envelope,
            "bad_signature" for a wrong tag, key or topic.
    """
    if not payload.startswith(SIGNED_MAGIC):
        raise InvalidUpdate(
            "unsigned",
            "update is not signed but this device requires HMAC signatures; "
            "push with the device's key (--hmac-key-file), or give the hub "
            "service its key file in keys_dir",
        )
    if len(payload) < HEADER_BYTES or payload[4] != ENVELOPE_VERSION:
        raise InvalidUpdate(
            "bad_signature", "signed envelope is truncated or of an unknown version"
        )
    tag = payload[5:HEADER_BYTES]
    body = payload[HEADER_BYTES:]
    if not hmac.compare_digest(tag, _tag(key, topic, body)):
        raise InvalidUpdate(
            "bad_signature",
            f"HMAC signature does not match for topic {topic}; "
            "the hub may be using another device's key",
        )
    return body
