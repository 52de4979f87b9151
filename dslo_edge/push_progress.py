"""A push's progress on the device, read from its retained status and metrics.

The device's counters are totals: ``applied_total`` and ``rejected`` (per
reason) are kept in its checkpoints, and ``processed_total`` is their sum. A
push reads them before it publishes and counts only the difference.
NOTE: updates from other sources, such as another push or label requests,
that the device handles meanwhile are counted as this push's updates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dslo_edge.errors import BrokerError
from dslo_edge.protocol import STATUS_OFFLINE

if TYPE_CHECKING:
    from dslo_edge.hub import HubClient

logger = logging.getLogger(__name__)

BASELINE_TIMEOUT_S = 10.0
# How long to wait for a retained status once the retained metrics arrived.
STATUS_GRACE_S = 1.0

# The device applied an update with this message id before. After a restart
# or a reconnect the broker delivers unacknowledged updates again, and the
# device rejects these copies with this reason, so they do not fail a push.
DUPLICATE = "duplicate"

REJECTION_HINTS = {
    "unsigned": "the device requires signed updates: pass --hmac-key-file",
    "bad_signature": "the signature does not verify: pass the device's own key",
    "unexpected_signature": "the device has no HMAC key: set its "
    "security.hmac_key_file or push without --hmac-key-file",
    "shape_mismatch": "the device runs another model: push with its bundle",
    "too_large": "an update was longer than the device's "
    "limits.max_payload_bytes: push with a smaller --batch-size",
    "out_of_range": "an input's magnitude exceeded the device's "
    "limits.max_abs_input: check how --data is scaled",
    "stale": "updates arrived older than the device's training.max_age_s: "
    "check that the hub's clock is not behind the device's, or raise max_age_s",
    "clock_skew": "update timestamps were ahead of the device's clock by more "
    "than its training.max_clock_skew_s: synchronise the hub's and the "
    "device's clocks (NTP)",
}


def processed_count(metrics: dict[str, Any]) -> int:
    """Return the device's count of handled updates, kept across restarts.

    ``processed_total`` includes updates applied or rejected before the last
    restart; older daemons only report ``processed``, which restarts at 0.
    """
    return int(metrics.get("processed_total", metrics.get("processed", 0)))


def handled_count(metrics: dict[str, Any]) -> int:
    """Return the updates applied or rejected, not counting duplicate copies."""
    rejected = _rejected_counts(metrics)
    return _applied_count(metrics) + sum(rejected.values()) - rejected.get(DUPLICATE, 0)


def _applied_count(metrics: dict[str, Any]) -> int:
    return int(metrics.get("applied_total", metrics.get("applied", 0)))


def _rejected_counts(metrics: dict[str, Any]) -> dict[str, int]:
    rejected = metrics.get("rejected") or {}
    return {str(reason): int(count) for reason, count in rejected.items()}


@dataclass(frozen=True)
class DeviceCounts:
    """Updates that a device applied, and rejected by reason, during one push."""

    applied: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    @classmethod
    def between(cls, before: dict[str, Any], after: dict[str, Any]) -> DeviceCounts:
        """Return the counts of ``after`` minus those of ``before``."""
        earlier = _rejected_counts(before)
        rejected = {
            reason: count - earlier.get(reason, 0)
            for reason, count in sorted(_rejected_counts(after).items())
            if count > earlier.get(reason, 0)
        }
        applied = max(0, _applied_count(after) - _applied_count(before))
        return cls(applied, rejected)

    @property
    def rejected_count(self) -> int:
        return sum(self.rejected.values())

    @property
    def duplicates(self) -> int:
        """Copies of updates that the device had applied, rejected again."""
        return self.rejected.get(DUPLICATE, 0)

    @property
    def failed(self) -> dict[str, int]:
        """Rejections by reason, without the duplicate copies."""
        return {r: n for r, n in self.rejected.items() if r != DUPLICATE}

    @property
    def failed_count(self) -> int:
        return self.rejected_count - self.duplicates

    def reasons(self, *, failed_only: bool = False) -> str:
        """Return the rejection counts as ``reason: n, ...``."""
        counts = self.failed if failed_only else self.rejected
        return ", ".join(f"{r}: {n}" for r, n in counts.items())

    def describe(self) -> str:
        """Return ``applied A, rejected R (reason: n, ...)``."""
        text = f"applied {self.applied}, rejected {self.rejected_count}"
        return f"{text} ({self.reasons()})" if self.rejected else text

    def hints(self) -> list[str]:
        """Return what to do about each rejection reason that has a known fix."""
        return [REJECTION_HINTS[r] for r in self.rejected if r in REJECTION_HINTS]


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """Return ``count`` and the noun, plural unless the count is 1: ``3 updates``."""
    word = noun if count == 1 else plural or f"{noun}s"
    return f"{count} {word}"


def _unsaved_updates(metrics: dict[str, Any]) -> str:
    """Return the device's reported ``unsaved`` count as ``N update(s)``."""
    unsaved = metrics.get("unsaved")
    # The metrics are the device's JSON, so the value may not be a count.
    if isinstance(unsaved, int) and not isinstance(unsaved, bool):
        return counted(unsaved, "update")
    return f"{unsaved} updates"


def _rolled_back(before: dict[str, Any], metrics: dict[str, Any]) -> bool:
    """Check whether the device rolled back its student since ``before``.

    ``rollbacks`` counts from 0 in each daemon process, so a device that
    restarted (another ``pid``) counts every rollback of its new process.
    """
    count = int(metrics.get("rollbacks") or 0)
    if metrics.get("pid") != before.get("pid"):
        return count > 0
    return count > int(before.get("rollbacks") or 0)


def _rollback_error(hub: HubClient, metrics: dict[str, Any]) -> BrokerError:
    reason = metrics.get("last_rollback") or "its health check failed"
    return BrokerError(
        f"device {hub.device_id} rolled back its student during the push "
        f"({reason}) and dropped the updates it had applied since its last "
        "checkpoint, so part of this push is lost. Check the samples and the "
        "teacher's labels (the device's log names the rollback), then push again"
    )


def key_counters(metrics: dict[str, Any] | None) -> str:
    """Return the few counters that tell how far a device got, as one line."""
    if metrics is None:
        return "no metrics received"
    rejected = _rejected_counts(metrics)
    return (
        f"processed_total {processed_count(metrics)}, applied_total "
        f"{_applied_count(metrics)}, rejected {sum(rejected.values())}, "
        f"queue_depth {metrics.get('queue_depth', 'unknown')}, "
        f"unacknowledged {metrics.get('unacknowledged', 'unknown')}"
    )


def wait_for_baseline(hub: HubClient, timeout: float = BASELINE_TIMEOUT_S) -> dict:
    """Return the device's metrics before a push starts.

    Raises:
        BrokerError: the device's retained status is offline, or it has
            published no metrics within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    metrics_seen_at: float | None = None
    while time.monotonic() < deadline:
        if hub.status == STATUS_OFFLINE:
            raise BrokerError(
                f"device {hub.device_id} is offline (retained status on "
                f"{hub.topics.status}); start its daemon and push again, or push "
                "with --no-wait to leave the updates queued on the broker"
            )
        metrics = hub.latest_metrics
        if metrics is not None:
            metrics_seen_at = metrics_seen_at or time.monotonic()
            if hub.status is not None or (
                time.monotonic() - metrics_seen_at >= STATUS_GRACE_S
            ):
                return dict(metrics)
        time.sleep(0.05)
    raise BrokerError(
        f"device {hub.device_id} has published no metrics within {timeout:.0f} s; "
        "start the daemon ('dslo-edge run') before pushing with --wait, and check "
        "that --device and --topic-prefix match its device.id and "
        "mqtt.topic_prefix"
    )


def wait_for_processed(
    hub: HubClient, before: dict[str, Any], count: int, sent: int, timeout: float
) -> dict[str, Any]:
    """Wait until the device has handled ``count`` more updates than ``before``.

    Duplicate copies do not count, so copies that the broker delivers again
    after a device restart do not end the wait before the push's own
    updates are handled.

    Raises:
        BrokerError: not within ``timeout``; the message has the counts of
            this push and the device's status.
    """
    target = handled_count(before) + count
    try:
        metrics = hub.wait_for_metrics(
            lambda m: handled_count(m) >= target or _rolled_back(before, m), timeout
        )
    except BrokerError:
        latest = hub.latest_metrics or before
        if _rolled_back(before, latest):
            raise _rollback_error(hub, latest) from None
        done = handled_count(latest) - handled_count(before)
        counts = DeviceCounts.between(before, latest)
        raise BrokerError(
            f"device {hub.device_id} processed {done} of the "
            f"{counted(sent, 'update')} sent so far within {timeout:.0f} s "
            f"({counts.describe()}, status {hub.status or 'unknown'}); "
            f"{_stall_hint(latest)}"
        ) from None
    if _rolled_back(before, metrics):
        raise _rollback_error(hub, metrics)
    return metrics


def _stall_hint(metrics: dict[str, Any]) -> str:
    """Return what to do about a device that stopped processing a push."""
    training = metrics.get("training")
    if isinstance(training, dict) and training.get("paused"):
        reason = training.get("reason") or "no reason given"
        return (
            f"the device paused training ({reason}), so the "
            "rest of the updates wait queued until it resumes; push with "
            "--no-wait to leave them queued without waiting"
        )
    return "check the device's log, or raise --timeout"


def wait_for_saved(
    hub: HubClient, before: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Wait until the device has saved every update it applied in a checkpoint.

    The device checks its student before each checkpoint and rolls back
    when the check fails, dropping the updates applied since the last one.
    Until the next checkpoint, applied updates can still be lost. The
    device saves once it has had no update for ``training.checkpoint_idle_s``.
    A device that does not report ``unsaved`` is not waited for, and one
    whose training is paused (battery, heat or energy budget) saves later,
    so the wait ends with a warning.

    Raises:
        BrokerError: the device rolled back, cannot write checkpoints, or
            saved none within ``timeout``.
    """

    def settled(metrics: dict[str, Any]) -> bool:
        return bool(
            not metrics.get("unsaved")
            or _rolled_back(before, metrics)
            or metrics.get("storage_error")
            or (metrics.get("training") or {}).get("paused")
        )

    try:
        metrics = hub.wait_for_metrics(settled, timeout)
    except BrokerError:
        latest = hub.latest_metrics or before
        unsaved = _unsaved_updates(latest)
        raise BrokerError(
            f"device {hub.device_id} applied the updates but saved no checkpoint "
            f"within {timeout:.0f} s ({unsaved} unsaved, "
            f"{key_counters(latest)}). It saves after training.checkpoint_idle_s "
            "without updates: raise --timeout above that, or check the device's log"
        ) from None
    if _rolled_back(before, metrics):
        raise _rollback_error(hub, metrics)
    if not metrics.get("unsaved"):
        return metrics
    storage = metrics.get("storage_error")
    if storage:
        raise BrokerError(
            f"device {hub.device_id} applied the updates but cannot save a "
            f"checkpoint ({storage}); they stay unacknowledged and come again "
            f"after a restart. {_storage_fix(storage)}"
        )
    logger.warning(
        "Device %s paused training (%s) with %s not yet saved, which it saves "
        "when training resumes",
        hub.device_id,
        (metrics.get("training") or {}).get("reason"),
        _unsaved_updates(metrics),
    )
    return metrics


# strerror texts of ENOSPC and EDQUOT, as the daemon reports them.
_FULL_DISK_ERRORS = ("No space left on device", "Disk quota exceeded")


def _storage_fix(storage_error: str) -> str:
    """Return what to do about the device's ``storage_error`` metric."""
    if any(text in storage_error for text in _FULL_DISK_ERRORS):
        return "Free space in the device's state_dir"
    return (
        "Fix the device's state_dir, for example its permissions or a file "
        "where its checkpoints directory belongs; the device's log names the path"
    )
