"""Opening signed and plain update payloads with and without a device key."""

from __future__ import annotations

import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.config import render_config
from dslo_edge.errors import InvalidUpdate
from dslo_edge.faults import DEVICE, DaemonProcess, Publisher, make_updates
from dslo_edge.protocol import Topics, encode_update
from dslo_edge.push_progress import DeviceCounts
from dslo_edge.signing import generate_key_file, sign, verified_body

KEY = b"k" * 32
TOPIC = "dslo/porch/updates"
BODY = b"DSLO\x01update body"


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
