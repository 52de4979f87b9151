"""The device side of label requests: select samples, send requests, match responses.

The device runs its student on the inputs it receives. ``select_samples`` picks the
ones it is unsure about: a low top-1 probability (least confidence), or a
large total variation distance between the student and a reference model on
the device, such as the teacher copy in its bundle. ``LabelRequester`` turns
them into a request (``label_protocol``), keeps it pending until a response
with the same correlation data arrives, and publishes it again after a
timeout. mosquitto 2.0.11 does not pass a shared-subscription message to
another hub worker when the worker that received it dies, so the resend is
what guarantees an answer when the hub cannot recover the request itself.

A request is finished by its first response. Later responses with the same
correlation data are counted as duplicates and dropped, so the student
trains at most once per request. The hub uses the request id as the message
id of the labels it sends, which the daemon's applied-id record also checks.

Thread safety: every public method takes one lock, so ``match`` can run on
the MQTT network thread while the trainer thread calls ``propose`` and
``due``.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import paho.mqtt.client as mqtt

from dslo_edge.errors import ConfigError, InvalidUpdate
from dslo_edge.label_protocol import (
    MAX_SAMPLE_ID_BYTES,
    RETRY_AFTER_PROPERTY,
    STATUS_BUDGET_EXHAUSTED,
    STATUS_OK,
    STATUS_PROPERTY,
    STATUS_RATE_LIMITED,
    STATUS_REJECTED,
    LabelRequest,
    RequestTopics,
    correlation_of,
    encode_request,
    request_properties,
    user_properties,
)
from dslo_edge.protocol import SoftLabelUpdate
from dslo_edge.repeat_log import RepeatLimiter, repeats_note
from dslo_edge.signing import verified_body

logger = logging.getLogger(__name__)

SELECTION_RULES = ("confidence", "disagreement", "either")
# Kinds of Response.kind besides the response statuses.
DUPLICATE = "duplicate"
UNEXPECTED = "unexpected"
MAX_LOGGED_MESSAGE_BYTES = 300
# Finished request ids remembered to tell a duplicate from a stray response.
FINISHED_MEMORY = 4096
# A rejection with the same status and message as one logged less than this
# many seconds ago is only counted. The next line logged for it gives the count.
REPEAT_LOG_INTERVAL_S = 60.0
# Hex ids and numbers, replaced by "#" before two messages are compared.
VARIABLE_PART = re.compile(r"\b[0-9a-fA-F]{8,}\b|\d+(?:\.\d+)?")
# Distinct rejection messages remembered for that. Beyond it, all are forgotten.
REPEAT_LOG_MEMORY = 64
LATENCY_WINDOW = 1024


class RequestPublisher(Protocol):
    """The part of an MQTT client that ``LabelRequester.publish`` uses."""

    def publish(
        self, topic: str, payload: bytes, qos: int = ..., properties: Any = ...
    ) -> Any: ...


@dataclass(frozen=True)
class SelectionSettings:
    """Which samples a device requests labels for.

    Attributes:
        rule: ``confidence`` selects samples whose student top-1 probability
            is below ``max_confidence``; ``disagreement`` those whose total
            variation distance to the reference probabilities is at least
            ``min_disagreement``; ``either`` selects by both.
        max_confidence: top-1 probability below which a sample is uncertain.
        min_disagreement: total variation distance, in [0, 1], from which
            the student and the reference disagree.
        max_samples: samples per request; the most uncertain are kept.
    """

    rule: str = "either"
    max_confidence: float = 0.6
    min_disagreement: float = 0.3
    max_samples: int = 32

    def __post_init__(self) -> None:
        if self.rule not in SELECTION_RULES:
            raise ConfigError(
                f"invalid selection rule {self.rule!r}: expected one of "
                f"{', '.join(SELECTION_RULES)}"
            )
        if not 0.0 < self.max_confidence <= 1.0:
            raise ConfigError(
                f"invalid max_confidence {self.max_confidence!r}: expected (0, 1]"
            )
        if not 0.0 <= self.min_disagreement <= 1.0:
            raise ConfigError(
                f"invalid min_disagreement {self.min_disagreement!r}: expected [0, 1]"
            )
        if self.max_samples < 1:
            raise ConfigError(
                f"invalid max_samples {self.max_samples!r}: expected at least 1"
            )


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Return the total variation distance ``0.5 * sum |p - q|`` of each row."""
    return 0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum(1)


def select_samples(
    student: np.ndarray,
    settings: SelectionSettings,
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """Return the indices of the samples to request, most uncertain first.

    Args:
        student: student probabilities, shape (N, K).
        settings: the selection rule and thresholds.
        reference: probabilities of a reference model on the device, shape
            (N, K). Without it the disagreement rule selects nothing, and
            ``either`` falls back to confidence alone.
    """
    rows = np.asarray(student, dtype=np.float64)
    doubt = 1.0 - rows.max(axis=1)
    selected = np.zeros(len(rows), dtype=bool)
    score = np.zeros(len(rows))
    if settings.rule in ("confidence", "either"):
        selected |= rows.max(axis=1) < settings.max_confidence
        score = np.maximum(score, doubt)
    if reference is not None and settings.rule in ("disagreement", "either"):
        distance = total_variation(rows, reference)
        selected |= distance >= settings.min_disagreement
        score = np.maximum(score, distance)
    candidates = np.flatnonzero(selected)
    order = np.argsort(-score[candidates], kind="stable")
    return candidates[order][: settings.max_samples]


@dataclass(frozen=True)
class RequestSettings:
    """Timeouts and limits of the requests a device keeps open.

    Attributes:
        timeout_s: wait this long for a response before sending the request
            again; each further attempt waits twice as long.
        max_attempts: sends per request, the first included, before the
            request is given up as timed out.
        max_pending: requests waiting for a response at once.
        budget_backoff_s: how long to stop asking after the hub reports
            that the device's privacy budget is spent.
    """

    timeout_s: float = 5.0
    max_attempts: int = 4
    max_pending: int = 8
    budget_backoff_s: float = 3600.0


@dataclass(eq=False)
class PendingRequest:
    """A request that waits for its response."""

    request: LabelRequest
    payload: bytes
    first_sent: float
    next_due: float
    attempts: int = 1


@dataclass(eq=False)
class Response:
    """A response matched against the pending requests.

    Attributes:
        kind: a response status (``ok``, ``rate_limited``, ...), or
            ``duplicate`` for a second response to a finished request, or
            ``unexpected`` for one that matches no request.
        request: the request it responds to; None for ``unexpected``.
        payload: the message payload.
        latency_s: seconds from the first send to this response.
    """

    kind: str
    request: LabelRequest | None
    payload: bytes
    latency_s: float = 0.0


@dataclass
class RequestCounters:
    """Counts of requests and responses since the requester was created."""

    sent: int = 0
    resent: int = 0
    # Responses whose labels the device applied. An ok response that the
    # device rejects, such as one with a bad signature, is not counted here
    # but in the metrics report's rejected counts, under its reason.
    answered: int = 0
    rate_limited: int = 0
    budget_exhausted: int = 0
    rejected: int = 0
    timed_out: int = 0
    duplicates: int = 0
    unexpected: int = 0
    # Seconds from first send to response of the latest answered requests.
    latencies_s: deque[float] = field(
        default_factory=lambda: deque(maxlen=LATENCY_WINDOW)
    )

    def counts(self) -> dict[str, int]:
        """Return each counter by name, without the latencies."""
        return {
            "sent": self.sent,
            "resent": self.resent,
            "answered": self.answered,
            "rate_limited": self.rate_limited,
            "budget_exhausted": self.budget_exhausted,
            "rejected": self.rejected,
            "timed_out": self.timed_out,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
        }


class LabelRequester:
    """Pending label requests of one device, with resend and matching.

    Args:
        device_id: the device's id, one topic level.
        prefix: the topic prefix shared with the hub.
        selection: which samples to request.
        settings: timeouts and limits.
        clock: monotonic seconds; tests pass a fake one.
    """

    def __init__(
        self,
        device_id: str,
        prefix: str = "dslo",
        selection: SelectionSettings | None = None,
        settings: RequestSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.device_id = device_id
        self.topics = RequestTopics.for_device(device_id, prefix)
        self.selection = selection or SelectionSettings()
        self.settings = settings or RequestSettings()
        self.counters = RequestCounters()
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[bytes, PendingRequest] = {}
        self._finished: OrderedDict[bytes, None] = OrderedDict()
        self._blocked_until = 0.0
        self._rejection_log = RepeatLimiter(
            REPEAT_LOG_INTERVAL_S, REPEAT_LOG_MEMORY, clock
        )

    @property
    def pending(self) -> int:
        """Requests waiting for a response."""
        with self._lock:
            return len(self._pending)

    def blocked_for(self) -> float:
        """Return the seconds left before the hub accepts requests again."""
        with self._lock:
            return max(0.0, self._blocked_until - self._clock())

    def propose(
        self,
        sample_ids: list[str],
        inputs: np.ndarray,
        student: np.ndarray,
        reference: np.ndarray | None = None,
    ) -> PendingRequest | None:
        """Select uncertain samples and open a request for them.

        Returns None when no uncertain sample has an id that a request can
        carry, the hub asked the device to wait, or ``max_pending`` requests
        are open already. The caller then publishes the returned request with
        ``publish``.
        """
        candidates = select_samples(student, self.selection, reference)
        chosen = self._requestable(candidates, sample_ids)
        if len(chosen) == 0:
            return None
        return self.open([sample_ids[i] for i in chosen], np.asarray(inputs)[chosen])

    def _requestable(self, chosen: np.ndarray, sample_ids: list[str]) -> list[int]:
        """Keep the chosen samples whose ids the hub's labels update can carry.

        An update may not repeat an id or carry one of more than 255 bytes of
        UTF-8, so the device would reject the labels for such samples. They
        are left out of the request, except the first sample of a repeated id.
        """
        usable: list[int] = []
        seen: set[str] = set()
        for index in chosen:
            sample_id = sample_ids[index]
            try:
                size = len(sample_id.encode("utf-8"))
            except UnicodeEncodeError:
                continue
            if size > MAX_SAMPLE_ID_BYTES or sample_id in seen:
                continue
            seen.add(sample_id)
            usable.append(int(index))
        if len(usable) < len(chosen):
            logger.warning(
                "Device %s left %d of %d uncertain samples out of a label request "
                "because their ids repeat, are not UTF-8 text or are longer than "
                "%d bytes; give each inference input its own shorter id",
                self.device_id,
                len(chosen) - len(usable),
                len(chosen),
                MAX_SAMPLE_ID_BYTES,
            )
        return usable

    def open(self, sample_ids: list[str], inputs: np.ndarray) -> PendingRequest | None:
        """Open a request for these samples, bypassing the selection rule."""
        with self._lock:
            now = self._clock()
            full = len(self._pending) >= self.settings.max_pending
            if full or now < self._blocked_until:
                return None
            request = LabelRequest(
                uuid.uuid4().bytes, time.time(), list(sample_ids), np.asarray(inputs)
            )
            pending = PendingRequest(
                request,
                encode_request(request),
                first_sent=now,
                next_due=now + self.settings.timeout_s,
            )
            self._pending[request.request_id] = pending
            self.counters.sent += 1
            return pending

    def publish(self, client: RequestPublisher, pending: PendingRequest) -> None:
        """Publish a request at QoS 1 with its response topic and correlation.

        The request expires on the broker when this device gives it up, so
        a hub worker that returns from an outage later does not label and
        charge requests whose responses the device would drop.
        """
        settings = self.settings
        give_up_at = pending.first_sent + settings.timeout_s * (
            2**settings.max_attempts - 1
        )
        expiry_s = max(1, math.ceil(give_up_at - self._clock()))
        client.publish(
            self.topics.requests,
            pending.payload,
            qos=1,
            properties=request_properties(
                self.topics.labels, pending.request.request_id, expiry_s
            ),
        )

    def due(self) -> list[PendingRequest]:
        """Return the requests to send again now, and give up on exhausted ones.

        Each returned request counts as resent; publish it with ``publish``.
        """
        with self._lock:
            now = self._clock()
            resend: list[PendingRequest] = []
            for request_id, pending in list(self._pending.items()):
                if now < pending.next_due:
                    continue
                if pending.attempts >= self.settings.max_attempts:
                    self._finish(request_id)
                    self.counters.timed_out += 1
                    logger.warning(
                        "Device %s gave up label request %s after %d attempts "
                        "without a response on %s; check that a hub worker "
                        "with [requests] enabled = true runs on this broker and "
                        "reads %s, which needs the device's mqtt.topic_prefix",
                        self.device_id,
                        pending.request.request_id_hex,
                        pending.attempts,
                        self.topics.labels,
                        self.topics.requests,
                    )
                    continue
                pending.attempts += 1
                wait = self.settings.timeout_s * 2 ** (pending.attempts - 1)
                pending.next_due = now + wait
                self.counters.resent += 1
                resend.append(pending)
            return resend

    def match(self, message: mqtt.MQTTMessage) -> Response:
        """Match a message from the labels topic with its pending request."""
        request_id = correlation_of(message.properties)
        properties = user_properties(message.properties)
        status = properties.get(STATUS_PROPERTY, STATUS_OK)
        payload = bytes(message.payload)
        with self._lock:
            pending = self._pending.get(request_id) if request_id else None
            if pending is None:
                known = request_id is not None and request_id in self._finished
                self.counters.duplicates += known
                self.counters.unexpected += not known
                return Response(DUPLICATE if known else UNEXPECTED, None, payload)
            now = self._clock()
            self._finish(pending.request.request_id)
            latency = now - pending.first_sent
            self._count(status, properties, now)
            blocked_s = max(0.0, self._blocked_until - now)
        if status != STATUS_OK:
            self._log_rejection(status, pending.request, payload, blocked_s)
        return Response(status, pending.request, payload, latency)

    def _log_rejection(
        self, status: str, request: LabelRequest, payload: bytes, blocked_s: float
    ) -> None:
        # The hub sends a short UTF-8 message with every status other than ok.
        text = payload[:MAX_LOGGED_MESSAGE_BYTES].decode("utf-8", "replace")
        request_id = request.request_id.hex()
        if status == STATUS_RATE_LIMITED:
            logger.info(
                "Hub rate-limited label request %s of device %s; the next "
                "request waits %.1f s",
                request_id,
                self.device_id,
                blocked_s,
            )
        elif status == STATUS_BUDGET_EXHAUSTED:
            logger.warning(
                "Hub rejected label request %s of device %s because the privacy "
                "budget is spent (%s); no label requests for %.0f s",
                request_id,
                self.device_id,
                text,
                blocked_s,
            )
        else:
            skipped = self._skip_repeat(status, text)
            if skipped is None:
                return
            logger.warning(
                "Hub responded to label request %s of device %s with status %s: %s%s",
                request_id,
                self.device_id,
                status,
                text,
                repeats_note(skipped, "such response"),
            )

    def _skip_repeat(self, status: str, text: str) -> int | None:
        """Return None to skip logging a repeated rejection, else the count skipped.

        Messages that differ only in numbers or hex ids, such as a request id
        or a sample count, count as repeats of each other.
        """
        return self._rejection_log.skipped_before(
            (status, VARIABLE_PART.sub("#", text))
        )

    def record_answered(self, latency_s: float) -> None:
        """Count an ok response whose labels the device applied.

        Args:
            latency_s: the response's ``latency_s``, seconds from the first
                send of its request.
        """
        with self._lock:
            self.counters.answered += 1
            self.counters.latencies_s.append(latency_s)

    def _count(self, status: str, properties: dict[str, str], now: float) -> None:
        # An ok response is counted by ``record_answered`` once its labels
        # are applied, because verification or validation may still reject it.
        if status == STATUS_OK:
            return
        if status == STATUS_RATE_LIMITED:
            self.counters.rate_limited += 1
            self._blocked_until = max(
                self._blocked_until, now + _retry_after(properties)
            )
        elif status == STATUS_BUDGET_EXHAUSTED:
            self.counters.budget_exhausted += 1
            self._blocked_until = now + self.settings.budget_backoff_s
        else:
            self.counters.rejected += 1

    def _finish(self, request_id: bytes) -> None:
        self._pending.pop(request_id, None)
        self._finished[request_id] = None
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def labels_update(
        self,
        response: Response,
        decode: Callable[[bytes], SoftLabelUpdate],
        hmac_key: bytes | None = None,
    ) -> SoftLabelUpdate:
        """Verify and decode the labels of an ``ok`` response.

        Args:
            response: a response of kind ``ok`` from ``match``.
            decode: decodes and validates an update payload, such as
                ``Trainer.decode``.
            hmac_key: the device's key when it requires signed updates; the
                signature covers the labels topic.

        Raises:
            InvalidUpdate: the payload fails verification or validation, or
                it labels other samples than the request asked for (reason
                ``response_mismatch``).
        """
        if response.kind != STATUS_OK or response.request is None:
            raise ValueError(f"response of kind {response.kind!r} carries no labels")
        body = verified_body(hmac_key, self.topics.labels, response.payload)
        update = decode(body)
        request = response.request
        if (
            update.message_id != request.request_id
            or update.sample_ids != request.sample_ids
        ):
            raise InvalidUpdate(
                "response_mismatch",
                f"labels for request {request.request_id_hex} carry message id "
                f"{update.message_id_hex} and {update.sample_count} samples; "
                f"expected the request id and its {request.sample_count} samples",
                update.message_id_hex,
            )
        return update


def _retry_after(properties: dict[str, str]) -> float:
    try:
        value = float(properties.get(RETRY_AFTER_PROPERTY, "1"))
    except ValueError:
        return 1.0
    return min(max(value, 0.0), 3600.0)


__all__ = [
    "DUPLICATE",
    "STATUS_BUDGET_EXHAUSTED",
    "STATUS_OK",
    "STATUS_RATE_LIMITED",
    "STATUS_REJECTED",
    "UNEXPECTED",
    "LabelRequester",
    "PendingRequest",
    "RequestCounters",
    "RequestSettings",
    "Response",
    "SelectionSettings",
    "select_samples",
    "total_variation",
]
