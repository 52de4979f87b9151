"""MQTT topics and the binary soft-label update format sent from hub to device.

An update carries a batch of inputs with the teacher's soft labels. The payload
layout (format versions 1 and 2, little-endian) is documented byte by byte in
``docs/protocol.md``. Version 2 adds top-k labels: the k largest probabilities
of each row, their class indices and the remaining mass, which the device
expands back to K classes. ``decode_update`` parses untrusted bytes and raises only
``InvalidUpdate``. ``validate_update`` then checks a decoded update against the
student's input shape and class count before it reaches the trainer.

``decode_checked`` does both for the trainer. Where the install built the
compiled decoder (``_payload_decoder.c``), it reads the common payload there
and leaves every other payload, and every payload that fails a check, to the
Python code, which raises the precise error.

This module uses numpy and the standard library only, besides that optional
decoder.
"""

from __future__ import annotations

import math
import struct
import uuid
from dataclasses import dataclass, field

import numpy as np

from dslo_edge.errors import ConfigError, InvalidUpdate
from dslo_edge.extensions import load_extension

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_VERSION_TOP_K",
    "MAGIC",
    "REJECTION_REASONS",
    "STATUS_OFFLINE",
    "STATUS_ONLINE",
    "ModelSpec",
    "PayloadLimits",
    "SoftLabelUpdate",
    "Topics",
    "compress_top_k",
    "decode_checked",
    "decode_update",
    "decoder_name",
    "encode_update",
    "expand_top_k",
    "label_probabilities",
    "new_message_id",
    "validate_inputs",
    "validate_labels",
    "validate_update",
]

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"

MAGIC = b"DSLO"
# Full labels are written as version 1, so devices that read only version 1
# keep working. Top-k labels need version 2.
FORMAT_VERSION = 1
FORMAT_VERSION_TOP_K = 2
SUPPORTED_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_TOP_K)

FLAG_LOGITS = 0x01
FLAG_HARD_LABELS = 0x02
FLAG_TEMPERATURE = 0x04
FLAG_TOP_K = 0x08
# Inputs are float16 instead of float32 (format version 2 only).
FLAG_FLOAT16_INPUTS = 0x10
INPUT_DTYPES = ("float32", "float16")
_KNOWN_FLAGS = {
    FORMAT_VERSION: FLAG_LOGITS | FLAG_HARD_LABELS | FLAG_TEMPERATURE,
    FORMAT_VERSION_TOP_K: FLAG_LOGITS
    | FLAG_HARD_LABELS
    | FLAG_TEMPERATURE
    | FLAG_TOP_K
    | FLAG_FLOAT16_INPUTS,
}

LABEL_KINDS = ("probabilities", "logits")

MESSAGE_ID_BYTES = 16
MAX_TEACHER_VERSION_BYTES = 64
MAX_SAMPLE_ID_BYTES = 255
MAX_INPUT_RANK = 4
MAX_TEMPERATURE = 100.0

# Every InvalidUpdate.reason this module raises, so counters can start at zero.
REJECTION_REASONS = (
    "too_large",
    "truncated",
    "bad_magic",
    "unsupported_version",
    "malformed",
    "shape_mismatch",
    "non_finite",
    "negative_probability",
    "unnormalised",
    "bad_hard_label",
    "bad_temperature",
    "duplicate_sample_id",
)

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
# flags, message id, teacher round, timestamp, sample count, input rank
_HEADER_PREFIX = struct.Struct("<B16sIdIB")
# class count, temperature (0 when the temperature flag is clear)
_CLASSES_AND_TEMPERATURE = struct.Struct("<Hf")

_FLOAT32 = np.dtype("<f4")
_INT32 = np.dtype("<i4")
_UINT16 = np.dtype("<u2")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_ITEM_BYTES = 4  # float32 inputs and labels, int32 hard labels

_FORBIDDEN_TOPIC_CHARS = {"/", "+", "#", "\x00"}

DECODER_VARIABLE = "DSLO_PAYLOAD_DECODER"
# Offsets of the flags byte and of the sample count (docs/protocol.md).
_FLAGS_OFFSET = 5
_SAMPLE_COUNT_OFFSET = 34
_U32 = struct.Struct("<I")


_decoder = load_extension("_payload_decoder", DECODER_VARIABLE, "python")


def decoder_name() -> str:
    """Return ``compiled`` when the compiled decoder is built and enabled.

    Else ``python``: the install found no C compiler, or the environment sets
    ``DSLO_PAYLOAD_DECODER=python``.
    """
    return "python" if _decoder is None else "compiled"


# --- Topics -----------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """MQTT topic names for one device.

    ``updates`` carries soft-label updates from hub to device. ``status`` carries
    the retained ``online`` / ``offline`` presence string, and ``metrics`` carries
    the device's JSON metrics.
    """

    updates: str
    status: str
    metrics: str

    @classmethod
    def for_device(cls, device_id: str, prefix: str = "dslo") -> Topics:
        """Build the topics ``<prefix>/<device_id>/{updates,status,metrics}``.

        Raises:
            ConfigError: if ``device_id`` or ``prefix`` is empty, contains
                ``/``, ``+``, ``#``, whitespace or NUL, is not UTF-8 text, or
                is longer than ``MAX_TOPIC_LEVEL_BYTES`` bytes of UTF-8.
        """
        _check_topic_level("device id", device_id, example="kitchen-cam")
        _check_topic_level("topic prefix", prefix, example="dslo")
        base = f"{prefix}/{device_id}"
        return cls(
            updates=f"{base}/updates",
            status=f"{base}/status",
            metrics=f"{base}/metrics",
        )


TOPIC_LEVEL_EXPECTED = "a non-empty name without '/', '+', '#', whitespace or NUL"


def is_topic_level(value: str) -> bool:
    """Return whether ``value`` can be one level of an MQTT topic name."""
    return bool(value) and not any(
        char in _FORBIDDEN_TOPIC_CHARS or char.isspace() for char in value
    )


# An MQTT topic name is at most 65,535 bytes of UTF-8. A device topic has two
# of these levels and at most 13 more bytes, as in <prefix>/<device>/predictions.
MAX_TOPIC_LEVEL_BYTES = 32_000


def _check_topic_level(name: str, value: str, example: str) -> None:
    if not is_topic_level(value):
        raise ConfigError(
            f"{name} {value!r} is invalid: expected {TOPIC_LEVEL_EXPECTED}, "
            f"for example {example!r}"
        )
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        # A command-line argument of bytes that are not UTF-8 arrives as
        # surrogates, which paho cannot encode into a topic.
        raise ConfigError(
            f"{name} {value!r} is invalid: it is not UTF-8 text; give it in "
            f"UTF-8, for example {example!r}"
        ) from None
    if size > MAX_TOPIC_LEVEL_BYTES:
        raise ConfigError(
            f"{name} {value[:40]!r}... is invalid: it is {size} bytes of UTF-8, "
            f"expected at most {MAX_TOPIC_LEVEL_BYTES}, for example {example!r}"
        )


# --- Update -----------------------------------------------------------------


def new_message_id() -> bytes:
    """Return a random 16-byte message id (a UUID4)."""
    return uuid.uuid4().bytes


@dataclass(eq=False)
class SoftLabelUpdate:
    """A batch of inputs with teacher labels, as sent from hub to device.

    Equality is identity because the fields include numpy arrays.
    """

    message_id: bytes  # 16 bytes
    teacher_version: str  # at most 64 bytes of UTF-8
    teacher_round: int  # 0 .. 2**32 - 1
    timestamp: float  # Unix seconds at publish time
    sample_ids: list[str]  # one per sample, each at most 255 bytes of UTF-8
    inputs: np.ndarray  # float32, shape (N, *input_shape)
    labels: np.ndarray  # float32, shape (N, K)
    label_kind: str  # "probabilities" or "logits"
    hard_labels: np.ndarray | None = None  # int32, shape (N,), -1 = no hard label
    temperature: float | None = None  # softmax temperature, None = device default
    # Encode only the k largest probabilities per row (format version 2).
    # A decoded top-k update has labels expanded to (N, K) and keeps k here.
    top_k: int | None = None
    # "float16" halves the input bytes on the wire (format version 2); the
    # device always trains on float32.
    input_dtype: str = "float32"
    # Largest input magnitude, set by the compiled decoder while it converts
    # the inputs, so admission need not scan them again. None when unknown.
    # It is stale if code changes ``inputs`` after decoding.
    input_peak: float | None = field(default=None, repr=False)

    @property
    def message_id_hex(self) -> str:
        """Message id as 32 lowercase hex digits."""
        return self.message_id.hex()

    @property
    def sample_count(self) -> int:
        """Number of samples N in the batch."""
        return len(self.sample_ids)


@dataclass(frozen=True)
class PayloadLimits:
    """Upper bounds that ``decode_update`` enforces on untrusted payloads."""

    max_payload_bytes: int = 4 * 1024 * 1024
    max_samples: int = 4096

    def __post_init__(self) -> None:
        if self.max_payload_bytes < 1 or self.max_samples < 1:
            raise ValueError(
                f"payload limits must be positive, got max_payload_bytes="
                f"{self.max_payload_bytes} and max_samples={self.max_samples}"
            )


@dataclass(frozen=True)
class ModelSpec:
    """Input shape and class count of the student model."""

    input_shape: tuple[int, ...]  # per sample, without the batch dimension
    class_count: int


# --- Encoding ---------------------------------------------------------------


def encode_update(update: SoftLabelUpdate) -> bytes:
    """Serialise an update to the binary payload.

    Inputs and labels are written as float32 and hard labels as int32, so arrays
    of other numeric dtypes are converted. With ``update.top_k`` set the
    payload is format version 2 with top-k labels, else version 1.

    Raises:
        ValueError: if a field does not fit the format or the array shapes
            disagree with each other or with ``sample_ids``.
    """
    inputs, labels, hard_labels = _checked_arrays(update)
    version_bytes = _checked_header_fields(update)
    id_bytes = [_encode_sample_id(sample_id) for sample_id in update.sample_ids]

    flags = 0
    if update.label_kind == "logits":
        flags |= FLAG_LOGITS
    if hard_labels is not None:
        flags |= FLAG_HARD_LABELS
    if update.temperature is not None:
        flags |= FLAG_TEMPERATURE
    top_k = _checked_top_k(update, labels.shape[1])
    if top_k is not None:
        flags |= FLAG_TOP_K
    inputs = _wire_inputs(inputs, update.input_dtype)
    if update.input_dtype == "float16":
        flags |= FLAG_FLOAT16_INPUTS
    extended = top_k is not None or update.input_dtype == "float16"
    input_shape = inputs.shape[1:]

    parts = [
        MAGIC,
        _U8.pack(FORMAT_VERSION_TOP_K if extended else FORMAT_VERSION),
        _HEADER_PREFIX.pack(
            flags,
            update.message_id,
            update.teacher_round,
            float(update.timestamp),
            inputs.shape[0],
            len(input_shape),
        ),
        struct.pack(f"<{len(input_shape)}I", *input_shape),
        _CLASSES_AND_TEMPERATURE.pack(
            labels.shape[1],
            0.0 if update.temperature is None else float(update.temperature),
        ),
        b"" if top_k is None else _U16.pack(top_k),
        _U8.pack(len(version_bytes)),
        version_bytes,
    ]
    for encoded in id_bytes:
        parts.append(_U8.pack(len(encoded)))
        parts.append(encoded)
    parts.append(inputs.tobytes())
    if top_k is None:
        parts.append(labels.tobytes())
    else:
        parts.extend(part.tobytes() for part in compress_top_k(labels, top_k))
    if hard_labels is not None:
        parts.append(hard_labels.tobytes())
    return b"".join(parts)


def _wire_inputs(inputs: np.ndarray, input_dtype: str) -> np.ndarray:
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(
            f"input_dtype is {input_dtype!r}, expected one of {INPUT_DTYPES}"
        )
    if input_dtype == "float32":
        return inputs
    largest = float(np.max(np.abs(inputs))) if inputs.size else 0.0
    if largest > float(np.finfo(np.float16).max):
        raise ValueError(
            f"an input has magnitude {largest:.3g}, beyond float16's 65504; "
            "send float32 inputs"
        )
    return inputs.astype("<f2")


def _checked_top_k(update: SoftLabelUpdate, class_count: int) -> int | None:
    top_k = update.top_k
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k is {top_k!r}, expected an integer or None")
    if not 1 <= top_k < class_count:
        raise ValueError(
            f"top_k is {top_k}, expected 1 to {class_count - 1} for "
            f"{class_count} classes; send full labels with top_k=None"
        )
    if update.label_kind != "probabilities":
        raise ValueError(
            "top_k needs probability labels, got logits; convert them with "
            "softmax(logits / T) at the hub first"
        )
    return top_k


def compress_top_k(
    labels: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the top-k part of a version 2 payload for probabilities (N, K).

    Returns:
        Class indices as little-endian uint16 (N, k), largest probability
        first; their probabilities as float32 (N, k); and the remaining mass
        per row as float32 (N,), ``row sum - top-k sum`` clipped at 0, so an
        expanded row has the same sum as the original.
    """
    rows = np.asarray(labels, dtype=np.float32)
    largest = np.argpartition(-rows, top_k - 1, axis=1)[:, :top_k]
    picked = np.take_along_axis(rows, largest, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    indices = np.take_along_axis(largest, order, axis=1)
    values = np.take_along_axis(picked, order, axis=1)
    remaining = rows.sum(axis=1, dtype=np.float64) - values.sum(
        axis=1, dtype=np.float64
    )
    return (
        np.ascontiguousarray(indices, dtype=_UINT16),
        np.ascontiguousarray(values, dtype=_FLOAT32),
        np.maximum(remaining, 0.0).astype(_FLOAT32),
    )


def expand_top_k(
    indices: np.ndarray, values: np.ndarray, remaining: np.ndarray, class_count: int
) -> np.ndarray:
    """Rebuild (N, K) probabilities from top-k indices, values and remaining mass.

    The remaining mass is spread evenly over the K - k classes that are not
    listed, which is the maximum-entropy completion of the row.
    """
    count, top_k = indices.shape
    share = (remaining / (class_count - top_k)).astype(np.float32)
    labels = np.repeat(share[:, None], class_count, axis=1)
    np.put_along_axis(labels, indices.astype(np.intp), values, axis=1)
    return labels


def _checked_arrays(
    update: SoftLabelUpdate,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return inputs, labels and hard labels in payload dtypes after shape checks."""
    inputs = _as_numeric("inputs", update.inputs, _FLOAT32)
    labels = _as_numeric("labels", update.labels, _FLOAT32)
    if not 2 <= inputs.ndim <= MAX_INPUT_RANK + 1 or 0 in inputs.shape:
        raise ValueError(
            f"inputs has shape {inputs.shape}, expected (N, *input_shape) with 1 to "
            f"{MAX_INPUT_RANK} per-sample dimensions, all non-zero"
        )
    sample_count = inputs.shape[0]
    if max(inputs.shape) > 0xFFFFFFFF:
        raise ValueError(f"inputs shape {inputs.shape} has a dimension above 2**32-1")
    if len(update.sample_ids) != sample_count:
        raise ValueError(
            f"update has {len(update.sample_ids)} sample ids but inputs has "
            f"{sample_count} samples, expected one id per sample"
        )
    if labels.ndim != 2 or labels.shape[0] != sample_count:
        raise ValueError(
            f"labels has shape {labels.shape}, expected ({sample_count}, K) to match "
            f"the {sample_count} input samples"
        )
    if not 2 <= labels.shape[1] <= 0xFFFF:
        raise ValueError(
            f"labels has {labels.shape[1]} classes, expected 2 to 65535 classes"
        )
    hard_labels = None
    if update.hard_labels is not None:
        hard_labels = _checked_hard_labels(update.hard_labels, sample_count)
    return inputs, labels, hard_labels


def _as_numeric(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise ValueError(
            f"{name} has dtype {array.dtype}, expected a real numeric dtype"
        )
    return np.ascontiguousarray(array, dtype=dtype)


def _checked_hard_labels(hard_labels: np.ndarray, sample_count: int) -> np.ndarray:
    hard_labels = np.asarray(hard_labels)
    if hard_labels.dtype.kind not in "iu":
        raise ValueError(
            f"hard_labels has dtype {hard_labels.dtype}, expected an integer dtype"
        )
    if hard_labels.shape != (sample_count,):
        raise ValueError(
            f"hard_labels has shape {hard_labels.shape}, expected ({sample_count},)"
        )
    info = np.iinfo(np.int32)
    if hard_labels.min() < info.min or hard_labels.max() > info.max:
        raise ValueError("hard_labels has values outside the int32 range")
    return np.ascontiguousarray(hard_labels, dtype=_INT32)


def _checked_header_fields(update: SoftLabelUpdate) -> bytes:
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
    if update.label_kind not in LABEL_KINDS:
        raise ValueError(
            f"label_kind is {update.label_kind!r}, expected one of {LABEL_KINDS}"
        )
    temperature = update.temperature
    # struct raises OverflowError for finite values beyond float32. NaN and
    # infinity pass here and are rejected by validate_update on the device.
    if (
        temperature is not None
        and math.isfinite(temperature)
        and abs(temperature) > _FLOAT32_MAX
    ):
        raise ValueError(
            f"temperature is {temperature:g}, expected a value that fits in float32"
        )
    version_bytes = update.teacher_version.encode("utf-8")
    if len(version_bytes) > MAX_TEACHER_VERSION_BYTES:
        raise ValueError(
            f"teacher_version {update.teacher_version!r} is {len(version_bytes)} "
            f"bytes of UTF-8, expected at most {MAX_TEACHER_VERSION_BYTES}"
        )
    return version_bytes


def _encode_sample_id(sample_id: str) -> bytes:
    encoded = sample_id.encode("utf-8")
    if len(encoded) > MAX_SAMPLE_ID_BYTES:
        raise ValueError(
            f"sample id {sample_id[:40]!r}... is {len(encoded)} bytes of UTF-8, "
            f"expected at most {MAX_SAMPLE_ID_BYTES}"
        )
    return encoded


# --- Decoding ---------------------------------------------------------------


class _PayloadReader:
    """Cursor over an untrusted payload that raises InvalidUpdate on any overrun."""

    def __init__(self, payload: bytes) -> None:
        self.view = memoryview(payload)
        self.offset = 0
        self.message_id: str | None = None

    @property
    def remaining(self) -> int:
        return len(self.view) - self.offset

    def error(self, reason: str, detail: str) -> InvalidUpdate:
        return InvalidUpdate(reason, detail, self.message_id)

    def require(self, size: int, field: str) -> None:
        if size > self.remaining:
            raise self.error(
                "truncated",
                f"payload is {len(self.view)} bytes but reading the {field} at "
                f"offset {self.offset} requires {size} more bytes. The payload was "
                "cut short or its header declares wrong sizes",
            )

    def take(self, size: int, field: str) -> memoryview:
        self.require(size, field)
        chunk = self.view[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, layout: struct.Struct, field: str) -> tuple:
        return layout.unpack(self.take(layout.size, field))

    def text(self, size: int, field: str) -> str:
        raw = self.take(size, field)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(
                "malformed", f"{field} is not valid UTF-8: {exc}"
            ) from None

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Copy the next items into a native-endian array that owns its memory."""
        # The caller has checked the total length, so this never reads past the end.
        count = math.prod(shape)
        raw = np.frombuffer(self.view, dtype=dtype, count=count, offset=self.offset)
        self.offset += count * dtype.itemsize
        return raw.reshape(shape).astype(dtype.newbyteorder("="))


def decode_update(
    payload: bytes, limits: PayloadLimits = PayloadLimits()
) -> SoftLabelUpdate:
    """Parse a version 1 or 2 payload into a SoftLabelUpdate.

    Top-k labels (version 2) are expanded to (N, K) by ``expand_top_k``, so
    the rest of the device receives full rows.

    The payload is untrusted. The size limit is checked before any parsing,
    and array lengths declared in the header are compared with the real
    payload length before any array is allocated. The returned arrays own
    their memory.

    Raises:
        InvalidUpdate: with reason ``too_large``, ``truncated``, ``bad_magic``,
            ``unsupported_version`` or ``malformed``. No other exception is
            raised for any ``bytes`` input.
    """
    if len(payload) > limits.max_payload_bytes:
        raise InvalidUpdate(
            "too_large",
            f"payload is {len(payload)} bytes, the limit is "
            f"{limits.max_payload_bytes}. The hub should send smaller batches",
        )
    reader = _PayloadReader(payload)
    version = _read_magic_and_version(reader)

    flags, message_id, teacher_round, timestamp, sample_count, rank = reader.unpack(
        _HEADER_PREFIX, "header"
    )
    reader.message_id = message_id.hex()
    _check_flags(reader, flags, version)
    _check_sample_count(reader, sample_count, limits)
    input_shape = _read_input_shape(reader, rank)
    class_count, temperature = _read_class_count_and_temperature(reader, flags)
    top_k = _read_top_k(reader, flags, class_count)
    teacher_version = _read_teacher_version(reader)

    has_hard_labels = bool(flags & FLAG_HARD_LABELS)
    float16_inputs = bool(flags & FLAG_FLOAT16_INPUTS)
    input_count = sample_count * math.prod(input_shape)
    if top_k is None:
        label_bytes = _ITEM_BYTES * sample_count * class_count
    else:
        # uint16 index and float32 value per kept class, float32 remaining mass.
        label_bytes = sample_count * (6 * top_k + 4)
    input_bytes = (2 if float16_inputs else _ITEM_BYTES) * input_count
    array_bytes = (
        input_bytes
        + _ITEM_BYTES * (sample_count if has_hard_labels else 0)
        + label_bytes
    )
    # Each sample id takes at least its length byte, so this bound catches a huge
    # declared size before the id loop or any allocation.
    reader.require(sample_count + array_bytes, "sample ids and arrays")
    sample_ids = _read_sample_ids(reader, sample_count)
    _check_exact_length(reader, array_bytes)

    if float16_inputs:
        half = reader.array((sample_count, *input_shape), np.dtype("<f2"))
        inputs = half.astype(np.float32)
    else:
        inputs = reader.array((sample_count, *input_shape), _FLOAT32)
    if top_k is None:
        labels = reader.array((sample_count, class_count), _FLOAT32)
    else:
        labels = _read_top_k_labels(reader, sample_count, class_count, top_k)
    hard_labels = reader.array((sample_count,), _INT32) if has_hard_labels else None
    return SoftLabelUpdate(
        message_id=message_id,
        teacher_version=teacher_version,
        teacher_round=teacher_round,
        timestamp=timestamp,
        sample_ids=sample_ids,
        inputs=inputs,
        labels=labels,
        label_kind="logits" if flags & FLAG_LOGITS else "probabilities",
        hard_labels=hard_labels,
        temperature=temperature,
        top_k=top_k,
        input_dtype="float16" if float16_inputs else "float32",
    )


def _read_magic_and_version(reader: _PayloadReader) -> int:
    head = bytes(reader.view[: len(MAGIC)])
    if not MAGIC.startswith(head):
        raise reader.error(
            "bad_magic",
            f"payload starts with {head!r}, expected {MAGIC!r}. The sender is not "
            "a dslo-edge hub or the topic is shared with another publisher",
        )
    reader.take(len(MAGIC), "magic")
    version = reader.unpack(_U8, "format version")[0]
    if version not in SUPPORTED_VERSIONS:
        raise reader.error(
            "unsupported_version",
            f"payload format version is {version}, this device reads versions "
            f"{FORMAT_VERSION} and {FORMAT_VERSION_TOP_K}. Update dslo-edge on the "
            f"device or make the hub send version {FORMAT_VERSION}",
        )
    return int(version)


def _check_flags(reader: _PayloadReader, flags: int, version: int) -> None:
    known = _KNOWN_FLAGS[version]
    if flags & ~known:
        raise reader.error(
            "malformed",
            f"flags byte is {flags:#04x}, expected only bits 0 to "
            f"{known.bit_length() - 1} (mask {known:#04x}) in format version "
            f"{version}",
        )
    if flags & FLAG_TOP_K and flags & FLAG_LOGITS:
        raise reader.error(
            "malformed",
            "flags set both top-k and logits, expected top-k labels to be "
            "probabilities",
        )


def _check_sample_count(
    reader: _PayloadReader, sample_count: int, limits: PayloadLimits
) -> None:
    if sample_count == 0:
        raise reader.error("malformed", "sample count is 0, expected at least 1")
    if sample_count > limits.max_samples:
        raise reader.error(
            "malformed",
            f"sample count is {sample_count}, the limit is {limits.max_samples}. "
            "The hub should split the batch into smaller updates",
        )


def _read_input_shape(reader: _PayloadReader, rank: int) -> tuple[int, ...]:
    if not 1 <= rank <= MAX_INPUT_RANK:
        raise reader.error(
            "malformed", f"input rank is {rank}, expected 1 to {MAX_INPUT_RANK}"
        )
    dims = struct.unpack(f"<{rank}I", reader.take(4 * rank, "input dimensions"))
    if 0 in dims:
        raise reader.error(
            "malformed", f"input shape {dims} has a zero dimension, expected all >= 1"
        )
    return dims


def _read_class_count_and_temperature(
    reader: _PayloadReader, flags: int
) -> tuple[int, float | None]:
    class_count, temperature = reader.unpack(
        _CLASSES_AND_TEMPERATURE, "class count and temperature"
    )
    if class_count < 2:
        raise reader.error(
            "malformed", f"class count is {class_count}, expected at least 2"
        )
    if flags & FLAG_TEMPERATURE:
        return class_count, temperature
    if temperature != 0.0:
        raise reader.error(
            "malformed",
            f"temperature field is {temperature} but the temperature flag is not "
            "set, expected 0",
        )
    return class_count, None


def _read_top_k(reader: _PayloadReader, flags: int, class_count: int) -> int | None:
    if not flags & FLAG_TOP_K:
        return None
    top_k = reader.unpack(_U16, "top-k count")[0]
    if not 1 <= top_k < class_count:
        raise reader.error(
            "malformed",
            f"top-k count is {top_k}, expected 1 to {class_count - 1} for "
            f"{class_count} classes",
        )
    return int(top_k)


def _read_top_k_labels(
    reader: _PayloadReader, sample_count: int, class_count: int, top_k: int
) -> np.ndarray:
    indices = reader.array((sample_count, top_k), _UINT16)
    values = reader.array((sample_count, top_k), _FLOAT32)
    remaining = reader.array((sample_count,), _FLOAT32)
    if int(indices.max()) >= class_count:
        raise reader.error(
            "malformed",
            f"top-k class index {int(indices.max())} is out of range, expected "
            f"0 to {class_count - 1}",
        )
    ordered = np.sort(indices, axis=1)
    if top_k > 1 and (ordered[:, 1:] == ordered[:, :-1]).any():
        raise reader.error(
            "malformed", "a top-k row lists one class twice, expected distinct classes"
        )
    return expand_top_k(indices, values, remaining, class_count)


def _read_teacher_version(reader: _PayloadReader) -> str:
    length = reader.unpack(_U8, "teacher version length")[0]
    if length > MAX_TEACHER_VERSION_BYTES:
        raise reader.error(
            "malformed",
            f"teacher version length is {length} bytes, expected at most "
            f"{MAX_TEACHER_VERSION_BYTES}",
        )
    return reader.text(length, "teacher version")


def _read_sample_ids(reader: _PayloadReader, sample_count: int) -> list[str]:
    """Read ``sample_count`` ids; the caller has checked one byte per id."""
    sample_ids = _read_ascii_sample_ids(reader, sample_count)
    if sample_ids is None:
        sample_ids = _read_sample_ids_checked(reader, sample_count)
    return sample_ids


def _read_ascii_sample_ids(
    reader: _PayloadReader, sample_count: int
) -> list[str] | None:
    """Return the ids of a well-formed ASCII id block, else None.

    Slicing one decoded string is faster than decoding each id, and exact
    because each ASCII character is one byte. On None nothing has been read,
    so the checked reader can then name the fault.
    """
    start = reader.offset
    block = bytes(reader.view[start : start + sample_count * (1 + MAX_SAMPLE_ID_BYTES)])
    end = len(block)
    bounds = []
    offset = 0
    for _ in range(sample_count):
        if offset >= end:
            return None
        first = offset + 1
        offset = first + block[offset]
        bounds.append((first, offset))
    if offset > end:
        return None
    ids_block = block[:offset]
    if not ids_block.isascii():
        return None
    text = ids_block.decode("ascii")
    reader.offset = start + offset
    return [text[first:last] for first, last in bounds]


def _read_sample_ids_checked(reader: _PayloadReader, sample_count: int) -> list[str]:
    # One pass over the id block without per-id method calls or field names.
    # The caller has checked that the payload contains at least one length
    # byte per id.
    view = reader.view
    end = len(view)
    offset = reader.offset
    sample_ids = []
    for index in range(sample_count):
        if offset >= end:
            reader.offset = offset
            reader.take(1, f"length of sample id {index}")
        start = offset + 1
        offset = start + view[offset]
        if offset > end:
            reader.offset = start
            reader.take(offset - start, f"sample id {index}")
        try:
            sample_ids.append(str(view[start:offset], "utf-8"))
        except UnicodeDecodeError as exc:
            raise reader.error(
                "malformed", f"sample id {index} is not valid UTF-8: {exc}"
            ) from None
    reader.offset = offset
    return sample_ids


def _check_exact_length(reader: _PayloadReader, array_bytes: int) -> None:
    reader.require(array_bytes, "input, label and hard label arrays")
    extra = reader.remaining - array_bytes
    if extra:
        raise reader.error(
            "malformed",
            f"payload has {extra} trailing byte(s) after the last array, expected "
            "none. The header declares sizes that do not match the payload",
        )


# --- Decoding and validation in one call ---------------------------------------


def decode_checked(
    payload: bytes,
    spec: ModelSpec,
    limits: PayloadLimits = PayloadLimits(),
    *,
    sum_tolerance: float = 1e-3,
) -> SoftLabelUpdate:
    """Decode a payload and check it against the model.

    Gives the result of ``decode_update`` followed by ``validate_update``,
    and raises the same errors.

    Raises:
        InvalidUpdate: as those two functions raise it.
    """
    update = _decode_compiled(payload, spec, limits, sum_tolerance)
    if update is None:
        update = decode_update(payload, limits)
        validate_update(update, spec, sum_tolerance=sum_tolerance)
    return update


def _decode_compiled(
    payload: bytes, spec: ModelSpec, limits: PayloadLimits, sum_tolerance: float
) -> SoftLabelUpdate | None:
    """Return the update that the compiled decoder read and checked, or None."""
    if _decoder is None or len(payload) < _SAMPLE_COUNT_OFFSET + 4:
        return None
    count = _U32.unpack_from(payload, _SAMPLE_COUNT_OFFSET)[0]
    input_size = math.prod(spec.input_shape)
    # The arrays are allocated before the decoder reads the payload, so a
    # header that declares more samples than the payload can carry stops here.
    smallest_sample = 1 + 2 * input_size + _ITEM_BYTES * spec.class_count
    if not 0 < count <= limits.max_samples or count * smallest_sample > len(payload):
        return None

    inputs = np.empty((count, *spec.input_shape), dtype=np.float32)
    labels = np.empty((count, spec.class_count), dtype=np.float32)
    has_hard_labels = payload[_FLAGS_OFFSET] & FLAG_HARD_LABELS
    hard_labels = np.empty(count, dtype=np.int32) if has_hard_labels else None
    fields = _decoder.decode(
        payload,
        limits.max_payload_bytes,
        limits.max_samples,
        tuple(spec.input_shape),
        spec.class_count,
        sum_tolerance,
        inputs,
        labels,
        hard_labels,
    )
    if fields is None:
        return None

    (
        flags,
        message_id,
        teacher_round,
        timestamp,
        version,
        sample_ids,
        temperature,
        input_peak,
    ) = fields
    if len(set(sample_ids)) != count:
        return None
    return SoftLabelUpdate(
        message_id=message_id,
        teacher_version=version,
        teacher_round=teacher_round,
        timestamp=timestamp,
        sample_ids=sample_ids,
        inputs=inputs,
        labels=labels,
        label_kind="logits" if flags & FLAG_LOGITS else "probabilities",
        hard_labels=hard_labels,
        temperature=temperature,
        input_dtype="float16" if flags & FLAG_FLOAT16_INPUTS else "float32",
        input_peak=input_peak,
    )


# --- Validation against the model --------------------------------------------


def validate_update(
    update: SoftLabelUpdate, spec: ModelSpec, *, sum_tolerance: float = 1e-3
) -> None:
    """Check a decoded update against the student model before training on it.

    Probability rows must be non-negative and sum to 1 within ``sum_tolerance``.
    Logit rows are only checked for finite values.

    Raises:
        InvalidUpdate: with reason ``shape_mismatch``, ``non_finite``,
            ``bad_temperature``, ``negative_probability``, ``unnormalised``,
            ``bad_hard_label`` or ``duplicate_sample_id``, checked in that order,
            and the first failure is raised. The reason is ``malformed`` for a
            hand-built update without samples or with an unknown ``label_kind``.
    """
    _check_input_shape(update, spec.input_shape)
    _check_label_shape(update, spec.class_count)
    _check_rows(update, with_labels=True)
    _check_finite(update, "inputs", update.inputs)
    _check_label_values(update, spec.class_count, sum_tolerance)
    _check_unique_ids(update)


def validate_inputs(update: SoftLabelUpdate, input_shape: tuple[int, ...]) -> None:
    """Check an update's sample ids and inputs, but not its labels.

    A multi-head update checks these once for all its heads, and each head's
    labels with ``validate_labels``.

    Raises:
        InvalidUpdate: ``malformed`` for an update without samples,
            ``shape_mismatch``, ``non_finite`` or ``duplicate_sample_id``.
    """
    _check_input_shape(update, input_shape)
    _check_rows(update, with_labels=False)
    _check_finite(update, "inputs", update.inputs)
    _check_unique_ids(update)


def validate_labels(
    update: SoftLabelUpdate, class_count: int, *, sum_tolerance: float = 1e-3
) -> None:
    """Check an update's labels, temperature and hard labels, but not its inputs.

    Raises:
        InvalidUpdate: with the reasons of ``validate_update`` other than
            ``duplicate_sample_id``, for the labels only.
    """
    _check_label_shape(update, class_count)
    _check_rows(update, with_labels=True)
    _check_label_values(update, class_count, sum_tolerance)


def _check_label_values(
    update: SoftLabelUpdate, class_count: int, sum_tolerance: float
) -> None:
    _check_finite(update, "labels", update.labels)
    if update.temperature is not None and not math.isfinite(update.temperature):
        raise _rejection(
            update,
            "non_finite",
            f"temperature is {update.temperature}, expected a finite value",
        )
    if update.temperature is not None:
        _check_temperature(update.temperature, update.message_id_hex)
    if update.label_kind == "probabilities":
        _check_probabilities(update, sum_tolerance)
    elif update.label_kind != "logits":
        raise _rejection(
            update,
            "malformed",
            f"label kind is {update.label_kind!r}, expected one of {LABEL_KINDS}",
        )
    if update.hard_labels is not None:
        _check_hard_labels(update, update.hard_labels, class_count)


def _rejection(update: SoftLabelUpdate, reason: str, detail: str) -> InvalidUpdate:
    return InvalidUpdate(reason, detail, update.message_id_hex)


def _check_input_shape(update: SoftLabelUpdate, input_shape: tuple[int, ...]) -> None:
    if update.sample_count == 0:
        raise _rejection(update, "malformed", "update has no samples, expected >= 1")
    received_input = tuple(update.inputs.shape[1:])
    if received_input != tuple(input_shape):
        raise _rejection(
            update,
            "shape_mismatch",
            f"per-sample input shape is {received_input}, the model expects "
            f"{tuple(input_shape)}. The hub must send inputs shaped for this "
            "student",
        )


def _check_label_shape(update: SoftLabelUpdate, class_count: int) -> None:
    received_classes = update.labels.shape[-1] if update.labels.ndim else 0
    if update.labels.ndim != 2 or received_classes != class_count:
        raise _rejection(
            update,
            "shape_mismatch",
            f"labels have shape {update.labels.shape}, the model expects "
            f"{class_count} classes. The hub's teacher and this student must "
            "share one class list",
        )


def _check_rows(update: SoftLabelUpdate, *, with_labels: bool) -> None:
    sample_count = update.sample_count
    counts = {"inputs": update.inputs.shape[0]}
    if with_labels:
        counts["labels"] = update.labels.shape[0]
        if update.hard_labels is not None:
            counts["hard labels"] = update.hard_labels.shape[0]
    for name, count in counts.items():
        if count != sample_count:
            raise _rejection(
                update,
                "shape_mismatch",
                f"{name} have {count} rows but there are {sample_count} sample ids, "
                "expected one row per sample id",
            )


def _check_finite(update: SoftLabelUpdate, name: str, array: np.ndarray) -> None:
    # A float64 sum of float32 values cannot overflow, and it is NaN or
    # infinite exactly when some value is: one reduction, no mask array.
    # Adding +inf and -inf warns, and the check below names the row.
    with np.errstate(invalid="ignore"):
        total = array.sum(dtype=np.float64)
    if math.isfinite(total):
        return
    bad_rows = ~np.isfinite(array).reshape(array.shape[0], -1).all(axis=1)
    if bad_rows.any():
        sample_id = update.sample_ids[int(np.argmax(bad_rows))]
        raise _rejection(
            update,
            "non_finite",
            f"{name} for sample {sample_id!r} contain NaN or infinity, "
            "expected finite values",
        )


def _check_temperature(temperature: float, message_id: str | None) -> None:
    if not 0.0 < temperature <= MAX_TEMPERATURE:
        raise InvalidUpdate(
            "bad_temperature",
            f"temperature is {temperature:g}, expected a value in "
            f"(0, {MAX_TEMPERATURE:g}]",
            message_id,
        )


def _check_probabilities(update: SoftLabelUpdate, sum_tolerance: float) -> None:
    labels = update.labels
    if labels.min() < 0:
        row = int(np.argmax((labels < 0).any(axis=1)))
        raise _rejection(
            update,
            "negative_probability",
            f"soft label for sample {update.sample_ids[row]!r} has minimum "
            f"{labels[row].min():.6g}, expected probabilities >= 0. If the hub "
            "sends logits, set the logits flag",
        )
    sums = labels.sum(axis=1, dtype=np.float64)
    deviation = np.abs(sums - 1.0)
    if deviation.max() > sum_tolerance:
        row = int(np.argmax(deviation > sum_tolerance))
        raise _rejection(
            update,
            "unnormalised",
            f"soft label for sample {update.sample_ids[row]!r} sums to "
            f"{sums[row]:.6g}, expected 1 +- {sum_tolerance:g}. If the hub sends "
            "logits, set the logits flag",
        )


def _check_hard_labels(
    update: SoftLabelUpdate, hard_labels: np.ndarray, class_count: int
) -> None:
    if hard_labels.min() >= -1 and hard_labels.max() < class_count:
        return
    bad_rows = (hard_labels < -1) | (hard_labels >= class_count)
    if bad_rows.any():
        row = int(np.argmax(bad_rows))
        raise _rejection(
            update,
            "bad_hard_label",
            f"hard label for sample {update.sample_ids[row]!r} is "
            f"{int(hard_labels[row])}, expected -1 (none) or a class index 0 to "
            f"{class_count - 1}",
        )


def _check_unique_ids(update: SoftLabelUpdate) -> None:
    if len(set(update.sample_ids)) == len(update.sample_ids):
        return
    seen: set[str] = set()
    for sample_id in update.sample_ids:
        if sample_id in seen:
            raise _rejection(
                update,
                "duplicate_sample_id",
                f"sample id {sample_id!r} appears more than once, expected unique "
                "ids within an update",
            )
        seen.add(sample_id)


# --- Label conversion ----------------------------------------------------------


def label_probabilities(
    update: SoftLabelUpdate, default_temperature: float
) -> np.ndarray:
    """Return the update's soft labels as float32 probabilities of shape (N, K).

    Probability labels are returned as a copy. Logits become
    ``softmax(logits / T)`` with ``T = update.temperature`` or, when that is
    None, ``default_temperature``. The row maximum is subtracted before ``exp``
    so large logits do not overflow.

    Raises:
        ValueError: if ``default_temperature`` is not in (0, 100].
        InvalidUpdate: with reason ``bad_temperature`` if the update's own
            temperature is not in (0, 100].
    """
    if not 0.0 < default_temperature <= MAX_TEMPERATURE:
        raise ValueError(
            f"default_temperature is {default_temperature}, expected a value in "
            f"(0, {MAX_TEMPERATURE:g}]"
        )
    if update.label_kind != "logits":
        return np.array(update.labels, dtype=np.float32)
    temperature = default_temperature
    if update.temperature is not None:
        _check_temperature(update.temperature, update.message_id_hex)
        temperature = update.temperature
    scaled = np.asarray(update.labels, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exponentials = np.exp(scaled)
    probabilities = exponentials / exponentials.sum(axis=1, keepdims=True)
    return probabilities.astype(np.float32)
