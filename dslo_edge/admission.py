"""Checks an update passes before the trainer may apply it.

In order: the HMAC envelope (verified with the device's key, or rejected
when the device has none), decoding and validation against the model, the
applied-id record, and the freshness window. Each failure raises
``InvalidUpdate`` with its own reason.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import numpy as np

from dslo_edge.applied_ids import AppliedIds
from dslo_edge.config import TrainingSettings
from dslo_edge.errors import InvalidUpdate
from dslo_edge.multihead import AnyUpdate, MultiHeadTrainer
from dslo_edge.multihead_protocol import payload_message_id
from dslo_edge.protocol import MAGIC
from dslo_edge.signing import HEADER_BYTES as SIGNED_HEADER_BYTES
from dslo_edge.signing import SIGNED_MAGIC, verified_body
from dslo_edge.trainer import Trainer

DUPLICATE = "duplicate"
STALE = "stale"
CLOCK_SKEW = "clock_skew"
OUT_OF_RANGE = "out_of_range"
TRAIN_ERROR = "train_error"
REJECTION_LOG_LIMIT = 10
REJECTION_LOG_WINDOW_S = 60.0


@dataclass(frozen=True)
class Received:
    """One MQTT message waiting for the trainer.

    ``response`` is set for the response to one of the device's label requests
    (a ``label_requests.Response``). Its labels are checked against the
    request instead of the update topic's signature.
    """

    payload: bytes
    mid: int
    qos: int
    received_at: float
    response: Any = None
    # Broker session the message came in; its packet id is valid only there.
    epoch: int = 0
    # Number of the connection it came in (``MqttConnection.connects``).
    connection: int = 0


def admit(
    item: Received,
    trainer: Trainer | MultiHeadTrainer,
    applied_ids: AppliedIds,
    settings: TrainingSettings,
    *,
    hmac_key: bytes | None,
    topic: str,
    max_abs_input: float = float("inf"),
    dropped_ids: Container[bytes] = (),
) -> AnyUpdate:
    """Return the decoded update if it may be applied, else raise InvalidUpdate.

    ``dropped_ids`` are the ids of updates that a rollback dropped. Their
    copies are rejected as duplicates, like copies of applied updates.
    """
    try:
        body = verified_body(hmac_key, topic, item.payload)
    except InvalidUpdate as error:
        error.message_id = error.message_id or readable_message_id(item.payload)
        raise
    update = trainer.decode(body)
    check_input_range(update, max_abs_input)
    check_new_and_fresh(
        update, item.received_at, applied_ids, settings, dropped_ids=dropped_ids
    )
    return update


def readable_message_id(payload: bytes) -> str | None:
    """Return the hex message id of an update payload, signed or not, if it has one.

    Only for naming a rejected update in the log: the id of a payload that
    failed its signature check is not authenticated.
    """
    if payload.startswith(SIGNED_MAGIC):
        payload = payload[SIGNED_HEADER_BYTES:]
    if not payload.startswith(MAGIC):
        return None
    return payload_message_id(payload)


def check_input_range(update: AnyUpdate, max_abs_input: float) -> None:
    """Reject inputs of a magnitude no real sensor sends, such as 1e38."""
    peak = getattr(update, "input_peak", None)
    largest = float(np.abs(update.inputs).max()) if peak is None else peak
    if largest > max_abs_input:
        magnitude_text, limit_text = distinct_figures(largest, max_abs_input)
        raise InvalidUpdate(
            OUT_OF_RANGE,
            f"an input has magnitude {magnitude_text}, above limits.max_abs_input = "
            f"{limit_text}; raise the limit if the model expects that",
            update.message_id_hex,
        )


def distinct_figures(value: float, limit: float) -> tuple[str, str]:
    """Format both numbers with 3 significant digits, or more until they differ."""
    digits = 3
    while digits < 17 and f"{value:.{digits}g}" == f"{limit:.{digits}g}":
        digits += 1
    return f"{value:.{digits}g}", f"{limit:.{digits}g}"


def check_new_and_fresh(
    update: AnyUpdate,
    received_at: float,
    applied_ids: AppliedIds,
    settings: TrainingSettings,
    *,
    dropped_ids: Container[bytes] = (),
) -> None:
    """Reject an update already applied or dropped, too old, or from the future."""
    if not math.isfinite(update.timestamp):
        raise InvalidUpdate(
            "non_finite",
            f"timestamp is {update.timestamp}, expected Unix seconds",
            update.message_id_hex,
        )
    if update.message_id in applied_ids:
        raise InvalidUpdate(DUPLICATE, "already applied", update.message_id_hex)
    if update.message_id in dropped_ids:
        raise InvalidUpdate(
            DUPLICATE, "dropped by an earlier rollback", update.message_id_hex
        )
    age = received_at - update.timestamp
    if age > settings.max_age_s:
        raise InvalidUpdate(
            STALE,
            f"published {_format_seconds(age)} s ago, older than "
            f"max_age_s = {_format_seconds(settings.max_age_s)}",
            update.message_id_hex,
        )
    if -age > settings.max_clock_skew_s:
        raise InvalidUpdate(
            CLOCK_SKEW,
            f"timestamp is {_format_seconds(-age)} s in the future, more than "
            f"max_clock_skew_s = {_format_seconds(settings.max_clock_skew_s)}; "
            "check the hub's clock",
            update.message_id_hex,
        )


def _format_seconds(value: float) -> str:
    """Format seconds so that a limit below 1 s does not print as 0.

    A forged timestamp such as 1e300 prints with an exponent, not as a
    301-digit number.
    """
    if 100 <= abs(value) < 1e10:
        return f"{value:.0f}"
    return f"{value:.3g}"


class RejectionLog:
    """Logs at most ``limit`` rejections per reason per window, then a count."""

    def __init__(
        self, limit: int = REJECTION_LOG_LIMIT, window_s: float = REJECTION_LOG_WINDOW_S
    ):
        self.limit = limit
        self.window_s = window_s
        self._windows: dict[str, tuple[float, int]] = {}

    def should_log(self, reason: str, now: float) -> tuple[bool, int]:
        """Return whether to log this one and how many were suppressed before it."""
        start, count = self._windows.get(reason, (now, 0))
        if now - start >= self.window_s:
            suppressed = max(0, count - self.limit)
            self._windows[reason] = (now, 1)
            return True, suppressed
        self._windows[reason] = (start, count + 1)
        return count < self.limit, 0


class AckLedger:
    """PUBACKs held back until two checkpoint generations contain the update.

    ``add`` records a handled message. ``saved`` is called after each
    successful checkpoint and returns the acknowledgements that are now safe
    to send, in arrival order, because MQTT requires that order. Entries are
    ``(packet id, QoS, session epoch)``.
    """

    def __init__(self) -> None:
        # Each entry also records whether the message was rejected as a
        # duplicate, which only a rollback to an older generation needs.
        self._unsaved: list[tuple[int, int, int, bool]] = []
        self._saved_once: list[tuple[int, int, int, bool]] = []

    def __len__(self) -> int:
        return len(self._unsaved) + len(self._saved_once)

    @property
    def only_unsaved(self) -> bool:
        """True when nothing waits for a second generation."""
        return not self._saved_once

    def add(self, mid: int, qos: int, epoch: int = 0) -> None:
        self._unsaved.append((mid, qos, epoch, False))

    def mark_duplicate(self) -> None:
        """Mark the message added last as rejected for an already applied id."""
        mid, qos, epoch, _ = self._unsaved[-1]
        self._unsaved[-1] = (mid, qos, epoch, True)

    def saved(self) -> list[tuple[int, int, int]]:
        ready, self._saved_once, self._unsaved = self._saved_once, self._unsaved, []
        return _entries(ready)

    def release_unsaved(self) -> list[tuple[int, int, int]]:
        """Return the unsaved group for sending now (nothing in it changed state)."""
        ready, self._unsaved = self._unsaved, []
        return _entries(ready)

    def forget_for_older_generation(self) -> int:
        """Drop, unacknowledged, what a generation before the newest may lack.

        That is the group saved once, which is in the newest generation
        only, and the unsaved messages rejected as duplicates, whose first
        copy may be in that group or in the newest generation only. The
        broker delivers them again after the next reconnect.

        Returns:
            The number of messages dropped.
        """
        still_unsaved = [entry for entry in self._unsaved if not entry[3]]
        count = len(self._saved_once) + len(self._unsaved) - len(still_unsaved)
        self._saved_once, self._unsaved = [], still_unsaved
        return count

    def release_all(self) -> list[tuple[int, int, int]]:
        ready = self._saved_once + self._unsaved
        self._saved_once, self._unsaved = [], []
        return _entries(ready)


def _entries(ledger: list[tuple[int, int, int, bool]]) -> list[tuple[int, int, int]]:
    return [(mid, qos, epoch) for mid, qos, epoch, _ in ledger]
