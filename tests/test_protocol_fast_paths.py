"""Decoding and validation cases that the fast paths must still catch."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dslo_edge.errors import InvalidUpdate
from dslo_edge.protocol import (
    ModelSpec,
    SoftLabelUpdate,
    decode_update,
    encode_update,
    new_message_id,
    validate_update,
)

SPEC = ModelSpec((4,), 3)


def make_update(count: int = 3) -> SoftLabelUpdate:
    rng = np.random.default_rng(0)
    return SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="v",
        teacher_round=1,
        timestamp=time.time(),
        sample_ids=[f"id{i}" for i in range(count)],
        inputs=rng.random((count, 4), dtype=np.float32),
        labels=rng.dirichlet(np.ones(3), size=count).astype(np.float32),
        label_kind="probabilities",
        hard_labels=np.zeros(count, dtype=np.int32),
    )


def rejection(update: SoftLabelUpdate) -> InvalidUpdate:
    with pytest.raises(InvalidUpdate) as caught:
        validate_update(update, SPEC)
    return caught.value


def test_sample_id_longer_than_payload_is_truncated() -> None:
    payload = bytearray(encode_update(make_update(1)))
    id_offset = payload.index(b"\x03id0")
    payload[id_offset] = 255

    with pytest.raises(InvalidUpdate) as caught:
        decode_update(bytes(payload))

    assert caught.value.reason == "truncated"
    assert "sample id 0" in str(caught.value)


def test_ids_that_consume_the_arrays_are_truncated() -> None:
    update = make_update(2)
    # Zero arrays encode as NUL bytes, which are valid UTF-8 inside an id.
    update.inputs[:] = 0.0
    update.labels[:] = 0.0
    payload = bytearray(encode_update(update))
    id_offset = payload.index(b"\x03id0")
    # The first id now runs to the last byte, so the second length is missing.
    payload[id_offset] = len(payload) - id_offset - 1

    with pytest.raises(InvalidUpdate) as caught:
        decode_update(bytes(payload))

    assert caught.value.reason == "truncated"
    assert "length of sample id 1" in str(caught.value)


def test_decoded_ids_match_encoded_ids() -> None:
    update = make_update(5)
    update.sample_ids[2] = "ünïcode-ид"

    decoded = decode_update(encode_update(update))

    assert decoded.sample_ids == update.sample_ids


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_its_sample(value: float) -> None:
    update = make_update()
    update.inputs[2, 1] = value

    error = rejection(update)

    assert error.reason == "non_finite"
    assert "'id2'" in str(error)


def test_large_finite_inputs_are_accepted() -> None:
    update = make_update()
    update.inputs[:] = np.finfo(np.float32).max

    validate_update(update, SPEC)


def test_negative_probability_names_first_row() -> None:
    update = make_update()
    update.labels[1] = [-0.5, 1.0, 0.5]
    update.labels[2] = [-0.5, 1.0, 0.5]

    error = rejection(update)

    assert error.reason == "negative_probability"
    assert "'id1'" in str(error)


def test_unnormalised_row_names_first_bad_row() -> None:
    update = make_update()
    update.labels[1] = [0.5, 0.5, 0.1]
    update.labels[2] = [0.9, 0.9, 0.9]

    error = rejection(update)

    assert error.reason == "unnormalised"
    assert "'id1'" in str(error)


@pytest.mark.parametrize("label", [-2, 3])
def test_bad_hard_label_is_rejected(label: int) -> None:
    update = make_update()
    update.hard_labels[1] = label

    error = rejection(update)

    assert error.reason == "bad_hard_label"
    assert "'id1'" in str(error)


@pytest.mark.parametrize(
    "sample_ids",
    [
        ["a", "id-2", "s/3/x"],
        ["a", "gr\u00fcn", "z"],
        ["a", "x" * 200, "b"],
        ["x" * 255, "", "y" * 127],
    ],
    ids=["ascii", "non-ascii", "length-byte-above-127", "longest-and-empty"],
)
def test_sample_ids_round_trip(sample_ids: list[str]) -> None:
    update = make_update(3)
    update.sample_ids = sample_ids

    decoded = decode_update(encode_update(update))

    assert decoded.sample_ids == sample_ids
    np.testing.assert_array_equal(decoded.inputs, update.inputs)
