"""10,000 random and mutated payloads through the decoder and validator."""

from __future__ import annotations

import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dslo_edge.errors import InvalidUpdate
from dslo_edge.protocol import (
    ModelSpec,
    PayloadLimits,
    SoftLabelUpdate,
    decode_update,
    encode_update,
    new_message_id,
    validate_update,
)

SPEC = ModelSpec(input_shape=(64,), class_count=10)
LIMITS = PayloadLimits(max_payload_bytes=64 * 1024, max_samples=64)


def _valid_payload(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_update(
        SoftLabelUpdate(
            message_id=new_message_id(),
            teacher_version="fuzz",
            teacher_round=3,
            timestamp=time.time(),
            sample_ids=[f"s{i}" for i in range(4)],
            inputs=rng.random((4, 64), dtype=np.float32),
            labels=rng.dirichlet(np.ones(10), size=4).astype(np.float32),
            label_kind="probabilities",
            hard_labels=np.array([1, -1, 3, 9], dtype=np.int32),
            temperature=2.0,
        )
    )


BASES = [_valid_payload(seed) for seed in range(8)]


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "flip", "truncate", "splice", "extend"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    base = bytearray(draw(st.sampled_from(BASES)))
    if kind == "flip":
        for position in draw(st.lists(st.integers(0, len(base) - 1), max_size=8)):
            base[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        base = base[: draw(st.integers(0, len(base) - 1))]
    elif kind == "splice":
        start = draw(st.integers(0, len(base) - 1))
        base[start : start + 8] = draw(st.binary(min_size=1, max_size=8))
    else:
        base += draw(st.binary(min_size=1, max_size=64))
    return bytes(base)


def _check_accepted(update: SoftLabelUpdate) -> None:
    """What reaches train: shapes of the model, finite, normalised."""
    assert update.inputs.shape[1:] == SPEC.input_shape
    assert update.labels.shape == (update.sample_count, SPEC.class_count)
    assert np.all(np.isfinite(update.inputs))
    assert np.all(np.isfinite(update.labels))
    if update.label_kind == "probabilities":
        assert np.all(update.labels >= 0)
        assert np.all(np.abs(update.labels.sum(axis=1) - 1) <= 1e-3)
    if update.hard_labels is not None:
        assert np.all((update.hard_labels >= -1) & (update.hard_labels < 10))
    assert len(set(update.sample_ids)) == update.sample_count


@settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(payloads())
def test_fuzzed_payloads_never_reach_train_invalid(payload: bytes) -> None:
    try:
        update = decode_update(payload, LIMITS)
        validate_update(update, SPEC)
    except InvalidUpdate as error:
        assert error.reason
        return
    _check_accepted(update)


def test_oversized_payload_is_rejected_before_parsing() -> None:
    payload = b"\xff" * (LIMITS.max_payload_bytes + 1)

    try:
        decode_update(payload, LIMITS)
    except InvalidUpdate as error:
        assert error.reason == "too_large"
    else:
        raise AssertionError("an oversized payload was decoded")
