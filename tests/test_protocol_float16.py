"""Float16 inputs on the wire: smaller payloads, float32 on the device."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from dslo_edge.errors import InvalidUpdate
from dslo_edge.protocol import (
    FLAG_FLOAT16_INPUTS,
    SoftLabelUpdate,
    decode_update,
    encode_update,
    new_message_id,
)


def digits_like_update(input_dtype: str = "float32") -> SoftLabelUpdate:
    """32 samples of 8x8 images in sixteenths, as scikit-learn's digits are."""
    rng = np.random.default_rng(0)
    inputs = (rng.integers(0, 17, size=(32, 64)) / 16).astype(np.float32)
    return SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="teacher-round-5",
        teacher_round=5,
        timestamp=time.time(),
        sample_ids=[f"adapt-{i}" for i in range(32)],
        inputs=inputs,
        labels=rng.dirichlet(np.ones(10), size=32).astype(np.float32),
        label_kind="probabilities",
        input_dtype=input_dtype,
    )


def test_float16_round_trip_is_exact_for_sixteenths() -> None:
    update = digits_like_update("float16")

    decoded = decode_update(encode_update(update))

    assert decoded.input_dtype == "float16"
    assert decoded.inputs.dtype == np.float32
    np.testing.assert_array_equal(decoded.inputs, update.inputs)
    np.testing.assert_array_equal(decoded.labels, update.labels)


def test_float16_payload_is_under_a_third_of_json() -> None:
    update = digits_like_update("float16")
    as_json = json.dumps(
        {
            "message_id": update.message_id_hex,
            "teacher_version": update.teacher_version,
            "teacher_round": update.teacher_round,
            "timestamp": update.timestamp,
            "sample_ids": update.sample_ids,
            "inputs": update.inputs.tolist(),
            "labels": update.labels.tolist(),
        }
    ).encode()

    binary = encode_update(update)
    full = encode_update(digits_like_update("float32"))

    assert len(binary) <= len(as_json) / 3
    assert len(binary) < len(full) - 32 * 64


def test_float16_flag_in_version_one_is_malformed() -> None:
    payload = bytearray(encode_update(digits_like_update("float32")))
    payload[5] |= FLAG_FLOAT16_INPUTS

    with pytest.raises(InvalidUpdate) as raised:
        decode_update(bytes(payload))

    assert raised.value.reason == "malformed"


def test_float16_rejects_inputs_beyond_its_range() -> None:
    update = digits_like_update("float16")
    update.inputs[0, 0] = 1e5

    with pytest.raises(ValueError, match="65504"):
        encode_update(update)
