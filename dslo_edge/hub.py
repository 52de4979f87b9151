"""The hub side: run teacher snapshots on samples and publish soft labels.

Each teacher file passed to ``push`` is one round. Within a round the samples
are sent in messages of ``batch_size``. With ``wait``, the hub waits until the
device reports on its retained metrics topic that it has processed every
message of the round, and only then starts the next one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from dslo_edge import broker_login
from dslo_edge.broker_login import BrokerLogin
from dslo_edge.errors import BrokerError, ConfigError
from dslo_edge.json_input import parse_json
from dslo_edge.label_protocol import HUB_LEVEL
from dslo_edge.models import TeacherModel
from dslo_edge.privacy import PrivacyBudgetExceeded, PrivateRelease
from dslo_edge.protocol import (
    MAX_SAMPLE_ID_BYTES,
    SoftLabelUpdate,
    Topics,
    encode_update,
    new_message_id,
)
from dslo_edge.push_progress import (
    BASELINE_TIMEOUT_S,
    DeviceCounts,
    counted,
    key_counters,
    wait_for_baseline,
    wait_for_processed,
    wait_for_saved,
)
from dslo_edge.runtime import is_numeric
from dslo_edge.signing import sign

logger = logging.getLogger(__name__)

# The hard label of a sample that has none, in data files and in updates.
NO_HARD_LABEL = -1


@dataclass(frozen=True)
class SampleSet:
    """Samples the hub labels: inputs, optional hard labels and sample ids.

    ``y`` contains the hard labels of a single-head student, and ``head_y``
    those of a student with several heads, by head name.
    """

    x: np.ndarray
    ids: list[str]
    y: np.ndarray | None = None
    head_y: dict[str, np.ndarray] | None = None

    def skip(self, count: int) -> SampleSet:
        """Return the samples after the first ``count``."""
        head_y = self.head_y
        if head_y is not None:
            head_y = {head: labels[count:] for head, labels in head_y.items()}
        y = None if self.y is None else self.y[count:]
        return SampleSet(self.x[count:], self.ids[count:], y, head_y)


def load_samples(
    path: str | Path, *, read_labels: bool = True, heads: Sequence[str] = ()
) -> SampleSet:
    """Read an ``.npz`` file with ``x`` and optional ``y`` and ``ids`` arrays.

    Args:
        read_labels: False ignores ``y``, so the result has none and ``y``
            is not checked.
        heads: the head names of a student with several heads. With
            ``read_labels``, the file must then have one ``y_<head>`` array
            per head and no ``y``, and they go to ``head_y``.

    Raises:
        ConfigError: the file is missing, unreadable or not a valid zip
            archive, or it lacks ``x``. Also when ``x`` or ``y`` is not
            numeric, an array is a scalar, ``x`` has no samples, or the arrays
            disagree in length. Also when ``y`` has more than one axis or a
            value that is not a whole int32 class index, or an id is not
            UTF-8 text of at most 255 bytes. With ``heads``, also when a
            head's array is missing, an array names no head, or ``y`` is there.
    """
    source = Path(path)
    arrays = _read_npz(source)
    if "x" not in arrays:
        raise ConfigError(
            f"{source} has arrays {sorted(arrays)}; expected at least 'x' (inputs)"
        )
    x = _numeric_array(arrays, "x", source, np.float32)
    if len(x) == 0:
        raise ConfigError(
            f"{source}: x has shape {x.shape}, so the file has no samples; "
            "expected at least one row in x"
        )
    head_y = None
    if read_labels and heads:
        head_y = _head_class_labels(arrays, source, heads)
    y = None
    if read_labels and not heads and "y" in arrays:
        y = _class_labels(arrays, source)
    if "ids" in arrays:
        ids = [str(i) for i in _per_sample_array(arrays, "ids", source)]
        _check_sample_ids(ids, source)
    else:
        ids = default_sample_ids(x)
    labels = {} if head_y is None else {f"y_{head}": a for head, a in head_y.items()}
    if y is not None:
        labels["y"] = y
    _check_lengths(source, x, labels, ids, given_ids="ids" in arrays)
    if not np.all(np.isfinite(x)):
        raise ConfigError(_non_finite_input_message(source, arrays["x"], x))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: ids repeat; expected one unique id per sample")
    return SampleSet(x, ids, y, head_y)


def _check_lengths(
    source: Path,
    x: np.ndarray,
    labels: dict[str, np.ndarray],
    ids: list[str],
    given_ids: bool,
) -> None:
    """Reject label arrays or ``ids`` whose length differs from the rows of ``x``."""
    lengths: dict[str, int | None] = {
        name: len(array) for name, array in labels.items()
    }
    lengths["ids"] = len(ids) if given_ids else None
    mismatched = [
        f"{name} has {length}"
        for name, length in lengths.items()
        if length is not None and length != len(x)
    ]
    if mismatched:
        raise ConfigError(
            f"{source}: x has {len(x)} samples (shape {x.shape}), but "
            f"{' and '.join(mismatched)}; expected one entry per row of x"
        )


# Exceptions of np.load for a damaged archive: BadZipFile for a truncated file
# or a bad CRC, EOFError for a cut-off member, zlib.error for a damaged member
# of numpy.savez_compressed.
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


# First bytes of the files np.load reads without pickle: a zip archive (.npz,
# "PK\x05\x06" when it is empty) or a single .npy array.
_NUMPY_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")


def has_label_array(path: str | Path) -> bool:
    """Return whether an ``.npz`` file has a ``y`` array; False if it is unreadable."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except _NPZ_ERRORS:
        return False
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return False
    with loaded as data:
        return "y" in data.files


def _read_npz(source: Path) -> dict[str, np.ndarray]:
    """Return every array of an ``.npz`` file by name."""
    try:
        with open(source, "rb") as stream:
            head = stream.read(len(_NUMPY_SIGNATURES[-1]))
        if not head.startswith(_NUMPY_SIGNATURES):
            # np.load would try pickle and report "pickled (object) data",
            # which misleads for a CSV or other file that is not numpy's.
            found = f"it starts with {head!r}" if head else "it is empty"
            raise ConfigError(
                f"cannot read {source} as .npz: it is not a zip archive "
                f"({found}); save the arrays with numpy.savez(path, x=x)"
            )
        loaded = np.load(source, allow_pickle=False)
    except FileNotFoundError as error:
        raise ConfigError(f"sample file not found: {source}") from error
    except _NPZ_ERRORS as error:
        raise _npz_read_error(source, error) from error
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ConfigError(
            f"{source} is a single .npy array of shape {loaded.shape}; expected "
            "an .npz archive with an 'x' array, written by numpy.savez(path, x=x)"
        )
    with loaded as data:
        try:
            return {key: data[key] for key in data.files}
        except _NPZ_ERRORS as error:
            raise _npz_read_error(source, error) from error


def _npz_read_error(source: Path, error: Exception) -> ConfigError:
    """Return the error for an ``.npz`` file that numpy cannot read."""
    if isinstance(error, ValueError) and "allow_pickle" in str(error):
        # Object arrays need pickle, which stays off because unpickling
        # an untrusted file can run code.
        return ConfigError(
            f"cannot read {source} as .npz: it contains an object array, which "
            "needs pickle; save x, y and ids as numeric or string arrays"
        )
    if isinstance(error, OSError) and error.errno is not None:
        # The system refused the open or read, as for a folder or a file this
        # user cannot read, so the contents were never checked.
        return ConfigError(
            f"cannot read {source} as .npz: {error}; check that the path names "
            "a file that this process can read"
        )
    return ConfigError(
        f"cannot read {source} as .npz: {error}; the file is damaged or "
        "incomplete, so write it again with numpy.savez(path, x=x)"
    )


def _per_sample_array(
    arrays: dict[str, np.ndarray], name: str, source: Path
) -> np.ndarray:
    """Return the named array, rejecting a scalar that has no sample axis."""
    array = arrays[name]
    if array.ndim == 0:
        raise ConfigError(
            f"{source}: array '{name}' is a scalar; expected one entry per "
            "sample along its first axis"
        )
    return array


def _non_finite_input_message(source: Path, raw: np.ndarray, x: np.ndarray) -> str:
    """Return the error for inputs that are not finite once read as float32.

    A finite value beyond float32's range becomes infinity in the cast, so
    the message names that value rather than calling it NaN or infinity.
    """
    position = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
    value = raw[position]
    if not np.isfinite(value):
        return f"{source}: x contains NaN or infinity"
    limit = float(np.finfo(np.float32).max)
    return (
        f"{source}: x{list(position)} is {float(value):g}, beyond the float32 "
        f"range of +-{limit:.4g} that the student reads; scale x as the "
        "student's training data was scaled"
    )


def _numeric_array(
    arrays: dict[str, np.ndarray], name: str, source: Path, dtype: type
) -> np.ndarray:
    """Return a per-sample array as ``dtype``, rejecting non-numeric dtypes."""
    array = _per_sample_array(arrays, name, source)
    if not is_numeric(array):
        raise ConfigError(
            f"{source}: array '{name}' has dtype {array.dtype}; expected a "
            f"numeric dtype (integer or floating point, such as "
            f"{np.dtype(dtype).name}), so save {name} as numbers"
        )
    # The caller rejects values beyond the range of dtype, which become inf.
    with np.errstate(over="ignore"):
        return np.asarray(array, dtype=dtype)


def _head_class_labels(
    arrays: dict[str, np.ndarray], source: Path, heads: Sequence[str]
) -> dict[str, np.ndarray]:
    """Return each head's ``y_<head>`` array as int32 class indices.

    Raises:
        ConfigError: ``y`` is there, a head's array is missing, or a
            ``y_<name>`` array names no head.
    """
    names = [f"y_{head}" for head in heads]
    keywords = ", ".join(f"{name}=..." for name in names)
    expected = (
        f"expected one label array per head of the student ({', '.join(names)}), "
        f"written by numpy.savez(path, x=x, {keywords})"
    )
    if "y" in arrays:
        raise ConfigError(
            f"{source} has a single y, but the student has several heads; "
            f"{expected}, and no y"
        )
    missing = [name for name in names if name not in arrays]
    unknown = sorted(
        name for name in arrays if name.startswith("y_") and name not in names
    )
    # Both lists name the arrays, so a misspelt head name such as y_shpae
    # shows up beside the y_shape it was meant to be.
    problems = []
    if missing:
        problems.append(f"lacks {', '.join(missing)}")
    if unknown:
        verb = "names" if len(unknown) == 1 else "name"
        problems.append(
            f"has {', '.join(unknown)}, which {verb} no head of the student"
        )
    if problems:
        raise ConfigError(f"{source} {' and '.join(problems)}; {expected}")
    return {head: _class_labels(arrays, source, f"y_{head}") for head in heads}


def _class_labels(
    arrays: dict[str, np.ndarray], source: Path, name: str = "y"
) -> np.ndarray:
    """Return the array ``name`` as int32, rejecting values the cast would change.

    A float label such as 1.5 or NaN, or an integer outside int32, would
    otherwise turn silently into another class index.
    """
    exact = _numeric_array(arrays, name, source, np.float64)
    if exact.ndim != 1:
        raise ConfigError(
            f"{source}: {name} has shape {exact.shape}; expected one class index "
            f"per sample, shape ({len(exact)},). For one-hot rows save "
            f"{name}.argmax(axis=1)"
        )
    # float64 represents every int32 exactly, so a label survives the round trip
    # through int32 only when the cast keeps its value.
    with np.errstate(invalid="ignore"):
        labels = exact.astype(np.int32)
    changed = np.flatnonzero(labels != exact)
    if len(changed):
        index = int(changed[0])
        raise ConfigError(
            f"{source}: {name}[{index}] is {arrays[name][index].item()!r}; "
            "expected a whole class index that fits int32, such as 0, 1 or 2"
        )
    return labels


def _check_sample_ids(ids: list[str], source: Path) -> None:
    """Reject ids that the update payload cannot carry."""
    for index, sample_id in enumerate(ids):
        try:
            size = len(sample_id.encode("utf-8"))
        except UnicodeEncodeError as error:
            raise ConfigError(
                f"{source}: ids[{index}] {sample_id[:40]!r} is not valid "
                f"Unicode text ({error.reason}); expected ids that encode as UTF-8"
            ) from error
        if size > MAX_SAMPLE_ID_BYTES:
            raise ConfigError(
                f"{source}: ids[{index}] {sample_id[:40]!r}... is {size} bytes of "
                f"UTF-8; expected at most {MAX_SAMPLE_ID_BYTES}, so shorten the ids"
            )


def default_sample_ids(x: np.ndarray) -> list[str]:
    """Return an id per row of ``x``, derived from the row's float32 bytes.

    The device keeps smoothing state per sample id, so the same input must
    keep its id across files and pushes, and different inputs must not
    share one. An id is "x" and 12 hex digits of a BLAKE2b hash (48 bits),
    so two of a million distinct rows collide with a chance of about 0.2 %.
    A row that repeats earlier in ``x`` gets ``-2``, ``-3`` and so on after
    its id, so the ids stay unique.
    """
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
    seen: dict[str, int] = {}
    ids = []
    for row in rows:
        digest = "x" + hashlib.blake2b(row.tobytes(), digest_size=6).hexdigest()
        count = seen.get(digest, 0) + 1
        seen[digest] = count
        ids.append(digest if count == 1 else f"{digest}-{count}")
    return ids


def check_samples(
    samples: SampleSet,
    input_shape: tuple[int, ...],
    class_count: int,
    source: str,
    model: str = "the bundle's student",
    head_classes: Mapping[str, int] | None = None,
) -> None:
    """Check samples against the model before anything is sent.

    Args:
        model: the model that takes ``input_shape``, for the error message.
        head_classes: the class count of each head, for ``samples.head_y``.

    Raises:
        ConfigError: wrong input shape, or a hard label that is neither a
            class index 0..K-1 nor -1 (no hard label).
    """
    if samples.x.shape[1:] != input_shape:
        fix = ""
        if math.prod(samples.x.shape[1:]) == math.prod(input_shape):
            # Such as digits images saved as (N, 8, 8) for a student of (8, 8, 1).
            shape = ", ".join(map(str, input_shape))
            fix = (
                f"; the sizes match, so save x.reshape(len(x), {shape}) if the "
                "values are in that order"
            )
        raise ConfigError(
            f"{source}: x has samples of shape {samples.x.shape[1:]}, but "
            f"{model} takes {input_shape}{fix}"
        )
    if samples.y is not None:
        _check_class_labels(samples.y, class_count, f"{source}: y", "")
    for head, labels in (samples.head_y or {}).items():
        classes = (head_classes or {}).get(head, 0)
        _check_class_labels(
            labels, classes, f"{source}: y_{head}", f" of head {head!r}"
        )


def _check_class_labels(
    labels: np.ndarray, class_count: int, name: str, classes_of: str
) -> None:
    """Reject labels that are neither a class index nor -1 (no hard label)."""
    bad = np.flatnonzero((labels < NO_HARD_LABEL) | (labels >= class_count))
    if not len(bad):
        return
    index = int(bad[0])
    raise ConfigError(
        f"{name}[{index}] is {labels[index]}; expected a class index "
        f"0..{class_count - 1}{classes_of}, or {NO_HARD_LABEL} for a sample "
        f"without a hard label (invalid labels: {len(bad)} of {len(labels)})"
    )


def hard_labels_to_send(labels: np.ndarray | None) -> np.ndarray | None:
    """Return a batch's hard labels for its update, or None when all are -1.

    The device treats a missing array as -1 for every sample, so leaving it
    out changes no training and saves 4 bytes per sample.
    """
    if labels is None or np.all(labels == NO_HARD_LABEL):
        return None
    return labels


def parse_broker_url(url: str) -> tuple[str, int]:
    """Split ``mqtt[s]://HOST[:PORT]`` into host and port (1883 or 8883 by default).

    Raises:
        ConfigError: see ``broker_login.parse_broker_url``.
    """
    _, host, port = broker_login.parse_broker_url(url)
    return host, port


def describe_non_finite_labels(
    labels: np.ndarray, x: np.ndarray, ids: Sequence[str]
) -> str | None:
    """Name the first sample whose teacher labels are NaN or infinite, or None.

    Finite inputs of extreme magnitude, such as 1e38, can overflow a
    teacher's layers. The device would then reject the labels and could not
    name the inputs, so the hub checks before it sends.
    """
    bad = ~np.isfinite(labels).reshape(len(labels), -1).all(axis=1)
    if not bad.any():
        return None
    row = int(np.argmax(bad))
    largest = float(np.abs(x[row]).max())
    return (
        f"the teacher gave NaN or infinite labels for sample {ids[row]!r} "
        f"({int(bad.sum())} of {len(labels)} samples labelled together); its "
        f"largest input magnitude is {largest:.3g}"
    )


def non_finite_batch_error(problem: str) -> ConfigError:
    """Return the error that stops ``push`` at a batch with NaN or infinite labels.

    Args:
        problem: the batch's description from ``describe_non_finite_labels``,
            or from ``hub_multihead.describe_non_finite_heads`` for a
            teacher with several heads.
    """
    return ConfigError(
        f"{problem}. Check or rescale the inputs in the sample file; updates "
        "of earlier batches were already sent"
    )


def _check_finite_labels(labels: np.ndarray, x: np.ndarray, ids: list[str]) -> None:
    """Raise ConfigError for labels that the device would reject as non-finite."""
    problem = describe_non_finite_labels(labels, x, ids)
    if problem is not None:
        raise non_finite_batch_error(problem)


def build_updates(
    teacher: TeacherModel,
    samples: SampleSet,
    *,
    teacher_version: str,
    teacher_round: int,
    batch_size: int = 32,
    send_hard_labels: bool = False,
    top_k: int | None = None,
    privacy: PrivateRelease | None = None,
) -> Iterator[SoftLabelUpdate]:
    """Label samples with the teacher and cut them into updates.

    Args:
        top_k: send only the k largest probabilities per sample (payload
            format version 2). Logits are then sent as softmax(logits) at T = 1.
        privacy: add Gaussian noise to every probability vector and charge
            the device's privacy ledger. An update whose release would exceed
            the budget raises ``PrivacyBudgetExceeded`` before it is yielded.
    """
    for start in range(0, len(samples.x), batch_size):
        x = samples.x[start : start + batch_size]
        labels = teacher.predict(x)
        _check_finite_labels(labels, x, samples.ids[start : start + batch_size])
        kind = teacher.output_kind
        if privacy is not None:
            labels = privacy.labels(labels, kind)
            kind = "probabilities"
        elif top_k is not None and kind == "logits":
            labels = label_probabilities_of(labels)
            kind = "probabilities"
        hard = None
        if send_hard_labels and samples.y is not None:
            hard = hard_labels_to_send(samples.y[start : start + batch_size])
        yield SoftLabelUpdate(
            message_id=new_message_id(),
            teacher_version=teacher_version,
            teacher_round=teacher_round,
            timestamp=time.time(),
            sample_ids=samples.ids[start : start + batch_size],
            inputs=x,
            labels=labels.astype(np.float32),
            label_kind=kind,
            hard_labels=hard,
            top_k=top_k,
        )


def label_probabilities_of(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Return ``softmax(logits / T)`` per row, as the hub sends for top-k labels."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exponentials = np.exp(scaled)
    return (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(np.float32)


# MQTT 5 PUBACK reason code of a publish that no subscription matched.
NO_MATCHING_SUBSCRIBERS = 0x10
# MQTT 5 reason codes from 0x80 up are failures. mosquitto 2.0.11 acknowledges
# a publish that its ACL denies with 0x87 (not authorized), and paho still
# reports the message as published.
FIRST_FAILURE_CODE = 0x80
NOT_AUTHORIZED = 0x87


class UpdateNotDelivered(BrokerError):
    """The broker acknowledged an update but will not deliver it.

    ``fix`` is the change the user must make before pushing again.
    """

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.fix = fix


class DeviceNotSubscribed(UpdateNotDelivered):
    """The broker dropped an update because no client subscribes to its topic."""


class HubClient:
    """An MQTT client that publishes updates and follows a device's status and metrics.

    Raises:
        BrokerError: the broker cannot be reached or refused the login.
    """

    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        protocol: Any = mqtt.MQTTv5,
        *,
        login: BrokerLogin | None = None,
        topic_prefix: str = "dslo",
    ):
        self.topics = Topics.for_device(device_id, topic_prefix)
        if device_id == HUB_LEVEL:
            raise ConfigError(
                f"device id {device_id!r} is invalid: the hub workers' own topics "
                "use that level, so no device can have it"
            )
        self.device_id = device_id
        self.latest_metrics: dict[str, Any] | None = None
        # The retained presence string, STATUS_ONLINE or STATUS_OFFLINE.
        self.status: str | None = None
        self._metrics_changed = threading.Condition()
        # The PUBACK reason code per message id, read after wait_for_publish,
        # which returns only after paho called on_publish.
        self._puback_codes: dict[int, int] = {}
        # The update that publish() handed to paho and whose PUBACK it waits for.
        self.in_flight: mqtt.MQTTMessageInfo | None = None
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"dslo-hub-{device_id}-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        settings = (login or BrokerLogin()).settings(host, port)
        broker_login.start_client(self.client, settings, f"hub of {device_id}")

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, _r: Any, _p: Any
    ) -> None:
        client.subscribe([(self.topics.status, 1), (self.topics.metrics, 1)])

    def _on_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any
    ) -> None:
        self._puback_codes[mid] = int(getattr(reason, "value", 0))

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topics.status:
            with self._metrics_changed:
                self.status = message.payload.decode("utf-8", "replace")
                self._metrics_changed.notify_all()
            return
        try:
            report = parse_json(message.payload)
        except ValueError:
            logger.warning("Ignoring unreadable metrics from device %s", self.device_id)
            return
        with self._metrics_changed:
            self.latest_metrics = report
            self._metrics_changed.notify_all()

    def publish(self, payload: bytes, expiry_s: int | None = None) -> None:
        """Publish one update at QoS 1 and wait for the broker's PUBACK.

        With MQTT 5, ``expiry_s`` sets the message expiry interval, so the
        broker drops an update that waited longer than that for the device.
        """
        properties = None
        if expiry_s is not None and self.client.protocol == mqtt.MQTTv5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = expiry_s
        info = self.client.publish(
            self.topics.updates, payload, qos=1, properties=properties
        )
        self.in_flight = info
        info.wait_for_publish(timeout=30)
        self.in_flight = None
        if not info.is_published():
            raise BrokerError(
                f"update for device {self.device_id} was not acknowledged by the broker"
            )
        code = self._puback_codes.pop(info.mid, 0)
        if code == NO_MATCHING_SUBSCRIBERS:
            raise DeviceNotSubscribed(
                f"the broker dropped the update for device {self.device_id} "
                f"unread, because no client subscribes to {self.topics.updates} "
                "(the device never connected, its session expired, or --device "
                "or --topic-prefix differs from the device config)",
                "start the device's daemon once, so that the broker keeps its "
                "updates while it is offline, and push again",
            )
        if code >= FIRST_FAILURE_CODE:
            fix = "check the broker's log for the reason, and push again"
            if code == NOT_AUTHORIZED:
                fix = (
                    "mosquitto sends this code when its ACL does not let the "
                    "push's MQTT user publish there; grant that user write "
                    f"access to {self.topics.updates} and push again"
                )
            raise UpdateNotDelivered(
                f"the broker rejected the update for device {self.device_id} "
                f"on {self.topics.updates} with reason code {code} "
                f"({reason_name(code)})",
                fix,
            )

    def in_flight_accepted(self) -> bool:
        """Check whether the broker accepted the update whose PUBACK publish() awaited.

        After an interrupt of publish(), the PUBACK may still have arrived.
        """
        info = self.in_flight
        if info is None or not info.is_published():
            return False
        code = self._puback_codes.get(info.mid, 0)
        return code != NO_MATCHING_SUBSCRIBERS and code < FIRST_FAILURE_CODE

    def wait_for_metrics(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Wait until the device's metrics satisfy ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._metrics_changed:
            while self.latest_metrics is None or not predicate(self.latest_metrics):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerError(
                        f"device {self.device_id} did not report the expected progress "
                        f"within {timeout:.0f} s; status {self.status or 'unknown'}, "
                        f"{key_counters(self.latest_metrics)}"
                    )
                self._metrics_changed.wait(remaining)
            return dict(self.latest_metrics)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class PushResult:
    """Counts of a push, and the device's metrics and counts when the push waited."""

    rounds: int = 0
    messages: int = 0
    samples: int = 0
    payload_bytes: int = 0
    device_metrics: dict[str, Any] | None = None
    # The updates the device applied and rejected during this push.
    device_counts: DeviceCounts | None = None


class PushInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped a push.

    ``result`` counts the updates that the broker acknowledged (PUBACK)
    before the interrupt. ``unacknowledged`` and ``unacknowledged_samples``
    count the update that was published but not yet acknowledged, 0 or 1,
    which may or may not reach the device. ``total_messages`` and
    ``total_samples`` are those of the whole push, over all rounds.
    """

    def __init__(
        self,
        result: PushResult,
        unacknowledged_samples: int | None,
        total_messages: int,
        total_samples: int,
    ):
        super().__init__()
        self.result = result
        self.unacknowledged = 0 if unacknowledged_samples is None else 1
        self.unacknowledged_samples = unacknowledged_samples or 0
        self.total_messages = total_messages
        self.total_samples = total_samples


def push(
    teachers: list[Path],
    output_kind: str,
    samples: SampleSet,
    device_id: str,
    broker_url: str,
    *,
    login: BrokerLogin | None = None,
    batch_size: int = 32,
    wait: bool = True,
    timeout: float = 120.0,
    protocol: Any = mqtt.MQTTv5,
    on_message_sent: Callable[[], None] | None = None,
    top_k: int | None = None,
    privacy: PrivateRelease | None = None,
    hmac_key: bytes | None = None,
    expiry_s: int | None = 3600,
    window: int = 128,
    input_dtype: str = "float32",
    head_output_kinds: dict[str, str] | None = None,
    topic_prefix: str = "dslo",
) -> PushResult:
    """Publish soft labels from each teacher snapshot in turn, one round each.

    ``top_k`` and ``privacy`` are passed to ``build_updates``. With privacy,
    a push stops with ``PrivacyBudgetExceeded`` at the first update that
    would exceed the budget, after publishing the updates before it. SIGINT
    stops a push with ``PushInterrupted``, which counts what was published.

    Args:
        samples: inputs and ids to label. Their ``y``, when set, is sent as
            hard labels of a single-head student.
        broker_url: ``mqtt://HOST[:PORT]``, or ``mqtts://`` with a CA file in
            ``login``.
        login: user name, password file and TLS files for the broker.
        wait: follow the device's status and metrics. Fail at once when its
            retained status is offline. After each round, wait until the
            device has processed every update, and keep at most ``window``
            updates outstanding so a burst cannot overrun the broker's queue.
            After the last round, also wait until the device has saved them
            in a checkpoint. ``device_counts`` of the result then has this
            push's counts.
        hmac_key: sign every update with the device's key.
        expiry_s: MQTT 5 message expiry; match the device's max_age_s.
        input_dtype: "float16" sends inputs at half the size (payload
            version 2); the device still trains on float32.
        head_output_kinds: for a student with several heads, each head's
            teacher output kind. The teachers must then have one output per
            head, and the updates carry one label set per head (format
            version 3). ``output_kind`` is then unused.
        topic_prefix: the first topic level, the device's ``mqtt.topic_prefix``.

    Raises:
        ConfigError: ``head_output_kinds`` is combined with ``privacy``, or
            the broker URL or login is invalid.
        BrokerError: the broker cannot be used, the device is offline, it
            did not process and save the updates within ``timeout``, or it
            rolled back during the push.
    """
    if head_output_kinds is not None and privacy is not None:
        raise ConfigError(
            "private labels (privacy) are released for single-head students "
            "only; push to this multi-head student without a privacy budget"
        )
    login = login or BrokerLogin()
    settings = broker_login.broker_settings(broker_url, login)
    total_messages = math.ceil(len(samples.x) / batch_size) * len(teachers)
    total_samples = len(samples.x) * len(teachers)
    result = PushResult()
    try:
        hub = HubClient(
            settings.host,
            settings.port,
            device_id,
            protocol,
            login=login,
            topic_prefix=topic_prefix,
        )
    except KeyboardInterrupt as interrupt:
        # SIGINT while the client waited for the broker's CONNACK.
        raise PushInterrupted(
            result, None, total_messages, total_samples
        ) from interrupt
    # The sample count of the update being published, None between publishes.
    publishing: int | None = None
    # result.samples before the update being published was counted in it.
    counted_before = 0
    charged_before = _charged(privacy)
    try:
        before = (
            wait_for_baseline(hub, min(timeout, BASELINE_TIMEOUT_S)) if wait else {}
        )
        for round_number, path in enumerate(teachers, start=1):
            version = Path(path).stem
            rounds = _RoundSettings(version, round_number, batch_size, top_k)
            for update, payload in _encoded_updates(
                path,
                output_kind,
                head_output_kinds,
                samples,
                rounds,
                privacy,
                input_dtype,
            ):
                if hmac_key is not None:
                    payload = sign(hmac_key, hub.topics.updates, payload)
                if wait and result.messages >= window:
                    count = result.messages - window + 1
                    wait_for_processed(hub, before, count, result.messages, timeout)
                publishing = update.sample_count
                counted_before = result.samples
                try:
                    hub.publish(payload, expiry_s)
                except UpdateNotDelivered as error:
                    raise BrokerError(
                        _dropped_stop(error, update.sample_count, result, privacy)
                    ) from error
                result.messages += 1
                result.samples += update.sample_count
                result.payload_bytes += len(payload)
                # Cleared last, so that an interrupt finds the update's samples
                # in result or in publishing. Otherwise the refund below would
                # take back the charge of samples that were sent.
                publishing = None
                if on_message_sent:
                    on_message_sent()
            result.rounds += 1
            # The path, not the version: r1/teacher.tflite and r2/teacher.tflite
            # share the version "teacher".
            logger.info(
                "Round %d sent to device %s with teacher %s",
                round_number,
                device_id,
                path,
            )
            if wait:
                result.device_metrics = wait_for_processed(
                    hub, before, result.messages, result.messages, timeout
                )
        if wait:
            result.device_metrics = wait_for_saved(hub, before, timeout)
            result.device_counts = DeviceCounts.between(before, result.device_metrics)
    except PrivacyBudgetExceeded as error:
        raise PrivacyBudgetExceeded(_budget_stop(error, result)) from error
    except KeyboardInterrupt as interrupt:
        if publishing is not None and result.samples > counted_before:
            publishing = None  # SIGINT came after result counted the update
        if privacy is not None:
            # Charged but never handed to the broker: an update that waited
            # for the device, or one that SIGINT stopped between its charge
            # and its publish, such as while it was encoded.
            unsent = _charged(privacy) - charged_before - result.samples
            unsent -= publishing or 0
            if unsent > 0:
                _refund_unsent(privacy, unsent)
        if publishing is not None and hub.in_flight_accepted():
            result.messages += 1
            result.samples += publishing
            publishing = None
        raise PushInterrupted(
            result, publishing, total_messages, total_samples
        ) from interrupt
    finally:
        hub.close()
    return result


def _dropped_stop(
    error: UpdateNotDelivered,
    samples: int,
    result: PushResult,
    privacy: PrivateRelease | None,
) -> str:
    """Refund an update the broker will not deliver; return where the push stopped."""
    refund = ""
    if privacy is not None:
        privacy.ledger.refund(privacy.device_id, samples)
        refund = f"; took back the privacy charge of its {samples} samples"
    fix = error.fix
    if not result.messages:
        return f"{error}{refund}. The push sent nothing; {fix}"
    return (
        f"{error}{refund}. The push stopped there, after sending "
        f"{counted(result.messages, 'update')} ({counted(result.samples, 'sample')}) "
        f"in round {result.rounds + 1}; {fix}"
    )


def _charged(privacy: PrivateRelease | None) -> int:
    """Return the vectors the ledger charges to the device at the push's noise."""
    if privacy is None:
        return 0
    releases = privacy.ledger.releases(privacy.device_id)
    return releases.get(privacy.ledger.settings.noise_multiplier, 0)


def _refund_unsent(privacy: PrivateRelease, samples: int) -> None:
    """Take back the privacy charge of updates that an interrupt kept unsent."""
    try:
        privacy.ledger.refund(privacy.device_id, samples)
    except ConfigError as error:
        # The charge stays, which overstates the spent budget but hides nothing.
        logger.warning("Privacy charge of an unsent update stays: %s", error)


def _budget_stop(error: PrivacyBudgetExceeded, result: PushResult) -> str:
    """Describe a push that the privacy budget stopped, with what it sent."""
    if not result.messages:
        return f"{error}. The push sent nothing"
    return (
        f"{error}. The push stopped there, after sending "
        f"{counted(result.messages, 'update')} ({counted(result.samples, 'sample')}) "
        f"in round {result.rounds + 1}"
    )


@dataclass(frozen=True)
class _RoundSettings:
    """Labelling settings of one teacher round: version, round, batching, top-k."""

    teacher_version: str
    teacher_round: int
    batch_size: int
    top_k: int | None


def _encoded_updates(
    path: Path,
    output_kind: str,
    head_output_kinds: dict[str, str] | None,
    samples: SampleSet,
    rounds: _RoundSettings,
    privacy: PrivateRelease | None,
    input_dtype: str,
) -> Iterator[tuple[Any, bytes]]:
    """Yield each update of one round with its payload."""
    if head_output_kinds is not None:
        yield from _encoded_multi_head_updates(
            path, head_output_kinds, samples, rounds, input_dtype
        )
        return
    for update in build_updates(
        TeacherModel(path, output_kind),
        samples,
        teacher_version=rounds.teacher_version,
        teacher_round=rounds.teacher_round,
        batch_size=rounds.batch_size,
        send_hard_labels=samples.y is not None,
        top_k=rounds.top_k,
        privacy=privacy,
    ):
        update.input_dtype = input_dtype
        yield update, encode_update(update)


def _encoded_multi_head_updates(
    path: Path,
    head_output_kinds: dict[str, str],
    samples: SampleSet,
    rounds: _RoundSettings,
    input_dtype: str,
) -> Iterator[tuple[Any, bytes]]:
    # Imported here because hub_multihead imports SampleSet from this module.
    from dslo_edge.hub_multihead import MultiHeadTeacherModel, build_multi_head_updates
    from dslo_edge.multihead_protocol import encode_multi_head_update

    for update in build_multi_head_updates(
        MultiHeadTeacherModel(path, head_output_kinds),
        samples,
        teacher_version=rounds.teacher_version,
        teacher_round=rounds.teacher_round,
        batch_size=rounds.batch_size,
        top_k=rounds.top_k,
    ):
        update.input_dtype = input_dtype
        yield update, encode_multi_head_update(update)


def reason_name(reason_code: int) -> str:
    """Return the MQTT 5 name of a PUBACK reason code, such as "Not authorized"."""
    try:
        return str(ReasonCode(PacketTypes.PUBACK, identifier=reason_code))
    except ValueError:
        # paho raises for a code that MQTT 5 does not define for PUBACK.
        return "not defined for PUBACK"
