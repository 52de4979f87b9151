"""Soft-label updates for students with several heads (format version 3).

One update carries the shared inputs and sample ids once, and one label set
per head: its name, class count, label kind (probabilities, logits or top-k
probabilities), an optional temperature and optional hard labels. The layout
is documented byte by byte in ``docs/protocol.md``. Versions 1 and 2 stay as
``dslo_edge.protocol`` writes and reads them.

``dslo_edge.multihead_decode.decode_multi_head_update`` parses untrusted
bytes and raises only ``InvalidUpdate``. ``validate_multi_head_update``
checks a decoded update against the student's heads. Each head's labels go
through the same checks as a single-head update, and errors name the head.

This module reuses the payload reader and field helpers of
``dslo_edge.protocol``, so both decoders enforce the same limits.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from dslo_edge.errors import InvalidUpdate
from dslo_edge.protocol import (
    FLAG_FLOAT16_INPUTS,
    FLAG_HARD_LABELS,
    FLAG_LOGITS,
    FLAG_TEMPERATURE,
    FLAG_TOP_K,
    INPUT_DTYPES,
    LABEL_KINDS,
    MAGIC,
    MAX_TEACHER_VERSION_BYTES,
    MESSAGE_ID_BYTES,
    SoftLabelUpdate,
    _as_numeric,
    _checked_hard_labels,
    _encode_sample_id,
    _wire_inputs,
    compress_top_k,
    validate_inputs,
    validate_labels,
)

__all__ = [
    "FORMAT_VERSION_MULTI_HEAD",
    "MAX_HEADS",
    "HeadLabels",
    "MultiHeadSpec",
    "MultiHeadUpdate",
    "encode_multi_head_update",
    "head_update",
    "is_multi_head_payload",
    "payload_message_id",
    "validate_multi_head_update",
]

FORMAT_VERSION_MULTI_HEAD = 3
MAX_HEADS = 32
MAX_HEAD_NAME_BYTES = 64

# Header flags of version 3: only the input dtype. Label flags are per head.
HEADER_FLAGS = FLAG_FLOAT16_INPUTS
HEAD_FLAGS = FLAG_LOGITS | FLAG_HARD_LABELS | FLAG_TEMPERATURE | FLAG_TOP_K

_U8 = struct.Struct("<B")
# flags, message id, teacher round, timestamp, sample count, input rank
HEADER_PREFIX = struct.Struct("<B16sIdIB")
# head flags, class count, temperature (0 without its flag), k (0 without top-k)
HEAD_FIELDS = struct.Struct("<BHfH")

_FLOAT32 = np.dtype("<f4")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Head names are Keras output layer names with every character other than
# ASCII letters, digits and "_" replaced by "_" (converters.heads.head_name),
# so they match this pattern.
HEAD_NAME_PATTERN = re.compile(r"\w+", re.ASCII)


@dataclass(eq=False)
class HeadLabels:
    """The teacher labels of one head for every sample of an update.

    With ``top_k`` set, the encoder sends only the k largest probabilities
    per row. A decoded top-k head has labels expanded to (N, K) and keeps k
    here.
    """

    labels: np.ndarray  # float32, shape (N, K)
    label_kind: str = "probabilities"  # or "logits"
    hard_labels: np.ndarray | None = None  # int32, shape (N,), -1 = none
    temperature: float | None = None  # None = the head's configured default
    top_k: int | None = None

    @property
    def class_count(self) -> int:
        """Number of classes K of this head."""
        return int(self.labels.shape[-1])


@dataclass(eq=False)
class MultiHeadUpdate:
    """A batch of shared inputs with one label set per head.

    ``heads`` maps head names to their labels, in wire order. Equality is
    identity because the fields include numpy arrays.
    """

    message_id: bytes  # 16 bytes
    teacher_version: str  # at most 64 bytes of UTF-8
    teacher_round: int  # 0 .. 2**32 - 1
    timestamp: float  # Unix seconds at publish time
    sample_ids: list[str]
    inputs: np.ndarray  # float32, shape (N, *input_shape)
    heads: dict[str, HeadLabels]
    input_dtype: str = "float32"  # "float16" halves the input bytes on the wire

    @property
    def message_id_hex(self) -> str:
        """Message id as 32 lowercase hex digits."""
        return self.message_id.hex()

    @property
    def sample_count(self) -> int:
        """Number of samples N in the batch."""
        return len(self.sample_ids)


@dataclass(frozen=True)
class MultiHeadSpec:
    """Input shape and the class count of each head of a student."""

    input_shape: tuple[int, ...]
    heads: Mapping[str, int]  # head name -> class count, in output order


def head_update(update: MultiHeadUpdate, name: str) -> SoftLabelUpdate:
    """Return one head's labels as a single-head update sharing the arrays."""
    head = update.heads[name]
    return SoftLabelUpdate(
        message_id=update.message_id,
        teacher_version=update.teacher_version,
        teacher_round=update.teacher_round,
        timestamp=update.timestamp,
        sample_ids=update.sample_ids,
        inputs=update.inputs,
        labels=head.labels,
        label_kind=head.label_kind,
        hard_labels=head.hard_labels,
        temperature=head.temperature,
        top_k=head.top_k,
        input_dtype=update.input_dtype,
    )


def is_multi_head_payload(payload: bytes) -> bool:
    """Return True when a payload starts like a format version 3 update."""
    prefix = bytes(payload[: len(MAGIC) + 1])
    return prefix == MAGIC + bytes([FORMAT_VERSION_MULTI_HEAD])


def payload_message_id(payload: bytes) -> str | None:
    """Return the hex message id of a version 1, 2 or 3 payload, if it has one.

    The id sits at the same offset in all three versions, after the magic,
    the version byte and the flags byte.
    """
    start = len(MAGIC) + 2
    message_id = payload[start : start + MESSAGE_ID_BYTES]
    return message_id.hex() if len(message_id) == MESSAGE_ID_BYTES else None


# --- Encoding ---------------------------------------------------------------


def encode_multi_head_update(update: MultiHeadUpdate) -> bytes:
    """Serialise a multi-head update to a format version 3 payload.

    Raises:
        ValueError: a field does not fit the format, a head name is invalid,
            or an array shape disagrees with ``sample_ids``.
    """
    inputs = _checked_inputs(update)
    version_bytes = _checked_header(update)
    heads = _checked_heads(update, inputs.shape[0])
    id_bytes = [_encode_sample_id(sample_id) for sample_id in update.sample_ids]
    flags = FLAG_FLOAT16_INPUTS if update.input_dtype == "float16" else 0
    wire_inputs = _wire_inputs(inputs, update.input_dtype)
    input_shape = inputs.shape[1:]

    parts = [
        MAGIC,
        _U8.pack(FORMAT_VERSION_MULTI_HEAD),
        HEADER_PREFIX.pack(
            flags,
            update.message_id,
            update.teacher_round,
            float(update.timestamp),
            inputs.shape[0],
            len(input_shape),
        ),
        struct.pack(f"<{len(input_shape)}I", *input_shape),
        _U8.pack(len(version_bytes)),
        version_bytes,
        _U8.pack(len(heads)),
    ]
    for name, head in heads:
        parts.append(_head_descriptor(name, head))
    for encoded in id_bytes:
        parts.append(_U8.pack(len(encoded)))
        parts.append(encoded)
    parts.append(wire_inputs.tobytes())
    for _, head in heads:
        parts.extend(_head_arrays(head))
    return b"".join(parts)


def _checked_inputs(update: MultiHeadUpdate) -> np.ndarray:
    inputs = _as_numeric("inputs", update.inputs, _FLOAT32)
    if not 2 <= inputs.ndim <= 5 or 0 in inputs.shape:
        raise ValueError(
            f"inputs has shape {inputs.shape}, expected (N, *input_shape) with 1 to "
            "4 per-sample dimensions, all non-zero"
        )
    if max(inputs.shape) > 0xFFFFFFFF:
        raise ValueError(f"inputs shape {inputs.shape} has a dimension above 2**32-1")
    if len(update.sample_ids) != inputs.shape[0]:
        raise ValueError(
            f"update has {len(update.sample_ids)} sample ids but inputs has "
            f"{inputs.shape[0]} samples, expected one id per sample"
        )
    if update.input_dtype not in INPUT_DTYPES:
        raise ValueError(
            f"input_dtype is {update.input_dtype!r}, expected one of {INPUT_DTYPES}"
        )
    return inputs


def _checked_header(update: MultiHeadUpdate) -> bytes:
    """Check the scalar header fields and return the encoded teacher version."""
    if not isinstance(update.message_id, bytes) or (
        len(update.message_id) != MESSAGE_ID_BYTES
    ):
        raise ValueError(
            f"message_id is {update.message_id!r}, expected {MESSAGE_ID_BYTES} "
            "bytes such as new_message_id()"
        )
    if not 0 <= update.teacher_round <= 0xFFFFFFFF:
        raise ValueError(
            f"teacher_round is {update.teacher_round}, expected 0 to 2**32-1"
        )
    version_bytes = update.teacher_version.encode("utf-8")
    if len(version_bytes) > MAX_TEACHER_VERSION_BYTES:
        raise ValueError(
            f"teacher_version {update.teacher_version!r} is {len(version_bytes)} "
            f"bytes of UTF-8, expected at most {MAX_TEACHER_VERSION_BYTES}"
        )
    return version_bytes


def _checked_heads(
    update: MultiHeadUpdate, sample_count: int
) -> list[tuple[bytes, HeadLabels]]:
    """Return (encoded name, labels in payload dtypes) per head after checks."""
    if not 1 <= len(update.heads) <= MAX_HEADS:
        raise ValueError(
            f"update has {len(update.heads)} heads, expected 1 to {MAX_HEADS}"
        )
    checked = []
    for name, head in update.heads.items():
        encoded = _checked_head_name(name)
        checked.append((encoded, _checked_head(name, head, sample_count)))
    return checked


def _checked_head_name(name: str) -> bytes:
    encoded = name.encode("utf-8")
    if not HEAD_NAME_PATTERN.fullmatch(name) or len(encoded) > MAX_HEAD_NAME_BYTES:
        raise ValueError(
            f"head name {name!r} is invalid, expected 1 to {MAX_HEAD_NAME_BYTES} "
            "bytes of letters, digits and '_', as in the bundle manifest"
        )
    return encoded


def _checked_head(name: str, head: HeadLabels, sample_count: int) -> HeadLabels:
    labels = _as_numeric(f"labels of head {name!r}", head.labels, _FLOAT32)
    if labels.ndim != 2 or labels.shape[0] != sample_count:
        raise ValueError(
            f"labels of head {name!r} have shape {labels.shape}, expected "
            f"({sample_count}, K) to match the {sample_count} input samples"
        )
    if not 2 <= labels.shape[1] <= 0xFFFF:
        raise ValueError(
            f"labels of head {name!r} have {labels.shape[1]} classes, expected "
            "2 to 65535"
        )
    if head.label_kind not in LABEL_KINDS:
        raise ValueError(
            f"label_kind of head {name!r} is {head.label_kind!r}, expected one of "
            f"{LABEL_KINDS}"
        )
    _check_encodable_temperature(name, head.temperature)
    _check_encodable_top_k(name, head, labels.shape[1])
    hard = None
    if head.hard_labels is not None:
        hard = _checked_hard_labels(head.hard_labels, sample_count)
    return HeadLabels(labels, head.label_kind, hard, head.temperature, head.top_k)


def _check_encodable_temperature(name: str, temperature: float | None) -> None:
    # struct raises OverflowError for finite values beyond float32. NaN and
    # infinity pass here and are rejected by validation on the device.
    if (
        temperature is not None
        and math.isfinite(temperature)
        and abs(temperature) > _FLOAT32_MAX
    ):
        raise ValueError(
            f"temperature of head {name!r} is {temperature:g}, expected a value "
            "that fits in float32"
        )


def _check_encodable_top_k(name: str, head: HeadLabels, class_count: int) -> None:
    top_k = head.top_k
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(
            f"top_k of head {name!r} is {top_k!r}, expected an integer or None"
        )
    if not 1 <= top_k < class_count:
        raise ValueError(
            f"top_k of head {name!r} is {top_k}, expected 1 to {class_count - 1} "
            f"for {class_count} classes; send full labels with top_k=None"
        )
    if head.label_kind != "probabilities":
        raise ValueError(
            f"top_k of head {name!r} needs probability labels, got logits; "
            "convert them with softmax(logits / T) at the hub first"
        )


def _head_descriptor(name: bytes, head: HeadLabels) -> bytes:
    flags = 0
    if head.label_kind == "logits":
        flags |= FLAG_LOGITS
    if head.hard_labels is not None:
        flags |= FLAG_HARD_LABELS
    if head.temperature is not None:
        flags |= FLAG_TEMPERATURE
    if head.top_k is not None:
        flags |= FLAG_TOP_K
    fields = HEAD_FIELDS.pack(
        flags,
        head.class_count,
        0.0 if head.temperature is None else float(head.temperature),
        head.top_k or 0,
    )
    return _U8.pack(len(name)) + name + fields


def _head_arrays(head: HeadLabels) -> list[bytes]:
    if head.top_k is None:
        parts = [head.labels.tobytes()]
    else:
        parts = [part.tobytes() for part in compress_top_k(head.labels, head.top_k)]
    if head.hard_labels is not None:
        parts.append(head.hard_labels.tobytes())
    return parts


# --- Validation against the model --------------------------------------------


def validate_multi_head_update(
    update: MultiHeadUpdate, spec: MultiHeadSpec, *, sum_tolerance: float = 1e-3
) -> None:
    """Check a decoded multi-head update against the student's heads.

    The update must have labels for exactly the student's heads. Its inputs
    and sample ids then pass ``protocol.validate_inputs`` once, and each
    head's labels pass ``protocol.validate_labels`` with that head's class
    count, whose errors are raised with the head name in front.

    Raises:
        InvalidUpdate: ``shape_mismatch`` for a missing or unknown head, and
            otherwise the reasons of ``validate_update``.
    """
    _check_head_names(update, spec)
    validate_inputs(head_update(update, next(iter(spec.heads))), spec.input_shape)
    for name, class_count in spec.heads.items():
        try:
            validate_labels(
                head_update(update, name), class_count, sum_tolerance=sum_tolerance
            )
        except InvalidUpdate as error:
            raise InvalidUpdate(
                error.reason, f"head {name!r}: {error}", update.message_id_hex
            ) from None


def _check_head_names(update: MultiHeadUpdate, spec: MultiHeadSpec) -> None:
    expected = ", ".join(spec.heads)
    for name in update.heads:
        if name not in spec.heads:
            raise InvalidUpdate(
                "shape_mismatch",
                f"update has labels for head {name!r}, which the student does not "
                f"have; expected the heads {expected}",
                update.message_id_hex,
            )
    for name in spec.heads:
        if name not in update.heads:
            raise InvalidUpdate(
                "shape_mismatch",
                f"update has no labels for head {name!r}; expected one label set "
                f"for each of the heads {expected}",
                update.message_id_hex,
            )
