"""Format version 3: one label set per head, encoded, decoded and validated."""

from __future__ import annotations

import re
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dslo_edge.errors import InvalidUpdate
from dslo_edge.multihead_decode import decode_multi_head_update
from dslo_edge.multihead_protocol import (
    HeadLabels,
    MultiHeadSpec,
    MultiHeadUpdate,
    encode_multi_head_update,
    is_multi_head_payload,
    validate_multi_head_update,
)
from dslo_edge.protocol import (
    PayloadLimits,
    SoftLabelUpdate,
    compress_top_k,
    decode_update,
    encode_update,
    expand_top_k,
    new_message_id,
)

SPEC = MultiHeadSpec(input_shape=(64,), heads={"digit": 10, "shape": 3})
# magic + version, fixed header, one input dimension, version length + "t1",
# head count: the first head descriptor starts here.
FIRST_HEAD = 5 + 34 + 4 + 1 + 2 + 1
# name length, "digit", flags, class count, temperature, k
SECOND_HEAD = FIRST_HEAD + 1 + 5 + 9


def make_update(
    samples: int = 4, seed: int = 0, **heads: HeadLabels
) -> MultiHeadUpdate:
    rng = np.random.default_rng(seed)
    default_heads = {
        "digit": HeadLabels(
            rng.dirichlet(np.ones(10), size=samples).astype(np.float32),
            hard_labels=np.array([3, -1, 9, 0][:samples], dtype=np.int32),
        ),
        "shape": HeadLabels(
            rng.normal(size=(samples, 3)).astype(np.float32), label_kind="logits"
        ),
    }
    default_heads.update(heads)
    return MultiHeadUpdate(
        message_id=bytes(range(16)),
        teacher_version="t1",
        teacher_round=7,
        timestamp=1_700_000_000.5,
        sample_ids=[f"s{i}" for i in range(samples)],
        inputs=rng.random((samples, 64), dtype=np.float32),
        heads=default_heads,
    )


def test_round_trip_keeps_every_field() -> None:
    update = make_update()
    update.heads["shape"].temperature = 3.0

    decoded = decode_multi_head_update(encode_multi_head_update(update))

    assert decoded.message_id == update.message_id
    assert decoded.teacher_version == "t1"
    assert decoded.teacher_round == 7
    assert decoded.timestamp == 1_700_000_000.5
    assert decoded.sample_ids == ["s0", "s1", "s2", "s3"]
    assert decoded.input_dtype == "float32"
    np.testing.assert_array_equal(decoded.inputs, update.inputs)
    assert list(decoded.heads) == ["digit", "shape"]
    digit, shape = decoded.heads["digit"], decoded.heads["shape"]
    np.testing.assert_array_equal(digit.labels, update.heads["digit"].labels)
    np.testing.assert_array_equal(digit.hard_labels, [3, -1, 9, 0])
    assert digit.label_kind == "probabilities"
    assert digit.temperature is None
    np.testing.assert_array_equal(shape.labels, update.heads["shape"].labels)
    assert shape.label_kind == "logits"
    assert shape.hard_labels is None
    assert shape.temperature == 3.0


def test_encoded_size_and_head_descriptor_bytes() -> None:
    payload = encode_multi_head_update(make_update())

    # 47 header bytes, 2 head descriptors of 15, 4 ids of 3 bytes, inputs
    # 4 * 64 * 4, digit labels 4 * 10 * 4 and hard labels 4 * 4, shape
    # labels 4 * 3 * 4.
    assert len(payload) == 47 + 2 * 15 + 12 + 1024 + 160 + 16 + 48
    assert payload[:5] == b"DSLO\x03"
    assert payload[FIRST_HEAD - 1] == 2  # head count
    assert payload[FIRST_HEAD : FIRST_HEAD + 6] == b"\x05digit"
    flags, classes, temperature, top_k = struct.unpack(
        "<BHfH", payload[FIRST_HEAD + 6 : FIRST_HEAD + 15]
    )
    assert (flags, classes, temperature, top_k) == (0x02, 10, 0.0, 0)
    assert payload[SECOND_HEAD : SECOND_HEAD + 6] == b"\x05shape"
    assert payload[SECOND_HEAD + 6] == 0x01  # logits


def test_top_k_head_and_float16_inputs() -> None:
    update = make_update()
    update.heads["digit"].top_k = 3
    update.input_dtype = "float16"

    payload = encode_multi_head_update(update)
    decoded = decode_multi_head_update(payload)

    rows = update.heads["digit"].labels
    expected = expand_top_k(*compress_top_k(rows, 3), 10)
    np.testing.assert_array_equal(decoded.heads["digit"].labels, expected)
    assert decoded.heads["digit"].top_k == 3
    assert decoded.input_dtype == "float16"
    np.testing.assert_allclose(decoded.inputs, update.inputs, rtol=1e-3, atol=1e-3)
    # float16 inputs take 512 bytes, and top-k labels 4 * (6 * 3 + 4) = 88 bytes.
    assert len(payload) == 47 + 2 * 15 + 12 + 512 + 88 + 16 + 48


def test_single_head_payloads_unchanged() -> None:
    rng = np.random.default_rng(3)
    single = SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="t",
        teacher_round=1,
        timestamp=time.time(),
        sample_ids=["a", "b"],
        inputs=rng.random((2, 64), dtype=np.float32),
        labels=rng.dirichlet(np.ones(10), size=2).astype(np.float32),
        label_kind="probabilities",
    )
    payload = encode_update(single)

    assert payload[4] == 1
    assert not is_multi_head_payload(payload)
    assert is_multi_head_payload(encode_multi_head_update(make_update()))
    np.testing.assert_array_equal(decode_update(payload).labels, single.labels)
    with pytest.raises(InvalidUpdate) as raised:
        decode_update(encode_multi_head_update(make_update()))
    assert raised.value.reason == "unsupported_version"


def _patched(offset: int, data: bytes) -> bytes:
    payload = bytearray(encode_multi_head_update(make_update()))
    payload[offset : offset + len(data)] = data
    return bytes(payload)


MALFORMED = {
    "header flag": (_patched(5, b"\x01"), "malformed", "flags byte is 0x01"),
    "zero heads": (_patched(FIRST_HEAD - 1, b"\x00"), "malformed", "head count is 0"),
    "repeated head": (
        _patched(SECOND_HEAD + 1, b"digit"),
        "malformed",
        "head 'digit' is listed twice",
    ),
    "head name": (_patched(FIRST_HEAD + 1, b"dig-t"), "malformed", "'dig-t'"),
    "non-ASCII head name": (
        _patched(FIRST_HEAD + 1, "digä".encode()),
        "malformed",
        "'digä'",
    ),
    "head flag": (
        _patched(FIRST_HEAD + 6, b"\x12"),
        "malformed",
        "head 'digit': flags byte is 0x12",
    ),
    "one class": (
        _patched(FIRST_HEAD + 7, b"\x01\x00"),
        "malformed",
        "head 'digit': class count is 1",
    ),
    "temperature without flag": (
        _patched(FIRST_HEAD + 9, struct.pack("<f", 2.0)),
        "malformed",
        "temperature flag is not set",
    ),
    "k without flag": (
        _patched(FIRST_HEAD + 13, b"\x02\x00"),
        "malformed",
        "top-k flag is not set",
    ),
    "top-k logits": (
        _patched(SECOND_HEAD + 6, b"\x09"),
        "malformed",
        "head 'shape': flags set both top-k and logits",
    ),
    "k too large": (
        _patched(FIRST_HEAD + 6, b"\x0a\x0a\x00\x00\x00\x00\x00\x0a\x00"),
        "malformed",
        "head 'digit': top-k count is 10, expected 1 to 9",
    ),
    "trailing byte": (
        encode_multi_head_update(make_update()) + b"\x00",
        "malformed",
        "1 trailing byte",
    ),
    "cut short": (
        encode_multi_head_update(make_update())[:-1],
        "truncated",
        "payload is",
    ),
    "version 4": (_patched(4, b"\x04"), "unsupported_version", "expected 3"),
    "bad magic": (_patched(0, b"XSLO"), "bad_magic", "expected b'DSLO'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_payload_rejected(case: str) -> None:
    payload, reason, fragment = MALFORMED[case]

    with pytest.raises(InvalidUpdate) as raised:
        decode_multi_head_update(payload)

    assert raised.value.reason == reason
    assert fragment in str(raised.value)


def test_payload_limits_checked_first() -> None:
    payload = encode_multi_head_update(make_update())

    with pytest.raises(InvalidUpdate) as too_large:
        decode_multi_head_update(payload, PayloadLimits(max_payload_bytes=100))
    with pytest.raises(InvalidUpdate) as too_many:
        decode_multi_head_update(payload, PayloadLimits(max_samples=3))

    assert too_large.value.reason == "too_large"
    assert too_many.value.reason == "malformed"
    assert "sample count is 4, the limit is 3" in str(too_many.value)


def test_encoder_rejects_bad_fields() -> None:
    rng = np.random.default_rng(1)
    renamed = make_update()
    renamed.heads["bad name"] = renamed.heads.pop("shape")
    short_rows = make_update(
        shape=HeadLabels(rng.normal(size=(3, 3)).astype(np.float32), "logits")
    )
    top_k_logits = make_update(
        shape=HeadLabels(rng.normal(size=(4, 3)), "logits", top_k=1)
    )
    no_heads = make_update()
    no_heads.heads.clear()

    with pytest.raises(ValueError, match="head name 'bad name' is invalid"):
        encode_multi_head_update(renamed)
    with pytest.raises(ValueError, match=re.escape("shape (3, 3), expected (4, K)")):
        encode_multi_head_update(short_rows)
    with pytest.raises(ValueError, match="top_k of head 'shape' needs probability"):
        encode_multi_head_update(top_k_logits)
    with pytest.raises(ValueError, match="update has 0 heads, expected 1 to 32"):
        encode_multi_head_update(no_heads)


def _decoded(update: MultiHeadUpdate) -> MultiHeadUpdate:
    return decode_multi_head_update(encode_multi_head_update(update))


def _validation_error(update: MultiHeadUpdate, spec: MultiHeadSpec) -> InvalidUpdate:
    with pytest.raises(InvalidUpdate) as raised:
        validate_multi_head_update(_decoded(update), spec)
    return raised.value


def test_validation_accepts_matching_heads() -> None:
    validate_multi_head_update(_decoded(make_update()), SPEC)


def test_validation_names_missing_and_unknown_heads() -> None:
    missing = make_update()
    del missing.heads["shape"]
    unknown = make_update()
    unknown.heads["colour"] = unknown.heads["shape"]

    missing_error = _validation_error(missing, SPEC)
    unknown_error = _validation_error(unknown, SPEC)

    assert missing_error.reason == "shape_mismatch"
    assert "no labels for head 'shape'" in str(missing_error)
    assert unknown_error.reason == "shape_mismatch"
    assert "head 'colour', which the student does not have" in str(unknown_error)
    assert "digit, shape" in str(unknown_error)
    assert unknown_error.message_id == bytes(range(16)).hex()


def test_validation_names_head_with_bad_labels() -> None:
    rng = np.random.default_rng(4)
    wrong_classes = MultiHeadSpec((64,), {"digit": 10, "shape": 4})
    unnormalised = make_update(
        digit=HeadLabels(rng.dirichlet(np.ones(10), size=4).astype(np.float32) * 1.2)
    )
    bad_hard = make_update(
        digit=HeadLabels(
            rng.dirichlet(np.ones(10), size=4).astype(np.float32),
            hard_labels=np.array([0, 10, 1, 2], dtype=np.int32),
        )
    )

    classes_error = _validation_error(make_update(), wrong_classes)
    sum_error = _validation_error(unnormalised, SPEC)
    hard_error = _validation_error(bad_hard, SPEC)

    assert classes_error.reason == "shape_mismatch"
    assert str(classes_error).startswith("head 'shape': ")
    assert "the model expects 4 classes" in str(classes_error)
    assert sum_error.reason == "unnormalised"
    assert str(sum_error).startswith("head 'digit': ")
    assert hard_error.reason == "bad_hard_label"
    assert "is 10, expected -1 (none) or a class index 0 to 9" in str(hard_error)


def test_shared_field_errors_name_no_head() -> None:
    wrong_shape = MultiHeadSpec((32,), {"digit": 10, "shape": 3})
    nan_inputs = make_update()
    nan_inputs.inputs[2, 5] = np.nan
    repeated_ids = make_update()
    repeated_ids.sample_ids = ["a", "b", "a", "c"]

    shape_error = _validation_error(make_update(), wrong_shape)
    nan_error = _validation_error(nan_inputs, SPEC)
    ids_error = _validation_error(repeated_ids, SPEC)

    assert shape_error.reason == "shape_mismatch"
    assert str(shape_error).startswith("per-sample input shape is (64,)")
    assert nan_error.reason == "non_finite"
    assert str(nan_error).startswith("inputs for sample 's2' contain NaN")
    assert ids_error.reason == "duplicate_sample_id"
    assert str(ids_error).startswith("sample id 'a' appears more than once")


BASES = [encode_multi_head_update(make_update(seed=seed)) for seed in range(4)]


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "extend"]))
    base = bytearray(draw(st.sampled_from(BASES)))
    if kind == "flip":
        for position in draw(st.lists(st.integers(0, len(base) - 1), max_size=8)):
            base[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        base = base[: draw(st.integers(0, len(base) - 1))]
    elif kind == "splice":
        start = draw(st.integers(0, 120))
        base[start : start + 8] = draw(st.binary(min_size=1, max_size=8))
    else:
        base += draw(st.binary(min_size=1, max_size=64))
    return bytes(base)


@settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(payloads())
def test_fuzzed_payloads_raise_only_invalid_update(payload: bytes) -> None:
    try:
        update = decode_multi_head_update(payload, PayloadLimits(64 * 1024, 64))
        validate_multi_head_update(update, SPEC)
    except InvalidUpdate:
        return
    assert update.inputs.shape == (update.sample_count, 64)
    assert np.all(np.isfinite(update.inputs))
    for name, classes in SPEC.heads.items():
        head = update.heads[name]
        assert head.labels.shape == (update.sample_count, classes)
        assert np.all(np.isfinite(head.labels))
