"""Counters and latency windows the daemon reports on its metrics topic."""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

# Histogram bucket edges in milliseconds, a 1-2-5 series from 10 us to 100 s.
# Samples below the first edge count in the first bucket and samples above
# the last edge in the last one.
HISTOGRAM_EDGES_MS = tuple(
    round(mantissa * 10.0**exponent, 2)
    for exponent in range(-2, 5)
    for mantissa in (1, 2, 5)
) + (100_000.0,)


class LatencyWindow:
    """The last ``size`` latency samples in milliseconds, with percentiles.

    The samples sit in a preallocated ring buffer. A report sorts a copy
    once and reads the percentiles and the histogram from it, because the
    daemon reports after every few updates.
    """

    def __init__(self, size: int = 2048):
        if size < 1:
            raise ValueError(f"window size must be at least 1, got {size}")
        self._samples = np.zeros(size, dtype=np.float64)
        self._added = 0

    def add(self, milliseconds: float) -> None:
        self._samples[self._added % len(self._samples)] = milliseconds
        self._added += 1

    def _sorted(self) -> np.ndarray:
        return np.sort(self._samples[: min(self._added, len(self._samples))])

    def percentiles(self) -> dict[str, float | None]:
        return _percentiles(self._sorted())

    def histogram(self) -> dict[str, list[float] | list[int]]:
        """Return sample counts per bucket between ``HISTOGRAM_EDGES_MS``."""
        return _histogram(self._sorted())

    def summary(self) -> dict[str, Any]:
        """Return the percentiles together with the histogram."""
        ordered = self._sorted()
        report: dict[str, Any] = dict(_percentiles(ordered))
        report["histogram"] = _histogram(ordered)
        return report


_QUANTILES = np.array([0.50, 0.95, 0.99])
_INNER_EDGES = np.asarray(HISTOGRAM_EDGES_MS[1:-1])


def _percentiles(ordered: np.ndarray) -> dict[str, float | None]:
    """Return p50, p95 and p99 of sorted samples, interpolated as np.percentile."""
    count = len(ordered)
    if not count:
        return {"p50": None, "p95": None, "p99": None, "count": 0}
    position = _QUANTILES * (count - 1)
    below = np.floor(position).astype(np.intp)
    above = np.minimum(below + 1, count - 1)
    low, high = ordered[below], ordered[above]
    p50, p95, p99 = (low + (high - low) * (position - below)).tolist()
    return {
        "p50": round(p50, 3),
        "p95": round(p95, 3),
        "p99": round(p99, 3),
        "count": count,
    }


def _histogram(ordered: np.ndarray) -> dict[str, list[float] | list[int]]:
    """Return counts per bucket of sorted samples, clipped to the outer edges."""
    # Bucket i counts edges[i] <= v < edges[i + 1]. Samples below the first
    # edge count in the first bucket and samples from the last inner edge up
    # in the last one, as np.histogram of the clipped samples counts them.
    starts = np.searchsorted(ordered, _INNER_EDGES, side="left")
    bounds = np.concatenate(([0], starts, [len(ordered)]))
    return {"edges_ms": list(HISTOGRAM_EDGES_MS), "counts": np.diff(bounds).tolist()}


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MiB.

    Reads VmHWM from /proc where it exists: getrusage's ru_maxrss survives
    exec on Linux, so a daemon started by a large parent would report the
    parent's peak.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            text = status.read()
    except OSError:
        text = b""
    start = text.find(b"VmHWM:")
    if start >= 0:
        end = text.find(b"kB", start)
        return round(int(text[start + 6 : end]) / 1024, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    divisor = 1024 * 1024 if sys.platform == "darwin" else 1024
    return round(peak / divisor, 1)


class DaemonMetrics:
    """Thread-safe counters for updates applied, rejected and dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.applied = 0
        self.samples_applied = 0
        self.rejected: Counter[str] = Counter()
        self.last_loss: float | None = None
        self.last_mean_alpha: float | None = None
        # Unix seconds when the latest update was applied or rejected.
        self.last_processed_at: float | None = None
        self.train_ms = LatencyWindow()
        self.end_to_end_ms = LatencyWindow()
        # These windows split the device time before an update's train step.
        self.queue_ms = LatencyWindow()
        self.admit_ms = LatencyWindow()
        self.prepare_ms = LatencyWindow()

    def record_applied(
        self,
        samples: int,
        loss: float,
        mean_alpha: float,
        train_ms: float,
        e2e_ms: float,
        prepare_ms: float | None = None,
    ) -> None:
        with self._lock:
            self.last_processed_at = time.time()
            self.applied += 1
            self.samples_applied += samples
            self.last_loss = loss
            self.last_mean_alpha = mean_alpha
            self.train_ms.add(train_ms)
            self.end_to_end_ms.add(e2e_ms)
            if prepare_ms is not None:
                self.prepare_ms.add(prepare_ms)

    def forget_loss(self) -> None:
        """Report no loss until the next update, after a rollback dropped its source."""
        with self._lock:
            self.last_loss = None

    def record_admission(self, queue_ms: float, admit_ms: float) -> None:
        """Record the time an update waited in the queue and its admission time.

        Admission is signature check, decoding, validation and the checks for
        repeats, age and input range.
        """
        with self._lock:
            self.queue_ms.add(queue_ms)
            self.admit_ms.add(admit_ms)

    def record_rejected(self, reason: str) -> None:
        with self._lock:
            self.last_processed_at = time.time()
            self.rejected[reason] += 1

    def rejected_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.rejected)

    def restore_rejected(self, counts: dict[str, int]) -> None:
        """Continue counting rejections from a checkpoint's totals."""
        with self._lock:
            self.rejected.update({str(k): int(v) for k, v in counts.items()})

    @property
    def processed(self) -> int:
        """Updates handled so far, applied or rejected."""
        with self._lock:
            return self.applied + sum(self.rejected.values())

    def snapshot(
        self, device_id: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        with self._lock:
            report: dict[str, Any] = {
                "device": device_id,
                "timestamp": time.time(),
                "applied": self.applied,
                "samples_applied": self.samples_applied,
                "rejected": dict(self.rejected),
                "processed": self.applied + sum(self.rejected.values()),
                "last_processed_at": self.last_processed_at,
                "loss": self.last_loss,
                "mean_alpha": self.last_mean_alpha,
                "train_ms": self.train_ms.summary(),
                "end_to_end_ms": self.end_to_end_ms.summary(),
                "stage_ms": {
                    "queue": self.queue_ms.percentiles(),
                    "admit": self.admit_ms.percentiles(),
                    "prepare": self.prepare_ms.percentiles(),
                },
                "peak_rss_mb": peak_rss_mb(),
            }
        if extra:
            report.update(extra)
        return report
