"""Decode format version 3 (multi-head) payloads from untrusted bytes.

The reader, the sample id loop and the top-k expansion are those of
``dslo_edge.protocol``, so both decoders enforce the same limits and raise
only ``InvalidUpdate``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from dslo_edge.errors import InvalidUpdate
from dslo_edge.multihead_protocol import (
    FORMAT_VERSION_MULTI_HEAD,
    HEAD_FIELDS,
    HEAD_FLAGS,
    HEAD_NAME_PATTERN,
    HEADER_FLAGS,
    HEADER_PREFIX,
    MAX_HEAD_NAME_BYTES,
    MAX_HEADS,
    HeadLabels,
    MultiHeadUpdate,
)
from dslo_edge.protocol import (
    FLAG_FLOAT16_INPUTS,
    FLAG_HARD_LABELS,
    FLAG_LOGITS,
    FLAG_TEMPERATURE,
    FLAG_TOP_K,
    MAGIC,
    PayloadLimits,
    _check_exact_length,
    _check_sample_count,
    _PayloadReader,
    _read_input_shape,
    _read_sample_ids,
    _read_teacher_version,
    _read_top_k_labels,
)

_U8 = struct.Struct("<B")
_FLOAT32 = np.dtype("<f4")
_INT32 = np.dtype("<i4")


@dataclass(frozen=True)
class _HeadLayout:
    """One head's descriptor as read from the payload header."""

    name: str
    flags: int
    class_count: int
    temperature: float | None
    top_k: int | None

    def array_bytes(self, sample_count: int) -> int:
        if self.top_k is None:
            label_bytes = 4 * sample_count * self.class_count
        else:
            # uint16 index and float32 value per kept class, float32 remaining mass.
            label_bytes = sample_count * (6 * self.top_k + 4)
        hard_bytes = 4 * sample_count if self.flags & FLAG_HARD_LABELS else 0
        return label_bytes + hard_bytes


def decode_multi_head_update(
    payload: bytes, limits: PayloadLimits | None = None
) -> MultiHeadUpdate:
    """Parse a format version 3 payload into a MultiHeadUpdate.

    Top-k heads are expanded to (N, K) by ``expand_top_k``. Array sizes
    declared in the header are compared with the real payload length before
    any array is allocated, and the returned arrays own their memory.

    Raises:
        InvalidUpdate: with reason ``too_large``, ``truncated``, ``bad_magic``,
            ``unsupported_version`` or ``malformed``. No other exception is
            raised for any ``bytes`` input.
    """
    limits = limits or PayloadLimits()
    if len(payload) > limits.max_payload_bytes:
        raise InvalidUpdate(
            "too_large",
            f"payload is {len(payload)} bytes, the limit is "
            f"{limits.max_payload_bytes}. The hub should send smaller batches",
        )
    reader = _PayloadReader(payload)
    _read_magic_and_version(reader)
    flags, message_id, teacher_round, timestamp, sample_count, rank = reader.unpack(
        HEADER_PREFIX, "header"
    )
    reader.message_id = message_id.hex()
    _check_header_flags(reader, flags)
    _check_sample_count(reader, sample_count, limits)
    input_shape = _read_input_shape(reader, rank)
    teacher_version = _read_teacher_version(reader)
    layouts = _read_head_layouts(reader)

    float16_inputs = bool(flags & FLAG_FLOAT16_INPUTS)
    input_bytes = (2 if float16_inputs else 4) * sample_count * math.prod(input_shape)
    array_bytes = input_bytes + sum(h.array_bytes(sample_count) for h in layouts)
    # Each sample id takes at least its length byte, so this bound catches a
    # huge declared size before the id loop or any allocation.
    reader.require(sample_count + array_bytes, "sample ids and arrays")
    sample_ids = _read_sample_ids(reader, sample_count)
    _check_exact_length(reader, array_bytes)

    if float16_inputs:
        half = reader.array((sample_count, *input_shape), np.dtype("<f2"))
        inputs = half.astype(np.float32)
    else:
        inputs = reader.array((sample_count, *input_shape), _FLOAT32)
    heads = {
        layout.name: _read_head_arrays(reader, layout, sample_count)
        for layout in layouts
    }
    return MultiHeadUpdate(
        message_id=message_id,
        teacher_version=teacher_version,
        teacher_round=teacher_round,
        timestamp=timestamp,
        sample_ids=sample_ids,
        inputs=inputs,
        heads=heads,
        input_dtype="float16" if float16_inputs else "float32",
    )


def _read_magic_and_version(reader: _PayloadReader) -> None:
    head = bytes(reader.view[: len(MAGIC)])
    if not MAGIC.startswith(head):
        raise reader.error(
            "bad_magic",
            f"payload starts with {head!r}, expected {MAGIC!r}. The sender is not "
            "a dslo-edge hub or the topic is shared with another publisher",
        )
    reader.take(len(MAGIC), "magic")
    version = reader.unpack(_U8, "format version")[0]
    if version != FORMAT_VERSION_MULTI_HEAD:
        raise reader.error(
            "unsupported_version",
            f"payload format version is {version}, expected "
            f"{FORMAT_VERSION_MULTI_HEAD} (one label set per head)",
        )


def _check_header_flags(reader: _PayloadReader, flags: int) -> None:
    if flags & ~HEADER_FLAGS:
        raise reader.error(
            "malformed",
            f"flags byte is {flags:#04x}, expected only bit 4 (mask "
            f"{HEADER_FLAGS:#04x}, float16 inputs) in format version "
            f"{FORMAT_VERSION_MULTI_HEAD}; label flags go in each head's "
            "descriptor",
        )


def _read_head_layouts(reader: _PayloadReader) -> list[_HeadLayout]:
    count = reader.unpack(_U8, "head count")[0]
    if not 1 <= count <= MAX_HEADS:
        raise reader.error(
            "malformed", f"head count is {count}, expected 1 to {MAX_HEADS}"
        )
    layouts: list[_HeadLayout] = []
    for index in range(count):
        layout = _read_head_layout(reader, index)
        if any(other.name == layout.name for other in layouts):
            raise reader.error(
                "malformed",
                f"head {layout.name!r} is listed twice, expected distinct head names",
            )
        layouts.append(layout)
    return layouts


def _read_head_layout(reader: _PayloadReader, index: int) -> _HeadLayout:
    length = reader.unpack(_U8, f"name length of head {index}")[0]
    name = reader.text(length, f"name of head {index}")
    if not 1 <= length <= MAX_HEAD_NAME_BYTES or not HEAD_NAME_PATTERN.fullmatch(name):
        raise reader.error(
            "malformed",
            f"head {index} has name {name!r}, expected 1 to {MAX_HEAD_NAME_BYTES} "
            "bytes of letters, digits and '_'",
        )
    flags, class_count, temperature, top_k = reader.unpack(
        HEAD_FIELDS, f"fields of head {name!r}"
    )
    _check_head_fields(reader, name, flags, class_count, temperature, top_k)
    return _HeadLayout(
        name,
        flags,
        class_count,
        temperature if flags & FLAG_TEMPERATURE else None,
        top_k if flags & FLAG_TOP_K else None,
    )


def _check_head_fields(
    reader: _PayloadReader,
    name: str,
    flags: int,
    class_count: int,
    temperature: float,
    top_k: int,
) -> None:
    def malformed(detail: str) -> InvalidUpdate:
        return reader.error("malformed", f"head {name!r}: {detail}")

    if flags & ~HEAD_FLAGS:
        raise malformed(
            f"flags byte is {flags:#04x}, expected only bits 0 to 3 (mask "
            f"{HEAD_FLAGS:#04x})"
        )
    if class_count < 2:
        raise malformed(f"class count is {class_count}, expected at least 2")
    if not flags & FLAG_TEMPERATURE and temperature != 0.0:
        raise malformed(
            f"temperature field is {temperature} but the temperature flag is not "
            "set, expected 0"
        )
    if not flags & FLAG_TOP_K:
        if top_k != 0:
            raise malformed(
                f"top-k count is {top_k} but the top-k flag is not set, expected 0"
            )
        return
    if flags & FLAG_LOGITS:
        raise malformed(
            "flags set both top-k and logits, expected top-k labels to be probabilities"
        )
    if not 1 <= top_k < class_count:
        raise malformed(
            f"top-k count is {top_k}, expected 1 to {class_count - 1} for "
            f"{class_count} classes"
        )


def _read_head_arrays(
    reader: _PayloadReader, layout: _HeadLayout, sample_count: int
) -> HeadLabels:
    if layout.top_k is None:
        labels = reader.array((sample_count, layout.class_count), _FLOAT32)
    else:
        try:
            labels = _read_top_k_labels(
                reader, sample_count, layout.class_count, layout.top_k
            )
        except InvalidUpdate as error:
            raise reader.error(error.reason, f"head {layout.name!r}: {error}") from None
    hard = None
    if layout.flags & FLAG_HARD_LABELS:
        hard = reader.array((sample_count,), _INT32)
    return HeadLabels(
        labels,
        "logits" if layout.flags & FLAG_LOGITS else "probabilities",
        hard,
        layout.temperature,
        layout.top_k,
    )
