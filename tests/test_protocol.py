"""Tests for MQTT topics, the binary update format and update validation."""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dslo_edge.errors import ConfigError, InvalidUpdate
from dslo_edge.protocol import (
    REJECTION_REASONS,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    ModelSpec,
    PayloadLimits,
    SoftLabelUpdate,
    Topics,
    decode_update,
    encode_update,
    label_probabilities,
    new_message_id,
    validate_update,
)

# Byte offsets in a version 1 header, see docs/protocol.md.
VERSION_OFFSET = 4
FLAGS_OFFSET = 5
SAMPLE_COUNT_OFFSET = 34
RANK_OFFSET = 38
DIMS_OFFSET = 39

FIXED_ID = bytes(range(16))


def make_update(
    sample_count: int = 3,
    input_shape: tuple[int, ...] = (4,),
    class_count: int = 3,
    *,
    label_kind: str = "probabilities",
    with_hard_labels: bool = False,
    temperature: float | None = None,
    seed: int = 0,
) -> SoftLabelUpdate:
    """Build a valid update with random inputs and normalised soft labels."""
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(sample_count, *input_shape)).astype(np.float32)
    logits = rng.normal(size=(sample_count, class_count)).astype(np.float32)
    if label_kind == "probabilities":
        exponentials = np.exp(logits.astype(np.float64))
        labels = (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(
            np.float32
        )
    else:
        labels = logits
    hard_labels = None
    if with_hard_labels:
        hard_labels = rng.integers(-1, class_count, size=sample_count).astype(np.int32)
    return SoftLabelUpdate(
        message_id=FIXED_ID,
        teacher_version="teacher-2024.06-r3",
        teacher_round=7,
        timestamp=1_718_000_000.25,
        sample_ids=[f"s{index}" for index in range(sample_count)],
        inputs=inputs,
        labels=labels,
        label_kind=label_kind,
        hard_labels=hard_labels,
        temperature=temperature,
    )


def spec_for(update: SoftLabelUpdate) -> ModelSpec:
    return ModelSpec(
        input_shape=tuple(update.inputs.shape[1:]),
        class_count=update.labels.shape[1],
    )


def patched(payload: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Return a copy of payload with one little-endian field overwritten."""
    buffer = bytearray(payload)
    struct.pack_into(fmt, buffer, offset, value)
    return bytes(buffer)


VALID_PAYLOAD = encode_update(make_update(with_hard_labels=True, temperature=2.0))


# --- Topics -----------------------------------------------------------------


def test_topics_default_prefix() -> None:
    topics = Topics.for_device("kitchen-cam")
    assert topics.updates == "dslo/kitchen-cam/updates"
    assert topics.status == "dslo/kitchen-cam/status"
    assert topics.metrics == "dslo/kitchen-cam/metrics"


def test_topics_custom_prefix() -> None:
    topics = Topics.for_device("pi4_01", prefix="lab")
    assert topics.updates == "lab/pi4_01/updates"
    assert topics.status == "lab/pi4_01/status"
    assert topics.metrics == "lab/pi4_01/metrics"


def test_status_payload_strings() -> None:
    assert STATUS_ONLINE == "online"
    assert STATUS_OFFLINE == "offline"


@pytest.mark.parametrize(
    "device_id", ["", "a/b", "a+b", "a#", "a b", "a\tb", "a\nb", "a\x00b"]
)
def test_topics_reject_device_id(device_id: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Topics.for_device(device_id)
    message = str(caught.value)
    assert repr(device_id) in message
    assert "device id" in message
    assert "without '/', '+', '#', whitespace or NUL" in message


@pytest.mark.parametrize(
    ("device_id", "prefix", "rejected"),
    [
        ("k\udcff", "dslo", "device id 'k\\udcff'"),
        ("cam", "d\udcff", "topic prefix 'd\\udcff'"),
    ],
)
def test_topics_reject_surrogates(device_id: str, prefix: str, rejected: str) -> None:
    # Bytes that are not UTF-8 in a command-line argument arrive as surrogates.
    with pytest.raises(ConfigError) as caught:
        Topics.for_device(device_id, prefix)
    message = str(caught.value)
    assert message.startswith(f"{rejected} is invalid: it is not UTF-8 text; ")


@pytest.mark.parametrize("prefix", ["", "home/dslo", "+", "#", " dslo"])
def test_topics_reject_prefix(prefix: str) -> None:
    with pytest.raises(ConfigError, match="topic prefix"):
        Topics.for_device("cam", prefix=prefix)


# --- Encoding and decoding --------------------------------------------------


def assert_same_update(left: SoftLabelUpdate, right: SoftLabelUpdate) -> None:
    assert left.message_id == right.message_id
    assert left.teacher_version == right.teacher_version
    assert left.teacher_round == right.teacher_round
    assert left.timestamp == right.timestamp
    assert left.sample_ids == right.sample_ids
    assert left.label_kind == right.label_kind
    assert left.temperature == right.temperature
    np.testing.assert_array_equal(left.inputs, right.inputs, strict=True)
    np.testing.assert_array_equal(left.labels, right.labels, strict=True)
    if left.hard_labels is None:
        assert right.hard_labels is None
    else:
        assert right.hard_labels is not None
        np.testing.assert_array_equal(left.hard_labels, right.hard_labels, strict=True)


def test_round_trip_all_options() -> None:
    original = make_update(
        5,
        (2, 3, 4),
        6,
        label_kind="logits",
        with_hard_labels=True,
        temperature=2.5,
    )
    original.sample_ids[0] = "kitchen/émile-04"  # non-ASCII UTF-8
    payload = encode_update(original)

    decoded = decode_update(payload)

    assert_same_update(original, decoded)
    assert decoded.message_id_hex == FIXED_ID.hex()
    assert decoded.sample_count == 5
    assert encode_update(decoded) == payload


def test_round_trip_without_options() -> None:
    original = make_update(2, (8,), 2)

    decoded = decode_update(encode_update(original))

    assert_same_update(original, decoded)
    assert decoded.label_kind == "probabilities"
    assert decoded.hard_labels is None
    assert decoded.temperature is None


def test_decoded_arrays_are_writable_copies() -> None:
    decoded = decode_update(VALID_PAYLOAD)
    for array in (decoded.inputs, decoded.labels, decoded.hard_labels):
        assert array is not None
        assert array.flags.writeable
        assert array.flags.owndata
        assert array.dtype.isnative


def test_header_layout_matches_docs() -> None:
    update = make_update(3, (4,), 3, with_hard_labels=True, temperature=2.0)
    payload = encode_update(update)
    assert payload[:4] == b"DSLO"
    assert payload[VERSION_OFFSET] == 1
    assert payload[FLAGS_OFFSET] == 0b110  # hard labels and temperature
    assert payload[6:22] == FIXED_ID
    assert struct.unpack_from("<I", payload, 22) == (7,)
    assert struct.unpack_from("<d", payload, 26) == (1_718_000_000.25,)
    assert struct.unpack_from("<I", payload, SAMPLE_COUNT_OFFSET) == (3,)
    assert payload[RANK_OFFSET] == 1
    assert struct.unpack_from("<IHfB", payload, DIMS_OFFSET) == (4, 3, 2.0, 18)
    version_end = DIMS_OFFSET + 11 + 18
    ids_bytes = 3 * (1 + 2)
    array_bytes = 4 * (3 * 4 + 3 * 3 + 3)
    assert len(payload) == version_end + ids_bytes + array_bytes


def test_encoded_size_under_third_of_json() -> None:
    update = make_update(32, (64,), 10, with_hard_labels=True)
    as_json = json.dumps(
        {
            "message_id": update.message_id_hex,
            "teacher_version": update.teacher_version,
            "teacher_round": update.teacher_round,
            "timestamp": update.timestamp,
            "sample_ids": update.sample_ids,
            "inputs": update.inputs.tolist(),
            "labels": update.labels.tolist(),
            "label_kind": update.label_kind,
            "hard_labels": update.hard_labels.tolist(),
        }
    )

    ratio = len(encode_update(update)) / len(as_json)

    assert ratio <= 1 / 3


def test_encode_accepts_float64_arrays() -> None:
    update = make_update()
    update.inputs = update.inputs.astype(np.float64)
    decoded = decode_update(encode_update(update))
    assert decoded.inputs.dtype == np.float32
    np.testing.assert_array_equal(decoded.inputs, update.inputs.astype(np.float32))


def test_new_message_id_is_random_16_bytes() -> None:
    first = new_message_id()
    second = new_message_id()
    assert isinstance(first, bytes)
    assert len(first) == 16
    assert first != second


ENCODE_ERRORS: list[tuple[str, Callable[[SoftLabelUpdate], None], str]] = [
    ("short id", lambda u: setattr(u, "message_id", b"x" * 15), "message_id"),
    ("negative round", lambda u: setattr(u, "teacher_round", -1), "teacher_round"),
    ("round above u32", lambda u: setattr(u, "teacher_round", 2**32), "teacher_round"),
    ("long version", lambda u: setattr(u, "teacher_version", "v" * 65), "at most 64"),
    ("bad kind", lambda u: setattr(u, "label_kind", "scores"), "label_kind"),
    ("huge temperature", lambda u: setattr(u, "temperature", 1e39), "float32"),
    ("missing id", lambda u: u.sample_ids.pop(), "sample ids"),
    ("long id", lambda u: u.sample_ids.__setitem__(0, "x" * 256), "at most 255"),
    ("label rows", lambda u: setattr(u, "labels", u.labels[:2]), "labels has shape"),
    ("one class", lambda u: setattr(u, "labels", u.labels[:, :1]), "2 to 65535"),
    ("rank 0", lambda u: setattr(u, "inputs", u.inputs[:, 0]), "inputs has shape"),
    (
        "rank 5",
        lambda u: setattr(u, "inputs", np.zeros((3, 1, 1, 1, 1, 1), np.float32)),
        "inputs has shape",
    ),
    (
        "hard label shape",
        lambda u: setattr(u, "hard_labels", np.zeros(2, np.int32)),
        "hard_labels has shape",
    ),
    (
        "float hard labels",
        lambda u: setattr(u, "hard_labels", np.zeros(3, np.float32)),
        "integer dtype",
    ),
    (
        "hard label above int32",
        lambda u: setattr(u, "hard_labels", np.array([0, 1, 2**40])),
        "int32 range",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [case[1:] for case in ENCODE_ERRORS],
    ids=[case[0] for case in ENCODE_ERRORS],
)
def test_encode_rejects_inconsistent_update(
    mutate: Callable[[SoftLabelUpdate], None], message: str
) -> None:
    update = make_update()
    mutate(update)
    with pytest.raises(ValueError, match=message):
        encode_update(update)


# --- Rejection reasons ------------------------------------------------------


def replaced_version_text(payload: bytes, new_text: bytes) -> bytes:
    """Replace the 18-byte teacher version of VALID_PAYLOAD with other bytes."""
    start = DIMS_OFFSET + 4 + 7  # rank 1 dims, then class count, temperature, length
    return payload[:start] + new_text + payload[start + len(new_text) :]


def decode_reason(payload: bytes, limits: PayloadLimits | None = None) -> str:
    with pytest.raises(InvalidUpdate) as caught:
        decode_update(payload, limits or PayloadLimits())
    return caught.value.reason


DECODE_CASES: list[tuple[str, bytes, PayloadLimits | None, str]] = [
    ("too large", VALID_PAYLOAD, PayloadLimits(max_payload_bytes=100), "too_large"),
    ("truncated", VALID_PAYLOAD[:-1], None, "truncated"),
    ("bad magic", b"JSON" + VALID_PAYLOAD[4:], None, "bad_magic"),
    (
        "version 3",
        patched(VALID_PAYLOAD, VERSION_OFFSET, "<B", 3),
        None,
        "unsupported_version",
    ),
    (
        "unknown flag",
        patched(VALID_PAYLOAD, FLAGS_OFFSET, "<B", 0x0E),
        None,
        "malformed",
    ),
    (
        "zero samples",
        patched(VALID_PAYLOAD, SAMPLE_COUNT_OFFSET, "<I", 0),
        None,
        "malformed",
    ),
    ("too many samples", VALID_PAYLOAD, PayloadLimits(max_samples=2), "malformed"),
    ("rank 0", patched(VALID_PAYLOAD, RANK_OFFSET, "<B", 0), None, "malformed"),
    ("rank 5", patched(VALID_PAYLOAD, RANK_OFFSET, "<B", 5), None, "malformed"),
    ("zero dim", patched(VALID_PAYLOAD, DIMS_OFFSET, "<I", 0), None, "malformed"),
    ("one class", patched(VALID_PAYLOAD, DIMS_OFFSET + 4, "<H", 1), None, "malformed"),
    ("bad utf-8", replaced_version_text(VALID_PAYLOAD, b"\xff\xfe"), None, "malformed"),
    ("trailing byte", VALID_PAYLOAD + b"\x00", None, "malformed"),
    (
        "long version",
        patched(VALID_PAYLOAD, DIMS_OFFSET + 10, "<B", 65),
        None,
        "malformed",
    ),
    (
        "temperature without flag",
        patched(VALID_PAYLOAD, FLAGS_OFFSET, "<B", 0x02),
        None,
        "malformed",
    ),
]


@pytest.mark.parametrize(
    ("payload", "limits", "reason"),
    [case[1:] for case in DECODE_CASES],
    ids=[case[0] for case in DECODE_CASES],
)
def test_decode_rejection_reason(
    payload: bytes, limits: PayloadLimits | None, reason: str
) -> None:
    assert decode_reason(payload, limits) == reason


def test_decode_rejects_bad_utf8_sample_id() -> None:
    update = make_update(with_hard_labels=True, temperature=2.0)
    update.sample_ids[1] = "zz"
    payload = encode_update(update).replace(b"\x02zz", b"\x02\xc3\x28")
    with pytest.raises(InvalidUpdate) as caught:
        decode_update(payload)
    assert caught.value.reason == "malformed"
    assert "sample id 1" in str(caught.value)


def test_rejection_message_id_after_header() -> None:
    with pytest.raises(InvalidUpdate) as caught:
        decode_update(VALID_PAYLOAD + b"\x00")
    assert caught.value.message_id == FIXED_ID.hex()


def test_rejection_message_id_before_header() -> None:
    with pytest.raises(InvalidUpdate) as caught:
        decode_update(b"JSON" + VALID_PAYLOAD[4:])
    assert caught.value.message_id is None


def test_truncation_at_every_offset() -> None:
    for length in range(len(VALID_PAYLOAD)):
        with pytest.raises(InvalidUpdate) as caught:
            decode_update(VALID_PAYLOAD[:length])
        assert caught.value.reason == "truncated", f"length {length}"


def test_huge_sample_count_rejected_by_limit() -> None:
    payload = patched(VALID_PAYLOAD, SAMPLE_COUNT_OFFSET, "<I", 2**31)
    with pytest.raises(InvalidUpdate) as caught:
        decode_update(payload)
    assert caught.value.reason == "malformed"
    assert "2147483648" in str(caught.value)


def test_huge_declared_size_not_allocated() -> None:
    # With the sample limit lifted, only the length check prevents allocating
    # 2**31 x (2**32 - 1) float32 inputs, about 32 EiB.
    payload = patched(VALID_PAYLOAD, SAMPLE_COUNT_OFFSET, "<I", 2**31)
    payload = patched(payload, DIMS_OFFSET, "<I", 2**32 - 1)
    limits = PayloadLimits(max_samples=2**32 - 1)

    tracemalloc.start()
    try:
        with pytest.raises(InvalidUpdate) as caught:
            decode_update(payload, limits)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert caught.value.reason == "truncated"
    assert peak_bytes < 64 * 1024


def test_size_limit_checked_before_parsing() -> None:
    limit = 1000
    garbage = b"\xab" * (limit + 1)
    assert decode_reason(garbage, PayloadLimits(max_payload_bytes=limit)) == (
        "too_large"
    )


def test_payload_at_size_limit_accepted() -> None:
    limits = PayloadLimits(max_payload_bytes=len(VALID_PAYLOAD))
    assert decode_update(VALID_PAYLOAD, limits).sample_count == 3


def test_payload_limits_reject_non_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        PayloadLimits(max_samples=0)


def rejection(update: SoftLabelUpdate, spec: ModelSpec | None = None) -> InvalidUpdate:
    with pytest.raises(InvalidUpdate) as caught:
        validate_update(update, spec or spec_for(update))
    return caught.value


def test_validate_accepts_valid_update() -> None:
    update = decode_update(VALID_PAYLOAD)
    validate_update(update, ModelSpec(input_shape=(4,), class_count=3))


def test_validate_accepts_unnormalised_logits() -> None:
    update = make_update(label_kind="logits", temperature=100.0)
    update.labels[:] = [[5.0, -3.0, 40.0]] * 3
    validate_update(update, spec_for(update))


def test_validate_unknown_label_kind() -> None:
    update = make_update()
    update.label_kind = "scores"
    error = rejection(update)
    assert error.reason == "malformed"
    assert "'scores'" in str(error)


def test_validate_input_shape_mismatch() -> None:
    update = make_update(input_shape=(4,))
    error = rejection(update, ModelSpec(input_shape=(2, 2), class_count=3))
    assert error.reason == "shape_mismatch"
    assert "(4,)" in str(error)
    assert "(2, 2)" in str(error)
    assert error.message_id == FIXED_ID.hex()


def test_validate_class_count_mismatch() -> None:
    update = make_update(class_count=3)
    error = rejection(update, ModelSpec(input_shape=(4,), class_count=10))
    assert error.reason == "shape_mismatch"
    assert "10 classes" in str(error)
    assert "(3, 3)" in str(error)


def test_validate_row_count_mismatch() -> None:
    update = make_update()
    update.sample_ids.append("extra")
    assert rejection(update).reason == "shape_mismatch"


@pytest.mark.parametrize("field", ["inputs", "labels"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_validate_non_finite_arrays(field: str, bad_value: float) -> None:
    update = make_update(label_kind="logits")
    getattr(update, field)[2, 1] = bad_value
    error = rejection(update)
    assert error.reason == "non_finite"
    assert "'s2'" in str(error)


def test_validate_non_finite_temperature() -> None:
    update = make_update(label_kind="logits", temperature=math.nan)
    assert rejection(update).reason == "non_finite"


def test_validate_negative_probability() -> None:
    update = make_update()
    update.labels[1] = [1.2, -0.2, 0.0]
    error = rejection(update)
    assert error.reason == "negative_probability"
    assert "'s1'" in str(error)


def test_validate_unnormalised_names_sample() -> None:
    update = make_update()
    update.sample_ids[1] = "a17"
    update.labels[1] = [0.5, 0.5, 0.31]
    error = rejection(update)
    assert error.reason == "unnormalised"
    assert str(error) == (
        "soft label for sample 'a17' sums to 1.31, expected 1 +- 0.001. "
        "If the hub sends logits, set the logits flag"
    )


def test_validate_sum_tolerance_is_respected() -> None:
    update = make_update()
    update.labels[0] = [0.5, 0.3, 0.2005]
    validate_update(update, spec_for(update), sum_tolerance=1e-3)
    with pytest.raises(InvalidUpdate):
        validate_update(update, spec_for(update), sum_tolerance=1e-4)


@pytest.mark.parametrize("hard_label", [-2, 3, 2**31 - 1])
def test_validate_bad_hard_label(hard_label: int) -> None:
    update = make_update(with_hard_labels=True)
    assert update.hard_labels is not None
    update.hard_labels[0] = hard_label
    error = rejection(update)
    assert error.reason == "bad_hard_label"
    assert str(hard_label) in str(error)


def test_validate_hard_label_bounds_accepted() -> None:
    update = make_update(with_hard_labels=True)
    update.hard_labels = np.array([-1, 0, 2], dtype=np.int32)
    validate_update(update, spec_for(update))


@pytest.mark.parametrize("temperature", [0.0, -1.0, 100.5])
def test_validate_bad_temperature(temperature: float) -> None:
    update = make_update(label_kind="logits", temperature=temperature)
    assert rejection(update).reason == "bad_temperature"


def test_validate_duplicate_sample_id() -> None:
    update = make_update()
    update.sample_ids[2] = "s0"
    error = rejection(update)
    assert error.reason == "duplicate_sample_id"
    assert "'s0'" in str(error)


def test_every_reason_has_a_test() -> None:
    decode_reasons = {case[3] for case in DECODE_CASES}
    validate_reasons = {
        "shape_mismatch",
        "non_finite",
        "negative_probability",
        "unnormalised",
        "bad_hard_label",
        "bad_temperature",
        "duplicate_sample_id",
    }
    assert decode_reasons | validate_reasons == set(REJECTION_REASONS)


# --- Fuzzing ----------------------------------------------------------------


def decode_or_reject(payload: bytes) -> None:
    try:
        decode_update(payload)
    except InvalidUpdate as error:
        assert error.reason in REJECTION_REASONS


FUZZ_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ_SETTINGS
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(payload: bytes) -> None:
    decode_or_reject(payload)


@FUZZ_SETTINGS
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_after_header_start(tail: bytes) -> None:
    decode_or_reject(b"DSLO\x01" + tail)


@FUZZ_SETTINGS
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(VALID_PAYLOAD) - 1),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, len(VALID_PAYLOAD)),
)
def test_fuzz_mutated_valid_payload(
    replacements: list[tuple[int, int]], cut: int
) -> None:
    buffer = bytearray(VALID_PAYLOAD)
    for offset, value in replacements:
        buffer[offset] = value
    decode_or_reject(bytes(buffer))
    decode_or_reject(bytes(buffer[:cut]))
    decode_or_reject(bytes(buffer) + bytes(buffer[cut:]))


# --- Label conversion -------------------------------------------------------


def test_softmax_matches_hand_computation() -> None:
    update = make_update(1, (4,), 3, label_kind="logits", temperature=2.0)
    update.labels[0] = [1.0, 2.0, 3.0]
    # softmax([0.5, 1.0, 1.5]) = [e^0.5, e^1, e^1.5] / (e^0.5 + e^1 + e^1.5)
    expected = np.array([[0.18632372, 0.30719589, 0.50648039]], dtype=np.float32)

    probabilities = label_probabilities(update, default_temperature=1.0)

    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6)


def test_softmax_uses_default_temperature() -> None:
    update = make_update(1, (4,), 2, label_kind="logits")
    update.labels[0] = [0.0, math.log(3.0)]

    probabilities = label_probabilities(update, default_temperature=1.0)

    np.testing.assert_allclose(probabilities, [[0.25, 0.75]], rtol=1e-6)


def test_softmax_large_logits_stay_finite() -> None:
    update = make_update(1, (4,), 3, label_kind="logits")
    update.labels[0] = [1000.0, 1001.0, 1002.0]

    probabilities = label_probabilities(update, default_temperature=1.0)

    expected = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    np.testing.assert_allclose(probabilities[0], expected, rtol=1e-6)


def test_probabilities_returned_as_copy() -> None:
    update = make_update()

    probabilities = label_probabilities(update, default_temperature=4.0)

    np.testing.assert_array_equal(probabilities, update.labels)
    assert not np.shares_memory(probabilities, update.labels)


def test_label_probabilities_rejects_bad_default() -> None:
    with pytest.raises(ValueError, match="default_temperature"):
        label_probabilities(make_update(label_kind="logits"), default_temperature=0.0)
