"""The compiled payload decoder against the Python decoder and validator.

``decode_checked`` must give what ``decode_update`` followed by
``validate_update`` gives: the same fields and bit-equal arrays for a valid
payload, and the same rejection for an invalid one.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dslo_edge import protocol
from dslo_edge.errors import InvalidUpdate
from dslo_edge.protocol import (
    ModelSpec,
    PayloadLimits,
    SoftLabelUpdate,
    decode_checked,
    decode_update,
    decoder_name,
    encode_update,
    new_message_id,
    validate_update,
)

pytestmark = pytest.mark.skipif(
    decoder_name() != "compiled",
    reason="the compiled decoder was not built (no C compiler) or is switched off",
)

LIMITS = PayloadLimits(max_payload_bytes=256 * 1024, max_samples=64)
FIELDS = (
    "message_id",
    "teacher_version",
    "teacher_round",
    "timestamp",
    "sample_ids",
    "label_kind",
    "temperature",
    "top_k",
    "input_dtype",
)


def make_update(rng: np.random.Generator, **changes: Any) -> SoftLabelUpdate:
    count = changes.pop("count", 4)
    shape = changes.pop("shape", (8,))
    classes = changes.pop("classes", 5)
    update = SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="teacher-7",
        teacher_round=int(rng.integers(0, 2**32)),
        timestamp=time.time(),
        sample_ids=[f"s{i}" for i in range(count)],
        inputs=rng.normal(size=(count, *shape)).astype(np.float32),
        labels=rng.dirichlet(np.ones(classes), size=count).astype(np.float32),
        label_kind="probabilities",
    )
    for name, value in changes.items():
        setattr(update, name, value)
    return update


def outcome(decode: Any) -> tuple[Any, ...]:
    """Return the decoded fields and array bits, or the rejection."""
    try:
        update = decode()
    except InvalidUpdate as error:
        return ("rejected", error.reason, str(error))
    if update.input_peak is not None:
        # Only the compiled decoder sets it, to the largest input magnitude.
        assert update.input_peak == float(np.abs(update.inputs).max(initial=0.0))
    arrays = [update.inputs, update.labels, update.hard_labels]
    return (
        "decoded",
        tuple(getattr(update, name) for name in FIELDS),
        tuple(
            None if a is None else (a.dtype.str, a.shape, a.tobytes()) for a in arrays
        ),
    )


def python_outcome(payload: bytes, spec: ModelSpec) -> tuple[Any, ...]:
    def decode() -> SoftLabelUpdate:
        update = decode_update(payload, LIMITS)
        validate_update(update, spec)
        return update

    return outcome(decode)


def compiled_outcome(payload: bytes, spec: ModelSpec) -> tuple[Any, ...]:
    return outcome(lambda: decode_checked(payload, spec, LIMITS))


def took_compiled_path(payload: bytes, spec: ModelSpec) -> bool:
    return protocol._decode_compiled(payload, spec, LIMITS, 1e-3) is not None


def spec_of(update: SoftLabelUpdate) -> ModelSpec:
    return ModelSpec(update.inputs.shape[1:], update.labels.shape[1])


@st.composite
def valid_updates(draw: st.DrawFn) -> SoftLabelUpdate:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    count = draw(st.integers(1, 40))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    classes = draw(st.integers(2, 12))
    update = make_update(rng, count=count, shape=shape, classes=classes)
    update.teacher_version = draw(st.text(max_size=8))
    update.sample_ids = draw(
        st.lists(
            st.text(min_size=0, max_size=6), min_size=count, max_size=count, unique=True
        )
    )
    if draw(st.booleans()):
        update.label_kind = "logits"
        update.labels = rng.normal(0, 3, size=(count, classes)).astype(np.float32)
    if draw(st.booleans()):
        update.hard_labels = rng.integers(-1, classes, size=count).astype(np.int32)
    if draw(st.booleans()):
        update.temperature = draw(st.sampled_from([0.5, 1.0, 2.0, 100.0]))
    if draw(st.booleans()):
        update.input_dtype = "float16"
    return update


@settings(max_examples=300, deadline=None)
@given(valid_updates())
def test_valid_payloads_decode_alike(update: SoftLabelUpdate) -> None:
    payload = encode_update(update)
    spec = spec_of(update)
    expected = python_outcome(payload, spec)

    assert expected[0] == "decoded"
    assert compiled_outcome(payload, spec) == expected
    ascii_ids = all(sample_id.isascii() for sample_id in update.sample_ids)
    assert took_compiled_path(payload, spec) == ascii_ids


def test_every_finite_float16_converts_exactly() -> None:
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)]
    rows = -(-finite.size // 64)
    inputs = np.zeros(rows * 64, dtype=np.float16)
    inputs[: finite.size] = finite
    rng = np.random.default_rng(1)
    update = make_update(rng, count=rows, shape=(64,), classes=3, input_dtype="float16")
    update.inputs = inputs.reshape(rows, 64).astype(np.float32)
    payload = encode_update(update)
    spec = spec_of(update)
    limits = PayloadLimits(max_samples=rows)

    decoded = decode_checked(payload, spec, limits)

    assert finite.size == 63488
    assert protocol._decode_compiled(payload, spec, limits, 1e-3) is not None
    assert decoded.inputs.tobytes() == inputs.astype(np.float32).tobytes()
    assert decoded.input_peak == 65504.0


def replace(payload: bytes, offset: int, layout: str, value: Any) -> bytes:
    changed = bytearray(payload)
    struct.pack_into(layout, changed, offset, value)
    return bytes(changed)


def damaged_payloads() -> dict[str, tuple[bytes, ModelSpec]]:
    """Return payloads that each break one rule, by the rule."""
    rng = np.random.default_rng(2)
    base = make_update(rng, count=4, shape=(8,), classes=5)
    spec = spec_of(base)
    valid = encode_update(base)
    # Offsets for rank 1: class count at 43, temperature at 45, then the
    # teacher version length at 49 and the version text from 50.
    arrays_at = len(valid) - 4 * (4 * 8 + 4 * 5)
    labels_at = arrays_at + 4 * 4 * 8

    def with_update(**changes: Any) -> bytes:
        update = make_update(np.random.default_rng(3), count=4, shape=(8,), classes=5)
        for name, value in changes.items():
            setattr(update, name, value)
        return encode_update(update)

    nan_inputs = base.inputs.copy()
    nan_inputs[2, 3] = np.nan
    negative = base.labels.copy()
    negative[1, :2] = [-0.25, negative[1, 0] + negative[1, 1] + 0.25]
    unnormalised = base.labels * 1.01
    damaged = {
        "too large": valid + bytes(LIMITS.max_payload_bytes),
        "bad magic": b"XSLO" + valid[4:],
        "version 3": replace(valid, 4, "<B", 3),
        "unknown flag": replace(valid, 5, "<B", 0x20),
        "float16 flag in version 1": replace(valid, 5, "<B", 0x10),
        "no samples": replace(valid, 34, "<I", 0),
        "more samples than the limit": replace(valid, 34, "<I", 65),
        "more samples than the payload": replace(valid, 34, "<I", 5),
        "rank 0": replace(valid, 38, "<B", 0),
        "other input size": replace(valid, 39, "<I", 7),
        "one class": replace(valid, 43, "<H", 1),
        "other class count": replace(valid, 43, "<H", 6),
        "temperature without its flag": replace(valid, 45, "<f", 2.0),
        "temperature 0": with_update(temperature=0.0),
        "temperature above 100": with_update(temperature=101.0),
        "non-finite temperature": with_update(temperature=float("inf")),
        "long teacher version": replace(valid, 49, "<B", 65),
        "teacher version not UTF-8": valid[:50] + b"\xff" + valid[51:],
        "repeated sample id": with_update(sample_ids=["a", "b", "a", "d"]),
        "truncated": valid[:-1],
        "trailing byte": valid + b"\x00",
        "NaN input": with_update(inputs=nan_inputs),
        "infinite label": replace(valid, labels_at + 8, "<f", float("inf")),
        "negative probability": with_update(labels=negative),
        "unnormalised": with_update(labels=unnormalised),
        "hard label -2": with_update(hard_labels=np.array([0, -2, 1, 2], np.int32)),
        "hard label = classes": with_update(
            hard_labels=np.array([0, 5, 1, 2], np.int32)
        ),
    }
    return {name: (payload, spec) for name, payload in damaged.items()}


@pytest.mark.parametrize(
    "changes",
    [{"sample_ids": ["a", "b", "ü", "d"]}, {"top_k": 2}],
    ids=["non-ASCII sample id", "top-k labels"],
)
def test_other_valid_payloads_go_to_python(changes: dict[str, Any]) -> None:
    update = make_update(np.random.default_rng(5), **changes)
    payload = encode_update(update)
    spec = spec_of(update)
    expected = python_outcome(payload, spec)

    assert expected[0] == "decoded"
    assert not took_compiled_path(payload, spec)
    assert compiled_outcome(payload, spec) == expected


@pytest.mark.parametrize("name", sorted(damaged_payloads()))
def test_damaged_payload_gets_python_rejection(name: str) -> None:
    payload, spec = damaged_payloads()[name]
    expected = python_outcome(payload, spec)

    assert expected[0] == "rejected"
    assert not took_compiled_path(payload, spec)
    assert compiled_outcome(payload, spec) == expected


def test_sum_at_tolerance_edge_goes_to_python() -> None:
    rng = np.random.default_rng(4)
    update = make_update(rng, count=1, classes=2)
    # 0.5 + 0.5005 is 1.0005 in float64 up to float32 rounding of 0.5005.
    update.labels = np.array([[0.5, 0.5005]], dtype=np.float32)
    payload = encode_update(update)
    spec = spec_of(update)
    edge = float(np.float64(np.float32(0.5005)) + 0.5 - 1.0)

    def decode(tolerance: float) -> tuple[Any, ...]:
        return outcome(
            lambda: decode_checked(payload, spec, LIMITS, sum_tolerance=tolerance)
        )

    def reference(tolerance: float) -> tuple[Any, ...]:
        def both() -> SoftLabelUpdate:
            decoded = decode_update(payload, LIMITS)
            validate_update(decoded, spec, sum_tolerance=tolerance)
            return decoded

        return outcome(both)

    for tolerance in (edge, np.nextafter(edge, 0.0), edge + 2e-9, edge - 2e-9):
        assert decode(tolerance) == reference(tolerance)
    assert decode(edge)[0] == "decoded"
    assert decode(np.nextafter(edge, 0.0))[0] == "rejected"


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    update = make_update(
        rng,
        hard_labels=np.array([0, -1, 4, 2], np.int32),
        temperature=2.0,
        input_dtype=draw(st.sampled_from(["float32", "float16"])),
    )
    base = bytearray(encode_update(update))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(base) - 1))
        base[position] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        base = base[: draw(st.integers(0, len(base)))]
    return bytes(base)


@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(mutated())
def test_mutated_payloads_decode_alike(payload: bytes) -> None:
    spec = ModelSpec((8,), 5)

    assert compiled_outcome(payload, spec) == python_outcome(payload, spec)


def test_numpy_integers_in_model_shape() -> None:
    update = make_update(np.random.default_rng(6), count=2, shape=(4,), classes=3)
    payload = encode_update(update)
    spec = ModelSpec(tuple(np.array([4])), np.int64(3))

    assert took_compiled_path(payload, spec)
    assert compiled_outcome(payload, spec) == python_outcome(payload, spec)


def decoder_with(choice: str) -> subprocess.CompletedProcess[str]:
    """Return the output of ``decoder_name()`` in a process with ``choice`` set."""
    environment = dict(os.environ, DSLO_PAYLOAD_DECODER=choice)
    code = "from dslo_edge.protocol import decoder_name; print(decoder_name())"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )


def test_environment_variable_selects_python_decoder() -> None:
    assert decoder_with("python").stdout.strip() == "python"


def test_unknown_decoder_choice_is_logged() -> None:
    result = decoder_with("fast")

    assert result.stdout.strip() == "compiled"
    assert "DSLO_PAYLOAD_DECODER is 'fast', expected 'python'" in result.stderr


@pytest.mark.parametrize("position", [0, 255])
@pytest.mark.parametrize("half", [0x7C00, 0xFC00, 0x7E00], ids=["inf", "-inf", "NaN"])
def test_float16_non_finite_input_rejected(half: int, position: int) -> None:
    update = make_update(
        np.random.default_rng(6), count=4, shape=(64,), classes=5, input_dtype="float16"
    )
    valid = encode_update(update)
    # The float16 inputs, 4 x 64 of 2 bytes each, precede the float32 labels.
    inputs_at = len(valid) - 2 * 4 * 64 - 4 * 4 * 5
    payload = replace(valid, inputs_at + 2 * position, "<H", half)
    spec = spec_of(update)

    assert python_outcome(payload, spec)[0] == "rejected"
    assert not took_compiled_path(payload, spec)


def test_float16_subnormals_keep_sign_and_peak() -> None:
    tiny = np.float16(2.0**-24)
    values = np.array([0.0, -0.0, tiny, -3 * tiny, 1023 * tiny, -512 * tiny])
    inputs = np.resize(values.astype(np.float16), (2, 64))
    update = make_update(
        np.random.default_rng(7), count=2, shape=(64,), classes=3, input_dtype="float16"
    )
    update.inputs = inputs.astype(np.float32)
    payload = encode_update(update)
    spec = spec_of(update)

    decoded = decode_checked(payload, spec, LIMITS)

    assert took_compiled_path(payload, spec)
    assert decoded.inputs.tobytes() == inputs.astype(np.float32).tobytes()
    assert np.signbit(decoded.inputs[0, 1])
    assert decoded.input_peak == 1023 * 2.0**-24
