"""Opening signed and plain update payloads with and without a device key."""

from __future__ import annotations

import pytest

from dslo_edge.errors import InvalidUpdate
from dslo_edge.push_progress import DeviceCounts
from dslo_edge.signing import sign, verified_body

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
