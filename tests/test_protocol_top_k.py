"""Top-k soft labels in format version 2: size, expansion, compatibility."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from dslo_edge.errors import InvalidUpdate
from dslo_edge.protocol import (
    FLAG_TOP_K,
    FORMAT_VERSION,
    FORMAT_VERSION_TOP_K,
    ModelSpec,
    SoftLabelUpdate,
    compress_top_k,
    decode_update,
    encode_update,
    expand_top_k,
    validate_update,
)

VERSION_OFFSET = 4
FLAGS_OFFSET = 5
DIMS_OFFSET = 39


def make_update(
    sample_count: int = 3,
    input_shape: tuple[int, ...] = (4,),
    class_count: int = 3,
    *,
    with_hard_labels: bool = False,
    temperature: float | None = None,
) -> SoftLabelUpdate:
    """Build a valid update with random inputs and softmax probabilities."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(sample_count, class_count))
    labels = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    hard_labels = None
    if with_hard_labels:
        hard_labels = rng.integers(-1, class_count, size=sample_count).astype(np.int32)
    return SoftLabelUpdate(
        message_id=bytes(16),
        teacher_version="teacher-2024.06-r3",
        teacher_round=7,
        timestamp=1_718_000_000.25,
        sample_ids=[f"s{index}" for index in range(sample_count)],
        inputs=rng.normal(size=(sample_count, *input_shape)).astype(np.float32),
        labels=labels.astype(np.float32),
        label_kind="probabilities",
        hard_labels=hard_labels,
        temperature=temperature,
    )


def top_k_offset(rank: int) -> int:
    """Offset of the u16 top-k count: right after class count and temperature."""
    return DIMS_OFFSET + 4 * rank + 2 + 4


def sharp_labels(count: int, classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(classes, 0.1), size=count).astype(np.float32)


def test_full_labels_still_encode_as_version_1() -> None:
    payload = encode_update(make_update())
    assert payload[VERSION_OFFSET] == FORMAT_VERSION == 1
    assert not payload[FLAGS_OFFSET] & FLAG_TOP_K


def test_top_k_payload_is_version_2_with_flag() -> None:
    update = make_update(4, (8,), 10)
    update.top_k = 3
    payload = encode_update(update)
    assert payload[VERSION_OFFSET] == FORMAT_VERSION_TOP_K == 2
    assert payload[FLAGS_OFFSET] & FLAG_TOP_K
    assert struct.unpack_from("<H", payload, top_k_offset(1))[0] == 3


@pytest.mark.parametrize(
    ("classes", "top_k", "saved_per_sample"),
    [(10, 3, 40 - 22), (100, 5, 400 - 34), (1000, 5, 4000 - 34)],
)
def test_top_k_size(classes: int, top_k: int, saved_per_sample: int) -> None:
    update = make_update(32, (64,), classes)
    full = len(encode_update(update))
    update.top_k = top_k
    compact = len(encode_update(update))
    # Labels take 4 K bytes per sample in full, 6 k + 4 with top-k, and the
    # header grows by the 2-byte k field.
    assert full - compact == 32 * saved_per_sample - 2


def test_top_k_expansion_keeps_top_classes_and_mass() -> None:
    update = make_update(16, (4,), 10)
    update.labels = sharp_labels(16, 10)
    update.top_k = 3

    decoded = decode_update(encode_update(update))

    assert decoded.top_k == 3
    assert decoded.labels.shape == (16, 10)
    expected_top = np.sort(np.argsort(-update.labels, axis=1)[:, :3], axis=1)
    decoded_top = np.sort(np.argsort(-decoded.labels, axis=1)[:, :3], axis=1)
    np.testing.assert_array_equal(decoded_top, expected_top)
    kept = np.take_along_axis(decoded.labels, expected_top, axis=1)
    original = np.take_along_axis(update.labels, expected_top, axis=1)
    np.testing.assert_array_equal(kept, original)
    np.testing.assert_allclose(decoded.labels.sum(axis=1), 1.0, atol=1e-6)
    validate_update(decoded, ModelSpec((4,), 10))


def test_expansion_spreads_remaining_mass_evenly() -> None:
    labels = expand_top_k(
        np.array([[2, 0]], np.uint16),
        np.array([[0.5, 0.3]], np.float32),
        np.array([0.2], np.float32),
        class_count=4,
    )
    np.testing.assert_allclose(labels, [[0.3, 0.1, 0.5, 0.1]], atol=1e-7)


def test_compress_orders_largest_first() -> None:
    labels = np.array([[0.1, 0.6, 0.05, 0.25]], np.float32)
    indices, values, remaining = compress_top_k(labels, 2)
    assert indices.tolist() == [[1, 3]]
    np.testing.assert_allclose(values, [[0.6, 0.25]])
    np.testing.assert_allclose(remaining, [0.15], atol=1e-7)


def test_top_k_with_hard_labels_and_temperature() -> None:
    update = make_update(5, (2, 3), 6, with_hard_labels=True, temperature=3.0)
    update.top_k = 2
    decoded = decode_update(encode_update(update))
    np.testing.assert_array_equal(decoded.hard_labels, update.hard_labels)
    assert decoded.temperature == 3.0
    np.testing.assert_array_equal(decoded.inputs, update.inputs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k": 0}, "top_k is 0, expected 1 to 9"),
        ({"top_k": 10}, "top_k is 10, expected 1 to 9"),
        ({"top_k": 2.0}, "expected an integer"),
        ({"top_k": 3, "label_kind": "logits"}, "needs probability labels"),
    ],
)
def test_encode_rejects_bad_top_k(change: dict, message: str) -> None:
    update = make_update(2, (4,), 10)
    for name, value in change.items():
        setattr(update, name, value)
    with pytest.raises(ValueError, match=message):
        encode_update(update)


def top_k_payload() -> bytes:
    update = make_update(2, (4,), 5)
    update.top_k = 2
    return encode_update(update)


def patched(payload: bytes, offset: int, layout: str, value: int) -> bytes:
    data = bytearray(payload)
    struct.pack_into(layout, data, offset, value)
    return bytes(data)


def test_decoder_rejects_top_k_flag_in_version_1() -> None:
    payload = patched(top_k_payload(), VERSION_OFFSET, "<B", 1)
    with pytest.raises(InvalidUpdate, match="format version 1") as caught:
        decode_update(payload)
    assert caught.value.reason == "malformed"


def test_decoder_rejects_top_k_with_logits_flag() -> None:
    payload = top_k_payload()
    flagged = patched(payload, FLAGS_OFFSET, "<B", payload[FLAGS_OFFSET] | 0x01)
    with pytest.raises(InvalidUpdate, match="top-k and logits"):
        decode_update(flagged)


@pytest.mark.parametrize("top_k", [0, 5, 9])
def test_decoder_rejects_bad_top_k_count(top_k: int) -> None:
    payload = patched(top_k_payload(), top_k_offset(1), "<H", top_k)
    with pytest.raises(InvalidUpdate) as caught:
        decode_update(payload)
    assert caught.value.reason == "malformed"


def test_decoder_rejects_bad_class_indices() -> None:
    payload = top_k_payload()
    # Two samples, k = 2: indices (8 bytes), values (16), remaining (8) end it.
    start = len(payload) - 32
    out_of_range = patched(payload, start, "<H", 7)
    with pytest.raises(InvalidUpdate, match="index 7 is out of range"):
        decode_update(out_of_range)
    first = struct.unpack_from("<H", payload, start)[0]
    repeated = patched(payload, start + 2, "<H", first)
    with pytest.raises(InvalidUpdate, match="lists one class twice"):
        decode_update(repeated)


def test_negative_remaining_mass_fails_validation() -> None:
    payload = top_k_payload()
    negative = bytearray(payload)
    struct.pack_into("<f", negative, len(payload) - 4, -0.5)
    decoded = decode_update(bytes(negative))
    with pytest.raises(InvalidUpdate) as caught:
        validate_update(decoded, ModelSpec((4,), 5))
    assert caught.value.reason == "negative_probability"


def test_truncated_top_k_payload_is_rejected() -> None:
    with pytest.raises(InvalidUpdate) as caught:
        decode_update(top_k_payload()[:-1])
    assert caught.value.reason == "truncated"
