"""Label requests: topics, the request payload and MQTT 5 response properties.

A device publishes the inputs it is unsure about on
``<prefix>/<device_id>/requests``. The MQTT 5 response topic of that message
is the device's ``<prefix>/<device_id>/labels`` topic, and its correlation
data is the 16-byte request id. A hub worker answers on the response topic
with the same correlation data and a ``status`` user property:

- ``ok``: the payload is an ordinary soft-label update (``protocol.py``),
  signed when the device has a key, whose message id is the request id;
- ``rate_limited``: the device asked too often; the ``retry_after_s`` user
  property says when to ask again;
- ``budget_exhausted``: the device's privacy budget is spent;
- ``rejected``: the request was invalid. The payload is a UTF-8 message.

Request payload, format version 1, little-endian, no padding:

====== ======== ======= =====================================================
offset size     type    field
====== ======== ======= =====================================================
0      4        bytes   magic ``DSLQ``
4      1        u8      format version, ``1``
5      1        u8      flags, reserved, must be 0
6      16       bytes   request id
22     8        f64     timestamp, Unix seconds on the device
30     4        u32     sample count ``N``
34     1        u8      input rank ``r``, 1 to 4
35     4·r      u32 × r per-sample input shape
next   N·(1+l)  u8+UTF-8 sample ids, each a length byte then at most 255 bytes
next   4·N·∏    f32     inputs, shape ``(N, *shape)``, C order
====== ======== ======= =====================================================
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dslo_edge.errors import InvalidRequest
from dslo_edge.protocol import Topics

REQUEST_MAGIC = b"DSLQ"
REQUEST_FORMAT_VERSION = 1
REQUEST_ID_BYTES = 16
MAX_INPUT_RANK = 4
MAX_SAMPLE_ID_BYTES = 255

STATUS_OK = "ok"
STATUS_RATE_LIMITED = "rate_limited"
STATUS_BUDGET_EXHAUSTED = "budget_exhausted"
STATUS_REJECTED = "rejected"
RESPONSE_STATUSES = (
    STATUS_OK,
    STATUS_RATE_LIMITED,
    STATUS_BUDGET_EXHAUSTED,
    STATUS_REJECTED,
)
STATUS_PROPERTY = "status"
RETRY_AFTER_PROPERTY = "retry_after_s"

# Hub topics live under this level, so no device may use it as its id.
HUB_LEVEL = "_hub"
WORKER_ONLINE = "online"
WORKER_OFFLINE = "offline"
WORKER_STOPPED = "stopped"

# magic, version, flags, request id, timestamp, sample count, input rank
_HEADER = struct.Struct("<4sBB16sdIB")
_U8 = struct.Struct("<B")
_FLOAT32 = np.dtype("<f4")


@dataclass(frozen=True)
class RequestTopics:
    """The label-request topics of one device."""

    requests: str
    labels: str

    @classmethod
    def for_device(cls, device_id: str, prefix: str = "dslo") -> RequestTopics:
        """Build ``<prefix>/<device_id>/requests`` and ``.../labels``.

        Raises:
            ConfigError: ``device_id`` or ``prefix`` is not one topic level.
        """
        Topics.for_device(device_id, prefix)
        base = f"{prefix}/{device_id}"
        return cls(requests=f"{base}/requests", labels=f"{base}/labels")


def shared_request_filter(prefix: str, group: str) -> str:
    """Return the shared subscription that spreads requests over hub workers."""
    return f"$share/{group}/{prefix}/+/requests"


def device_of_request_topic(topic: str, prefix: str) -> str | None:
    """Return the device id of a request topic, or None for any other topic."""
    levels = topic.split("/")
    if len(levels) != 3 or levels[0] != prefix or levels[2] != "requests":
        return None
    if levels[1] == HUB_LEVEL or not levels[1]:
        return None
    return levels[1]


def teacher_topic(prefix: str) -> str:
    """Return the retained topic that announces the hub's current teacher."""
    return f"{prefix}/{HUB_LEVEL}/teacher"


def worker_status_topic(prefix: str, worker_id: str) -> str:
    """Return the retained presence topic of one hub worker."""
    return f"{prefix}/{HUB_LEVEL}/workers/{worker_id}/status"


def worker_metrics_topic(prefix: str, worker_id: str) -> str:
    """Return the retained metrics topic of one hub worker."""
    return f"{prefix}/{HUB_LEVEL}/workers/{worker_id}/metrics"


@dataclass(eq=False)
class LabelRequest:
    """Inputs a device requests labels for.

    Equality is identity because the fields include a numpy array.
    """

    request_id: bytes  # 16 bytes, also the MQTT 5 correlation data
    timestamp: float  # Unix seconds on the device when first sent
    sample_ids: list[str]
    inputs: np.ndarray  # float32, shape (N, *input_shape)

    @property
    def request_id_hex(self) -> str:
        """Request id as 32 lowercase hex digits."""
        return self.request_id.hex()

    @property
    def sample_count(self) -> int:
        """Number of samples N in the request."""
        return len(self.sample_ids)


def encode_request(request: LabelRequest) -> bytes:
    """Serialise a label request.

    Raises:
        ValueError: a field does not fit the format, or ``sample_ids`` and
            ``inputs`` disagree in length.
    """
    inputs = np.ascontiguousarray(request.inputs, dtype=_FLOAT32)
    if len(request.request_id) != REQUEST_ID_BYTES:
        raise ValueError(f"request id has {len(request.request_id)} bytes, expected 16")
    if not 1 <= inputs.ndim - 1 <= MAX_INPUT_RANK:
        raise ValueError(f"inputs have shape {inputs.shape}, expected rank 2 to 5")
    if inputs.shape[0] != len(request.sample_ids) or inputs.shape[0] == 0:
        raise ValueError(
            f"got {len(request.sample_ids)} sample ids for {inputs.shape[0]} "
            "inputs; expected the same number, at least 1"
        )
    shape = inputs.shape[1:]
    parts = [
        _HEADER.pack(
            REQUEST_MAGIC,
            REQUEST_FORMAT_VERSION,
            0,
            request.request_id,
            float(request.timestamp),
            inputs.shape[0],
            len(shape),
        ),
        struct.pack(f"<{len(shape)}I", *shape),
    ]
    for sample_id in request.sample_ids:
        encoded = sample_id.encode("utf-8")
        if len(encoded) > MAX_SAMPLE_ID_BYTES:
            raise ValueError(f"sample id {sample_id[:40]!r}... exceeds 255 bytes")
        parts += [_U8.pack(len(encoded)), encoded]
    parts.append(inputs.tobytes())
    return b"".join(parts)


def decode_request(
    payload: bytes, max_samples: int, max_payload_bytes: int = 4 * 1024 * 1024
) -> LabelRequest:
    """Parse an untrusted request payload.

    Raises:
        InvalidRequest: with reason ``too_large``, ``truncated``,
            ``bad_magic``, ``unsupported_version``, ``too_many_samples`` or
            ``malformed``.
    """
    if len(payload) > max_payload_bytes:
        raise InvalidRequest(
            "too_large", f"request has {len(payload)} bytes, above {max_payload_bytes}"
        )
    if len(payload) < _HEADER.size:
        raise InvalidRequest("truncated", f"request has only {len(payload)} bytes")
    magic, version, flags, request_id, timestamp, count, rank = _HEADER.unpack_from(
        payload
    )
    if magic != REQUEST_MAGIC:
        raise InvalidRequest("bad_magic", f"request starts with {magic!r}, not DSLQ")
    if version != REQUEST_FORMAT_VERSION:
        raise InvalidRequest(
            "unsupported_version", f"request format version {version}, expected 1"
        )
    if flags:
        raise InvalidRequest("malformed", f"flags byte is {flags}, expected 0")
    if not 1 <= rank <= MAX_INPUT_RANK:
        raise InvalidRequest(
            "malformed", f"input rank is {rank}, expected 1 to {MAX_INPUT_RANK}"
        )
    if not math.isfinite(timestamp):
        raise InvalidRequest(
            "malformed", f"timestamp is {timestamp}, expected finite Unix seconds"
        )
    if not 1 <= count <= max_samples:
        raise InvalidRequest(
            "too_many_samples",
            f"request has {count} samples, expected 1 to {max_samples}; set "
            f"requests.max_samples in the device config to at most {max_samples}, "
            "or raise requests.max_samples in the hub config",
        )
    reader = _Reader(payload, _HEADER.size)
    shape = reader.unpack(f"<{rank}I")
    sample_ids = [reader.text() for _ in range(count)]
    inputs = reader.floats(count, shape)
    if reader.offset != len(payload):
        raise InvalidRequest(
            "malformed", f"{len(payload) - reader.offset} bytes after the inputs"
        )
    return LabelRequest(request_id, timestamp, sample_ids, inputs)


class _Reader:
    """Bounds-checked reads from a request payload."""

    def __init__(self, payload: bytes, offset: int):
        self.payload = payload
        self.offset = offset

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if end > len(self.payload):
            raise InvalidRequest(
                "truncated", f"request ends at byte {len(self.payload)}, needs {end}"
            )
        chunk = self.payload[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, layout: str) -> tuple[int, ...]:
        values = struct.unpack(layout, self.take(struct.calcsize(layout)))
        if any(value == 0 for value in values):
            raise InvalidRequest("malformed", f"input shape {values} has a zero")
        return values

    def text(self) -> str:
        (length,) = _U8.unpack(self.take(1))
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidRequest("malformed", f"sample id: {error}") from error

    def floats(self, count: int, shape: tuple[int, ...]) -> np.ndarray:
        # The size comes from the header, so compare it with the bytes left
        # before allocating anything.
        size = count * math.prod(shape) * _FLOAT32.itemsize
        data = self.take(size)
        return np.frombuffer(data, dtype=_FLOAT32).reshape((count, *shape)).copy()


def request_properties(
    response_topic: str, request_id: bytes, expiry_s: int | None = None
) -> Properties:
    """Return the PUBLISH properties of a request: response topic and id.

    ``expiry_s`` sets the MQTT 5 message expiry, after which the broker
    drops a request that no hub worker has received.
    """
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = response_topic
    properties.CorrelationData = request_id
    if expiry_s is not None:
        properties.MessageExpiryInterval = expiry_s
    return properties


def response_properties(
    request_id: bytes, status: str, retry_after_s: float | None = None
) -> Properties:
    """Return the PUBLISH properties of a response to one request."""
    if status not in RESPONSE_STATUSES:
        raise ValueError(f"unknown response status {status!r}")
    properties = Properties(PacketTypes.PUBLISH)
    properties.CorrelationData = request_id
    user = [(STATUS_PROPERTY, status)]
    if retry_after_s is not None:
        user.append((RETRY_AFTER_PROPERTY, f"{retry_after_s:.3f}"))
    properties.UserProperty = user
    return properties


def user_properties(properties: Properties | None) -> dict[str, str]:
    """Return a message's MQTT 5 user properties as a dict (last one wins)."""
    pairs = getattr(properties, "UserProperty", None) or []
    return {str(key): str(value) for key, value in pairs}


def correlation_of(properties: Properties | None) -> bytes | None:
    """Return a message's correlation data, or None when it has none."""
    value = getattr(properties, "CorrelationData", None)
    return bytes(value) if value is not None else None


def response_topic_of(properties: Properties | None) -> str | None:
    """Return a message's response topic, or None when it has none."""
    value = getattr(properties, "ResponseTopic", None)
    return str(value) if value else None
