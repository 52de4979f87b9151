"""The admission check that rejects inputs of an implausible magnitude."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dslo_edge.admission import OUT_OF_RANGE, check_input_range
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
)

SPEC = ModelSpec((4,), 3)
LIMIT = 1e6


def payload_with(value: float, input_dtype: str = "float32") -> bytes:
    inputs = np.zeros((2, 4), dtype=np.float32)
    inputs[1, 2] = value
    update = SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="t",
        teacher_round=1,
        timestamp=time.time(),
        sample_ids=["a", "b"],
        inputs=inputs,
        labels=np.full((2, 3), 1 / 3, dtype=np.float32),
        label_kind="probabilities",
        input_dtype=input_dtype,
    )
    return encode_update(update)


def decoders(payload: bytes) -> dict[str, SoftLabelUpdate]:
    """Return the updates that decode_checked and decode_update read."""
    return {
        "checked": decode_checked(payload, SPEC, PayloadLimits()),
        "python": decode_update(payload, PayloadLimits()),
    }


@pytest.mark.parametrize("value", [-2.5e6, 2.5e6, 3.0e38])
def test_large_input_rejected_by_both_decoders(value: float) -> None:
    for name, update in decoders(payload_with(value)).items():
        with pytest.raises(InvalidUpdate) as caught:
            check_input_range(update, LIMIT)
        assert caught.value.reason == OUT_OF_RANGE, name
        assert f"magnitude {abs(value):.3g}" in str(caught.value), name
        assert "limits.max_abs_input = 1e+06" in str(caught.value), name


@pytest.mark.parametrize("value", [-1e6, 0.0, 1e6])
def test_input_at_limit_passes(value: float) -> None:
    for update in decoders(payload_with(value)).values():
        check_input_range(update, LIMIT)


def test_compiled_decoder_reports_the_peak() -> None:
    if decoder_name() != "compiled":
        pytest.skip("the compiled decoder is not built here")
    assert decoders(payload_with(-7.5))["checked"].input_peak == 7.5
    assert decoders(payload_with(-7.5))["python"].input_peak is None
    assert decoders(payload_with(60000.0, "float16"))["checked"].input_peak == 60000.0


def test_message_tells_value_from_limit() -> None:
    update = decoders(payload_with(1000000.0625))["checked"]
    with pytest.raises(InvalidUpdate) as caught:
        check_input_range(update, LIMIT)
    assert "magnitude 1000000.1, above limits.max_abs_input = 1000000;" in str(
        caught.value
    )
