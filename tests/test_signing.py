"""Opening signed and plain update payloads with and without a device key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.config import render_config
from dslo_edge.errors import ConfigError, InvalidUpdate
from dslo_edge.faults import DEVICE, DaemonProcess, Publisher, make_updates
from dslo_edge.protocol import Topics, encode_update
from dslo_edge.push_progress import DeviceCounts
from dslo_edge.signing import generate_key_file, load_key, sign, verified_body

KEY = b"k" * 32
TOPIC = "dslo/porch/updates"
BODY = b"DSLO\x01update body"
NEW_KEY_FIX = (
    "make a new key with 'dslo-edge keygen KEYFILE' and copy it to both the "
    "device (security.hmac_key_file) and the hub (keys_dir/DEVICE.key)"
)


def keygen_file(tmp_path: Path) -> tuple[Path, str]:
    """Write a key as ``dslo-edge keygen`` does, and return its path and hex text."""
    path = tmp_path / "keygen.key"
    generate_key_file(path)
    return path, path.read_text().strip()


def test_plain_payload_without_key_passes() -> None:
    assert verified_body(None, TOPIC, BODY) == BODY


def test_signed_payload_with_key_is_opened() -> None:
    assert verified_body(KEY, TOPIC, sign(KEY, TOPIC, BODY)) == BODY


def test_signed_payload_without_key_is_named() -> None:
    with pytest.raises(InvalidUpdate) as caught:
        verified_body(None, TOPIC, sign(KEY, TOPIC, BODY))

    assert caught.value.reason == "unexpected_signature"
    assert "this device has no HMAC key" in str(caught.value)
    assert "security.hmac_key_file" in str(caught.value)


def test_plain_payload_with_key_is_unsigned() -> None:
    with pytest.raises(InvalidUpdate) as caught:
        verified_body(KEY, TOPIC, BODY)

    assert caught.value.reason == "unsigned"
    assert "(--hmac-key-file)" in str(caught.value)
    assert "hub service its key file in keys_dir" in str(caught.value)


def test_push_hint_for_unexpected_signature() -> None:
    counts = DeviceCounts(applied=0, rejected={"unexpected_signature": 2})

    assert counts.hints() == [
        "the device has no HMAC key: set its security.hmac_key_file or push "
        "without --hmac-key-file"
    ]


def test_rejected_update_log_names_its_id(mlp_pair, mosquitto, tmp_path) -> None:
    key_file = tmp_path / "device.key"
    generate_key_file(key_file)
    config = tmp_path / "device.toml"
    config.write_text(
        render_config(
            DEVICE,
            mlp_pair.bundle,
            tmp_path / "state",
            mosquitto.port,
            overrides={"security": {"hmac_key_file": str(key_file)}},
        )
    )
    unsigned, forged = (
        encode_update(update)
        for update in make_updates(load_bundle(mlp_pair.bundle), 2, seed=8)
    )
    other_key = b"o" * 32
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    hub = Publisher(mosquitto.port, Topics.for_device(DEVICE))
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        topic = Topics.for_device(DEVICE).updates
        hub.publish([unsigned, sign(other_key, topic, forged), b"not an update"])
        hub.wait(lambda m: sum(m["rejected"].values()) == 3)
    finally:
        hub.close()
        daemon.terminate()

    log = daemon.log_text()
    assert f"Rejected update {unsigned[6:22].hex()} " in log, log[-3000:]
    assert f"Rejected update {forged[6:22].hex()} " in log
    assert log.count("Rejected update (no id) ") == 1


def test_keygen_key_loads_without_warning(tmp_path, caplog) -> None:
    path, text = keygen_file(tmp_path)

    with caplog.at_level(logging.WARNING, logger="dslo_edge.signing"):
        key = load_key(path)

    assert key == bytes.fromhex(text)
    assert caplog.records == []


@pytest.mark.parametrize(
    ("damage", "character", "position"),
    [
        (lambda text: "g" + text[1:], "g", 1),
        (lambda text: text[:30] + "z" + text[31:], "z", 31),
        (lambda text: "0x" + text, "x", 2),
        (lambda text: text[:20] + "\x00\x00" + text[22:], "\x00", 21),
    ],
    ids=["first digit", "middle digit", "0x prefix", "NUL bytes"],
)
def test_damaged_hex_key_is_rejected(
    tmp_path, damage, character: str, position: int
) -> None:
    path, text = keygen_file(tmp_path)
    damaged = tmp_path / "damaged.key"
    damaged.write_text(damage(text) + "\n")

    with pytest.raises(ConfigError) as caught:
        load_key(damaged)

    assert str(caught.value) == (
        f"HMAC key file {damaged} looks like hex text, but character {position} "
        f"is {character!r}, which is not a hex digit, so the key is damaged; "
        f"expected 64 hex digits as 'dslo-edge keygen' writes them, so {NEW_KEY_FIX}"
    )


@pytest.mark.parametrize(
    "encoding",
    ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"],
)
def test_hex_key_with_byte_order_mark_loads(tmp_path, caplog, encoding: str) -> None:
    path, text = keygen_file(tmp_path)
    saved = tmp_path / "saved.key"
    # Windows editors save text this way, with a byte order mark and CRLF. The
    # bare utf-16-le and utf-16-be codecs write no mark, so the test adds it.
    content = text + "\r\n"
    if encoding in ("utf-16-le", "utf-16-be"):
        content = "\ufeff" + content
    saved.write_bytes(content.encode(encoding))

    with caplog.at_level(logging.WARNING, logger="dslo_edge.signing"):
        key = load_key(saved)

    assert key == bytes.fromhex(text)
    assert caplog.records == []


def test_odd_length_hex_key_names_fix(tmp_path) -> None:
    path, text = keygen_file(tmp_path)
    path.write_text(text[:39])

    with pytest.raises(ConfigError) as caught:
        load_key(path)

    assert "(39 hex digits; expected an even number" in str(caught.value)
    assert str(caught.value).endswith(NEW_KEY_FIX)


def test_hex_key_cut_short_warns(tmp_path, caplog) -> None:
    path, text = keygen_file(tmp_path)
    path.write_bytes(text.encode()[:40])

    with caplog.at_level(logging.WARNING, logger="dslo_edge.signing"):
        key = load_key(path)

    assert key == bytes.fromhex(text[:40])
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert caplog.records[0].getMessage() == (
        f"HMAC key in {path} has 20 bytes, fewer than the 32 that 'dslo-edge "
        "keygen' writes, so it may be cut short; if updates are rejected as "
        f"bad_signature, {NEW_KEY_FIX}"
    )


def test_key_under_16_bytes_is_rejected(tmp_path) -> None:
    path, text = keygen_file(tmp_path)
    path.write_text(text[:30])

    with pytest.raises(ConfigError) as caught:
        load_key(path)

    assert str(caught.value) == (
        f"HMAC key in {path} has 15 bytes, expected at least 16; {NEW_KEY_FIX}"
    )


@pytest.mark.parametrize(
    "raw",
    [
        bytes(range(256))[::7] + b"\xff",
        b"correct horse battery staple, twice over",
        # Mostly hex digits but under 90%, as a passphrase may be.
        b"deadbeef cafe 2024 facade beaded !!!!",
    ],
)
def test_raw_key_loads_as_its_bytes(tmp_path, caplog, raw: bytes) -> None:
    path = tmp_path / "raw.key"
    path.write_bytes(raw)

    with caplog.at_level(logging.WARNING, logger="dslo_edge.signing"):
        key = load_key(path)

    assert key == raw
    assert caplog.records == []
