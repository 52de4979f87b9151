"""Serve a batch of label requests from many devices with few teacher calls.

``BatchLabeller.serve`` runs on the hub worker's batcher thread:

1. decode each request and check its device, response topic and shape;
2. admit them in one shared-state transaction (repeats, rate limits,
   privacy budgets), which also charges the admitted ones;
3. label every admitted sample, ``LABEL_CHUNK_SAMPLES`` per teacher call,
   and split the output;
4. store the responses, taking back the privacy charge of a request whose
   labels came out NaN or infinite, or whose response would exceed
   ``requests.max_payload_bytes``, and so were not released;
5. publish the responses on each request's response topic with its
   correlation data, wait for the broker's PUBACKs, and only then
   acknowledge the requests. A connection lost meanwhile raises
   ``BrokerError`` and leaves the requests unacknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import paho.mqtt.client as mqtt

from dslo_edge.errors import BrokerError, ConfigError, InvalidRequest
from dslo_edge.hub import describe_non_finite_labels, label_probabilities_of
from dslo_edge.hub_config import HubConfig
from dslo_edge.hub_state import (
    ADMITTED,
    BUDGET_EXHAUSTED,
    CACHED,
    IN_PROGRESS,
    RATE_LIMITED,
    Admission,
    HubState,
    RequestKey,
)
from dslo_edge.hub_teacher import (
    LABEL_CHUNK_SAMPLES,
    TeacherRegistry,
    predict_in_chunks,
)
from dslo_edge.label_protocol import (
    STATUS_BUDGET_EXHAUSTED,
    STATUS_OK,
    STATUS_RATE_LIMITED,
    STATUS_REJECTED,
    LabelRequest,
    RequestTopics,
    decode_request,
    response_properties,
)
from dslo_edge.privacy import privatise
from dslo_edge.protocol import SoftLabelUpdate, encode_update
from dslo_edge.repeat_log import RepeatLimiter, repeats_note
from dslo_edge.signing import key_file_present, load_key, sign
from dslo_edge.watchdog import Heartbeat

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 30.0
# Ignored and rejected requests of one device are logged at most once per
# this many seconds, and the next line gives the count. At most this many devices are
# remembered for that, and beyond it all are forgotten.
UNANSWERABLE_LOG_INTERVAL_S = 60.0
UNANSWERABLE_LOG_MEMORY = 1024
# A device's missing or unusable HMAC key is logged at most once an hour, or at
# once after its key file was loaded again.
KEY_LOG_INTERVAL_S = 3600.0
KEY_LOG_MEMORY = 1024
# A device's spent privacy budget is logged at most once an hour, with the
# count of requests rejected for it since the last line.
BUDGET_LOG_INTERVAL_S = 3600.0
BUDGET_LOG_MEMORY = 1024
# Header bytes of a request before its shape, used to estimate sample counts.
_COUNT_OFFSET = 30


class Acknowledger(Protocol):
    """Anything that sends a PUBACK for a received message, like mqtt.Client."""

    def ack(self, mid: int, qos: int) -> Any: ...


@dataclass(eq=False)
class Incoming:
    """A request message waiting for the batcher."""

    device: str | None
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    redelivered: bool
    ack: Callable[[], None]
    received_at: float
    # The dead worker whose session a drain received this request from.
    drained_from: str | None = None


@dataclass
class BatchCounters:
    """Counts of the outcomes of the requests one worker received."""

    requests: int = 0
    answered: int = 0
    cached: int = 0
    in_progress: int = 0
    rate_limited: int = 0
    budget_exhausted: int = 0
    rejected: int = 0
    unanswerable: int = 0
    redelivered: int = 0
    teacher_calls: int = 0
    labelled_samples: int = 0
    largest_batch: int = 0


@dataclass(eq=False)
class _Reply:
    item: Incoming
    key: RequestKey
    status: str
    payload: bytes
    retry_after_s: float | None = None
    # A reply that depends only on the message's own bytes is not stored, so
    # a malformed copy cannot replace the stored reply of a valid request.
    stored: bool = True
    # True when the admission charged the privacy budget for labels that
    # this reply does not release, so the charge is taken back.
    refund: bool = False
    # True when this reply releases labels that this worker made now.
    release: bool = False


class BatchLabeller:
    """Admits, labels and responds to batches of requests for one worker."""

    def __init__(self, config: HubConfig, state: HubState, teacher: TeacherRegistry):
        self.config = config
        self.state = state
        self.teacher = teacher
        self.counters = BatchCounters()
        # The progress of the batcher thread, which calls serve.
        self.progress = Heartbeat()
        # Set by the worker once its MQTT client exists.
        self.client: mqtt.Client | None = None
        # Each device's key, with the key file's (inode, size, mtime) when it
        # was read, so a replaced file is read again.
        self._keys: dict[str, tuple[tuple[int, int, int], bytes]] = {}
        # Devices whose unusable key was logged, so resends add few log lines.
        # Its memory is bounded because any client can send under a new id.
        self._key_log = RepeatLimiter(KEY_LOG_INTERVAL_S, KEY_LOG_MEMORY)
        self._unanswerable_log = RepeatLimiter(
            UNANSWERABLE_LOG_INTERVAL_S, UNANSWERABLE_LOG_MEMORY
        )
        self._rejected_log = RepeatLimiter(
            UNANSWERABLE_LOG_INTERVAL_S, UNANSWERABLE_LOG_MEMORY
        )
        self._budget_log = RepeatLimiter(BUDGET_LOG_INTERVAL_S, BUDGET_LOG_MEMORY)
        self._rng = np.random.default_rng()

    def _log_unanswerable(self, item: Incoming) -> None:
        """Log an ignored request, at most once a minute per device with a count."""
        device = item.device or "(no device)"
        skipped = self._unanswerable_log.skipped_before(device)
        if skipped is None:
            return
        logger.warning(
            "Ignoring a request from %s with response topic %s; expected the "
            "device's own labels topic%s",
            device,
            item.response_topic,
            repeats_note(skipped, "such request"),
        )

    def _log_rejected(self, device: str, error: InvalidRequest) -> None:
        """Log a rejected request, at most once a minute per device with a count.

        A missing or unusable key is logged once per device where it is found.
        """
        if error.reason == "no_key":
            return
        skipped = self._rejected_log.skipped_before(device)
        if skipped is None:
            return
        logger.warning(
            "Rejected a label request from device %s (%s): %s%s",
            device,
            error.reason,
            error,
            repeats_note(skipped, "rejected request"),
        )

    def _log_spent(self, device: str, detail: str) -> None:
        """Log a request rejected for a spent budget, at most hourly per device."""
        skipped = self._budget_log.skipped_before(device)
        if skipped is None:
            return
        logger.warning(
            "Rejected a label request from device %s because its privacy budget is "
            "spent (%s)%s. Later rejections for this device are logged at most "
            "once an hour",
            device,
            detail,
            repeats_note(skipped, "rejected request"),
        )

    @staticmethod
    def estimate_samples(item: Incoming) -> int:
        """Return the sample count in a request header, or 1 if unreadable."""
        header = item.payload[_COUNT_OFFSET : _COUNT_OFFSET + 4]
        if len(header) < 4:
            return 1
        return max(1, int.from_bytes(header, "little"))

    def serve(self, batch: list[Incoming]) -> None:
        """Respond to every request in the batch, then acknowledge them all."""
        self.counters.requests += len(batch)
        self.counters.redelivered += sum(item.redelivered for item in batch)
        accepted: list[tuple[Incoming, LabelRequest, RequestKey]] = []
        # Later copies of a request id in this batch get the first copy's reply.
        repeats: list[tuple[Incoming, RequestKey]] = []
        seen: set[tuple[str, bytes]] = set()
        replies: list[_Reply] = []
        for item in batch:
            checked = self._check(item, replies)
            if checked is None:
                continue
            key = checked[2]
            if (key.device, key.request_id) in seen:
                repeats.append((item, key))
            else:
                seen.add((key.device, key.request_id))
                accepted.append(checked)
        rejections = len(replies)
        admissions = self.state.admit(
            [key for _, _, key in accepted],
            time.time(),
            self.config.rate,
            self.config.privacy,
            self.config.requests.claim_timeout_s,
        )
        to_label = []
        for (item, request, key), admission in zip(accepted, admissions, strict=True):
            if admission.kind == ADMITTED:
                to_label.append((item, request, key))
            else:
                self._refusal(item, key, admission, replies)
        replies += self._label(to_label)
        replies += self._repeat_replies(repeats, replies[rejections:])
        self._send(replies)
        for item in batch:
            item.ack()

    def _check(
        self, item: Incoming, replies: list[_Reply]
    ) -> tuple[Incoming, LabelRequest, RequestKey] | None:
        if item.device is None or not self._response_topic_valid(item):
            self.counters.unanswerable += 1
            self._log_unanswerable(item)
            return None
        settings = self.config.requests
        try:
            request = decode_request(
                item.payload, settings.max_samples, settings.max_payload_bytes
            )
            self._check_request(item, request)
        except InvalidRequest as error:
            key = RequestKey(item.device, item.correlation or b"", 0)
            replies.append(
                _Reply(item, key, STATUS_REJECTED, str(error).encode(), stored=False)
            )
            self.counters.rejected += 1
            self._log_rejected(item.device, error)
            return None
        return (
            item,
            request,
            RequestKey(
                item.device,
                request.request_id,
                request.sample_count,
                drained_from=item.drained_from,
            ),
        )

    def _response_topic_valid(self, item: Incoming) -> bool:
        assert item.device is not None
        expected = RequestTopics.for_device(item.device, self.config.prefix).labels
        return item.response_topic == expected

    def _check_request(self, item: Incoming, request: LabelRequest) -> None:
        if not item.correlation:
            raise InvalidRequest(
                "malformed",
                "the request has no correlation data; set it to the request id "
                "in the payload",
            )
        if item.correlation != request.request_id:
            raise InvalidRequest(
                "malformed",
                "correlation data does not match the request id in the payload",
            )
        expected = self.teacher.input_shape
        if tuple(request.inputs.shape[1:]) != expected:
            raise InvalidRequest(
                "shape_mismatch",
                f"inputs have shape {request.inputs.shape[1:]} per sample, the "
                f"teacher expects {expected}",
            )
        if not np.isfinite(request.inputs).all():
            raise InvalidRequest("non_finite", "inputs contain NaN or infinity")
        repeated = _first_repeat(request.sample_ids)
        if repeated is not None:
            raise InvalidRequest(
                "duplicate_sample_id",
                f"sample id {repeated!r} occurs more than once; devices reject "
                "such updates, so give each sample of a request its own id",
            )
        device = item.device or ""
        try:
            key = self._key(device)
        except ConfigError as error:
            # Rejecting this request keeps the rest of the batch served.
            self._log_key_problem(device, str(error))
            raise InvalidRequest(
                "no_key", f"the hub cannot use the device's HMAC key: {error}"
            ) from error
        if self.config.keys_dir is not None and key is None:
            message = (
                f"no HMAC key {device}.key in {self.config.keys_dir}; add the "
                "device's key so the hub can sign its labels"
            )
            # Only the device receives the rejection, so the hub's operator
            # learns of the missing key from this line.
            self._log_key_problem(device, message)
            raise InvalidRequest("no_key", message)

    def _log_key_problem(self, device: str, message: str) -> None:
        """Log a device's missing or unusable key, at most once an hour."""
        skipped = self._key_log.skipped_before(device)
        if skipped is None:
            return
        logger.error(
            "Cannot sign labels for device %s: %s%s",
            device,
            message,
            repeats_note(skipped, "such request"),
        )

    def _refusal(
        self,
        item: Incoming,
        key: RequestKey,
        admission: Admission,
        replies: list[_Reply],
    ) -> None:
        if admission.kind == CACHED:
            self.counters.cached += 1
            status = admission.status or STATUS_REJECTED
            payload = admission.payload or b""
            replies.append(_Reply(item, key, status, payload, admission.retry_after_s))
        elif admission.kind == IN_PROGRESS:
            self.counters.in_progress += 1
        elif admission.kind == RATE_LIMITED:
            self.counters.rate_limited += 1
            message = f"device {key.device} exceeds its label request rate"
            replies.append(
                _Reply(
                    item,
                    key,
                    STATUS_RATE_LIMITED,
                    message.encode(),
                    admission.retry_after_s,
                )
            )
        elif admission.kind == BUDGET_EXHAUSTED:
            self.counters.budget_exhausted += 1
            self._log_spent(key.device, admission.detail)
            replies.append(
                _Reply(item, key, STATUS_BUDGET_EXHAUSTED, admission.detail.encode())
            )

    def _repeat_replies(
        self, repeats: list[tuple[Incoming, RequestKey]], replies: list[_Reply]
    ) -> list[_Reply]:
        """Give each repeat in a batch the reply of the first copy of its id.

        The admission of the first copy charges the request. Labelling the
        copies too would release fresh privacy noise for the same samples
        without a charge, and a copy with more samples would get them
        labelled for the first copy's price.
        """
        copies = []
        for item, key in repeats:
            first = next(
                (reply for reply in replies if _same_request(reply.key, key)), None
            )
            if first is None:
                # The first copy got no reply because another worker has claimed it.
                self.counters.in_progress += 1
                continue
            self.counters.cached += 1
            copy = _Reply(
                item, first.key, first.status, first.payload, first.retry_after_s
            )
            copies.append(copy)
        return copies

    def _label(
        self, admitted: list[tuple[Incoming, LabelRequest, RequestKey]]
    ) -> list[_Reply]:
        if not admitted:
            return []
        inputs = np.concatenate([request.inputs for _, request, _ in admitted])
        # Chunks bound the time between beats, as in a push, because one call
        # on a batch of up to 65536 samples can outlast hub.watchdog_stall_s.
        outputs = predict_in_chunks(self.teacher.predict, inputs, self.progress)
        self.counters.teacher_calls += -(-len(inputs) // LABEL_CHUNK_SAMPLES)
        self.counters.labelled_samples += len(inputs)
        self.counters.largest_batch = max(self.counters.largest_batch, len(admitted))
        replies = []
        start = 0
        for item, request, key in admitted:
            rows = outputs[start : start + request.sample_count]
            start += request.sample_count
            problem = describe_non_finite_labels(
                rows, request.inputs, request.sample_ids
            )
            payload = b""
            if problem is not None:
                # Finite inputs of extreme magnitude overflowed the teacher.
                problem = f"{problem}; rescale the inputs and ask again"
            else:
                payload = self._encode(item.device or "", request, rows)
                problem = self._describe_oversize(request, len(payload))
            if problem is not None:
                self.counters.rejected += 1
                logger.warning(
                    "Rejected request %s from device %s: %s",
                    request.request_id_hex,
                    item.device,
                    problem,
                )
                replies.append(
                    _Reply(item, key, STATUS_REJECTED, problem.encode(), refund=True)
                )
                continue
            replies.append(_Reply(item, key, STATUS_OK, payload, release=True))
            self.counters.answered += 1
        return replies

    def _describe_oversize(self, request: LabelRequest, size: int) -> str | None:
        """Describe a response payload above ``requests.max_payload_bytes``.

        The response repeats the request's inputs and adds the labels, so it
        is larger than the request. mosquitto 2.0.11 closes the connection of
        an MQTT 5 client that publishes a payload above its
        ``message_size_limit``, and paho sends the queued response again after
        each reconnect, so publishing it would cut the worker off the broker.
        A device also rejects an update above its own ``max_payload_bytes``.
        """
        limit = self.config.requests.max_payload_bytes
        if size <= limit:
            return None
        return (
            f"labels for the {request.sample_count} samples of the request make "
            f"a response of {size} bytes, above the hub's requests."
            f"max_payload_bytes of {limit}; ask for fewer samples per request"
        )

    def _encode(self, device: str, request: LabelRequest, rows: np.ndarray) -> bytes:
        current = self.teacher.current
        kind = current.output_kind
        top_k = self.config.requests.top_k or None
        privacy = self.config.privacy
        if privacy is not None or top_k is not None:
            if kind == "logits":
                rows = label_probabilities_of(rows)
                kind = "probabilities"
        if privacy is not None:
            rows = privatise(rows, privacy, self._rng)
        update = SoftLabelUpdate(
            message_id=request.request_id,
            teacher_version=current.version,
            teacher_round=current.round,
            timestamp=time.time(),
            sample_ids=request.sample_ids,
            inputs=request.inputs,
            labels=np.asarray(rows, dtype=np.float32),
            label_kind=kind,
            top_k=top_k,
        )
        body = encode_update(update)
        key = self._key(device)
        if key is None:
            return body
        topic = RequestTopics.for_device(device, self.config.prefix).labels
        return sign(key, topic, body)

    def _key(self, device: str) -> bytes | None:
        if self.config.keys_dir is None:
            return None
        # A missing or unusable key is looked for again on the next request,
        # so a key added, fixed or replaced while the hub runs is used from
        # then on.
        path = Path(self.config.keys_dir) / f"{device}.key"
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is not None:
            version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            cached = self._keys.get(device)
            if cached is not None and cached[0] == version:
                return cached[1]
        self._keys.pop(device, None)
        if not key_file_present(path):
            return None
        key = load_key(path)
        if stat is not None:
            self._keys[device] = (version, key)
        self._key_log.forget(device)
        return key

    def _send(self, replies: list[_Reply]) -> None:
        if not replies:
            return
        stored = [
            (reply.key, reply.status, reply.payload)
            for reply in replies
            if reply.stored and reply.key.request_id
        ]
        refunds = [
            reply.key
            for reply in replies
            if reply.refund and reply.stored and reply.key.request_id
        ]
        released = [reply.key for reply in replies if reply.release]
        self.state.record_answers(
            stored,
            time.time(),
            refunds=refunds,
            released=released,
            privacy=self.config.privacy,
        )
        assert self.client is not None
        sent = []
        for reply in replies:
            properties = response_properties(
                reply.key.request_id, reply.status, reply.retry_after_s
            )
            sent.append(
                self.client.publish(
                    reply.item.response_topic or "",
                    reply.payload,
                    qos=1,
                    properties=properties,
                )
            )
        for info in sent:
            try:
                info.wait_for_publish(timeout=PUBLISH_TIMEOUT_S)
                self.progress.beat()
            except RuntimeError as error:
                if info.rc not in _CONNECTION_LOST:
                    raise
                # paho-mqtt 2.2.0 stores a QoS 1 message in its outgoing queue
                # before sending it, and resends the queue when this client
                # reconnects, so the responses are delayed, not lost.
                raise BrokerError(
                    f"the broker connection was lost while {len(sent)} responses "
                    "were sent; paho keeps the unsent ones queued and sends them "
                    "when the worker reconnects, unless it stops first"
                ) from error


# paho return codes of a publish made or cut off without a broker connection.
_CONNECTION_LOST = (mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_CONN_LOST)


def _same_request(first: RequestKey, second: RequestKey) -> bool:
    """Return True when both keys name one request of one device."""
    return first.device == second.device and first.request_id == second.request_id


def _first_repeat(ids: list[str]) -> str | None:
    """Return the first id that occurs twice, or None when all differ."""
    if len(set(ids)) == len(ids):
        return None
    seen: set[str] = set()
    for sample_id in ids:
        if sample_id in seen:
            return sample_id
        seen.add(sample_id)
    return None
