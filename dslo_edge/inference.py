"""On-device inference for local applications, and label requests from it.

A local application publishes inputs to ``dslo/<device>/infer`` as an
``.npz`` payload (``x`` float32 of shape (N, *input_shape), optional ``ids``)
and receives the student's predictions on ``dslo/<device>/predictions`` as JSON:
``{"ids": [...], "classes": [...], "confidence": [...]}``. A multi-head
student answers ``{"ids": [...], "heads": {<head>: {"classes": [...],
"confidence": [...]}}}``. When label
requests are on, the inputs the student is unsure about are sent to the hub,
and its labels come back as training updates.
"""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from dslo_edge.admission import distinct_figures
from dslo_edge.config import RequestsSettings
from dslo_edge.errors import InvalidUpdate
from dslo_edge.label_requests import LabelRequester, RequestSettings, SelectionSettings
from dslo_edge.metrics import LatencyWindow
from dslo_edge.models import StudentModel, TeacherModel
from dslo_edge.protocol import Topics
from dslo_edge.runtime import is_numeric

logger = logging.getLogger(__name__)

MAX_INPUT_BYTES = 4 * 1024 * 1024
MAX_INPUT_ROWS = 4096
FLOAT32_MAX = float(np.finfo(np.float32).max)


def inference_topics(topics: Topics) -> tuple[str, str]:
    """Return the (inputs, predictions) topics next to the device's others."""
    base = topics.status.rsplit("/", 1)[0]
    return f"{base}/infer", f"{base}/predictions"


def _check_uncompressed(payload: bytes) -> None:
    """Reject compressed members, whose unpacked size the payload does not bound.

    A few hundred kilobytes of deflated zeros unpack to gigabytes, which would
    exhaust a small board's memory; stored members are never larger than the
    payload.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise InvalidUpdate(
            "bad_inputs", f"expected an .npz archive: {error}"
        ) from error
    with archive:
        for member in archive.infolist():
            if member.compress_type != zipfile.ZIP_STORED or member.file_size > len(
                payload
            ):
                raise InvalidUpdate(
                    "bad_inputs",
                    f"member {member.filename} is compressed; send np.savez, not "
                    "np.savez_compressed",
                )
        _check_declared_sizes(archive)


def _check_declared_sizes(archive: zipfile.ZipFile) -> None:
    """Reject an .npy member whose header declares more data than it holds.

    numpy allocates the array that the header declares before it reads the
    data, so a 300-byte member that declares terabytes raises MemoryError, and
    one that declares gigabytes can exhaust a small board's memory.
    """
    for member in archive.infolist():
        if not member.filename.endswith(".npy"):
            continue
        try:
            with archive.open(member) as stream:
                declared = _declared_npy_bytes(stream, member.filename)
                data_bytes = member.file_size - stream.tell()
        except (zipfile.BadZipFile, OSError) as error:
            # For example a local header that names another file.
            raise InvalidUpdate(
                "bad_inputs", f"expected an .npz archive: {error}"
            ) from error
        if declared > data_bytes:
            raise InvalidUpdate(
                "bad_inputs",
                f"member {member.filename} declares {declared} bytes of data but "
                f"holds {data_bytes} bytes; write the archive with np.savez",
            )


def _declared_npy_bytes(stream: Any, name: str) -> int:
    """Return the data size that an .npy header declares (shape times item size)."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(stream)
        else:
            header = np.lib.format.read_array_header_2_0(stream)
    except ValueError as error:
        raise InvalidUpdate(
            "bad_inputs", f"member {name} has an invalid .npy header: {error}"
        ) from error
    shape, _, dtype = header
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


def decode_inputs(
    payload: bytes, input_shape: tuple[int, ...]
) -> tuple[list[str], np.ndarray]:
    """Read an inference payload.

    Raises:
        InvalidUpdate: reason ``bad_inputs`` for an oversized, unreadable,
            non-numeric or wrongly shaped payload.
    """
    if len(payload) > MAX_INPUT_BYTES:
        raise InvalidUpdate(
            "bad_inputs", f"{len(payload)} bytes, limit {MAX_INPUT_BYTES}"
        )
    _check_uncompressed(payload)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            raw_x = data["x"]
            raw_ids = data["ids"] if "ids" in data.files else None
    except (OSError, KeyError, ValueError, EOFError) as error:
        raise InvalidUpdate(
            "bad_inputs", f"expected an .npz with x (and ids): {error}"
        ) from error
    x = _checked_inputs(raw_x, input_shape)
    if raw_ids is None:
        stamp = time.time_ns()
        return [f"i{stamp}-{i}" for i in range(len(x))], x
    if raw_ids.shape != (len(x),):
        raise InvalidUpdate(
            "bad_inputs", f"ids has shape {raw_ids.shape}, expected ({len(x)},)"
        )
    return [str(i) for i in raw_ids], x


def _checked_inputs(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """Return ``x`` as float32 after checking its dtype, shape and values."""
    if not is_numeric(x):
        raise InvalidUpdate(
            "bad_inputs",
            f"x has dtype {x.dtype}, expected a numeric dtype such as float32",
        )
    # The shape check comes first because a scalar x has no length.
    if x.ndim != len(input_shape) + 1 or x.shape[1:] != input_shape:
        expected = ", ".join(str(size) for size in ("N", *input_shape))
        raise InvalidUpdate(
            "bad_inputs", f"x has shape {x.shape}, expected ({expected})"
        )
    if not len(x):
        raise InvalidUpdate(
            "bad_inputs",
            f"x has shape {x.shape}, so no inputs; expected 1 to {MAX_INPUT_ROWS}",
        )
    if len(x) > MAX_INPUT_ROWS:
        raise InvalidUpdate("bad_inputs", f"{len(x)} inputs, limit {MAX_INPUT_ROWS}")
    if not np.all(np.isfinite(x)):
        raise InvalidUpdate("bad_inputs", "x contains NaN or infinity")
    # Checked before the cast, which would turn such values into infinity.
    magnitude = float(np.abs(x).max())
    if magnitude > FLOAT32_MAX:
        raise InvalidUpdate(
            "bad_inputs",
            f"x has magnitude {magnitude:.3g}, above the float32 maximum "
            f"{FLOAT32_MAX:.2g} of the student's inputs; rescale the inputs",
        )
    return x.astype(np.float32)


def _check_range(ids: list[str], x: np.ndarray, max_abs_input: float) -> None:
    """Reject inputs above ``max_abs_input``, as updates are rejected."""
    magnitudes = np.abs(x).reshape(len(x), -1).max(axis=1)
    row = int(np.argmax(magnitudes))
    if magnitudes[row] > max_abs_input:
        magnitude, limit = distinct_figures(float(magnitudes[row]), max_abs_input)
        raise InvalidUpdate(
            "out_of_range",
            f"input {ids[row]!r} has magnitude {magnitude}, above "
            f"limits.max_abs_input = {limit}; raise the limit if the model "
            "expects that",
        )


def _check_finite_output(ids: list[str], x: np.ndarray, rows: np.ndarray) -> None:
    """Reject inputs that overflow the student, rather than publish NaN."""
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise InvalidUpdate(
            "non_finite_output",
            f"the student's probabilities for input {ids[row]!r} are NaN or "
            f"infinite (its largest magnitude is {float(np.abs(x[row]).max()):.3g}); "
            "rescale the inputs or lower limits.max_abs_input",
        )


def encode_inputs(x: np.ndarray, ids: list[str] | None = None) -> bytes:
    """Return an inference payload for ``decode_inputs``."""
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {"x": np.asarray(x, dtype=np.float32)}
    if ids is not None:
        arrays["ids"] = np.asarray(ids)
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def make_requester(
    device_id: str, prefix: str, settings: RequestsSettings
) -> LabelRequester:
    return LabelRequester(
        device_id,
        prefix,
        selection=SelectionSettings(
            rule=settings.rule,
            max_confidence=settings.max_confidence,
            min_disagreement=settings.min_disagreement,
            max_samples=settings.max_samples,
        ),
        settings=RequestSettings(
            timeout_s=settings.timeout_s,
            max_attempts=settings.max_attempts,
            max_pending=settings.max_pending,
        ),
    )


class InferenceService:
    """Handles inference payloads and opens label requests for unsure inputs.

    Args:
        publish: publishes (topic, payload) at QoS 1.
        predictions_topic: where predictions go.
        requester: opens and resends label requests; None turns them off.
        reference: a model whose disagreement with the student also marks a
            sample as unsure (the bundle's teacher); None for confidence only.
        infer_ms: records the latency of each student inference.
        max_abs_input: the largest input magnitude accepted, as for updates
            (``limits.max_abs_input``).
    """

    def __init__(
        self,
        publish: Callable[[str, bytes | str], Any],
        predictions_topic: str,
        requester: LabelRequester | None,
        reference: TeacherModel | None,
        infer_ms: LatencyWindow,
        max_abs_input: float = float("inf"),
    ):
        self.publish = publish
        self.predictions_topic = predictions_topic
        self.requester = requester
        self.reference = reference
        self.infer_ms = infer_ms
        self.max_abs_input = max_abs_input
        # The daemon sets this while its training budget pauses training.
        # Labels requested then would wait in the queue, maybe until they are
        # stale, after the hub has charged the device's privacy budget for them.
        self.requests_paused = False

    def handle(self, payload: bytes, student: StudentModel) -> None:
        """Publish predictions for one payload; raises InvalidUpdate for a bad one."""
        ids, x = decode_inputs(payload, student.bundle.input_shape)
        _check_range(ids, x, self.max_abs_input)
        started = time.perf_counter()
        probabilities = student.infer(x)
        self.infer_ms.add((time.perf_counter() - started) * 1000)
        if isinstance(probabilities, dict):
            # A multi-head student; the daemon allows no label requests for it.
            for rows in probabilities.values():
                _check_finite_output(ids, x, rows)
            self.publish(self.predictions_topic, _head_answers(ids, probabilities))
            return
        _check_finite_output(ids, x, probabilities)
        answer = {
            "ids": ids,
            "classes": np.argmax(probabilities, axis=1).tolist(),
            "confidence": [round(float(c), 6) for c in probabilities.max(axis=1)],
        }
        self.publish(self.predictions_topic, json.dumps(answer, allow_nan=False))
        if self.requester is None or self.requests_paused:
            return
        reference = None
        if self.reference is not None:
            reference = _as_probabilities(self.reference.predict(x), self.reference)
        pending = self.requester.propose(ids, x, probabilities, reference)
        if pending is not None:
            self.publish_request(pending)

    def publish_request(self, pending: Any) -> None:
        assert self.requester is not None
        self.requester.publish(_PublishAdapter(self.publish), pending)

    def resend_due(self) -> None:
        if self.requester is None:
            return
        for pending in self.requester.due():
            self.publish_request(pending)


class _PublishAdapter:
    """Lets ``LabelRequester.publish`` use the daemon's connection."""

    def __init__(self, publish: Callable[..., Any]):
        self._publish = publish

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, properties: Any = None
    ) -> Any:
        return self._publish(topic, payload, properties=properties)


def _head_answers(ids: list[str], probabilities: dict[str, np.ndarray]) -> str:
    """Return the predictions JSON of a multi-head student: classes per head."""
    heads = {
        name: {
            "classes": np.argmax(rows, axis=1).tolist(),
            "confidence": [round(float(c), 6) for c in rows.max(axis=1)],
        }
        for name, rows in probabilities.items()
    }
    return json.dumps({"ids": ids, "heads": heads}, allow_nan=False)


def _as_probabilities(output: np.ndarray, model: TeacherModel) -> np.ndarray:
    if model.output_kind == "probabilities":
        return output
    shifted = output - output.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
