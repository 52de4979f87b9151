"""Counters and latency windows the daemon reports on its metrics topic."""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections import Counter, deque
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
    """The last ``size`` latency samples in milliseconds, with percentiles."""

    def __init__(self, size: int = 2048):
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, milliseconds: float) -> None:
        self._samples.append(milliseconds)

    def percentiles(self) -> dict[str, float | None]:
        if not self._samples:
            return {"p50": None, "p95": None, "p99": None, "count": 0}
        values = np.fromiter(self._samples, dtype=np.float64)
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        return {
            "p50": round(float(p50), 3),
            "p95": round(float(p95), 3),
            "p99": round(float(p99), 3),
            "count": len(values),
        }

    def histogram(self) -> dict[str, list[float] | list[int]]:
        """Return sample counts per bucket between ``HISTOGRAM_EDGES_MS``."""
        edges = np.asarray(HISTOGRAM_EDGES_MS)
        values = np.fromiter(self._samples, dtype=np.float64)
        clipped = np.clip(values, edges[0], edges[-1])
        counts, _ = np.histogram(clipped, bins=edges)
        return {"edges_ms": list(HISTOGRAM_EDGES_MS), "counts": counts.tolist()}

    def summary(self) -> dict[str, Any]:
        """Return the percentiles together with the histogram."""
        report: dict[str, Any] = dict(self.percentiles())
        report["histogram"] = self.histogram()
        return report


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MiB.

    Reads VmHWM from /proc where it exists: getrusage's ru_maxrss survives
    exec on Linux, so a daemon started by a large parent would report the
    parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
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
        self.train_ms = LatencyWindow()
        self.end_to_end_ms = LatencyWindow()

    def record_applied(
        self,
        samples: int,
        loss: float,
        mean_alpha: float,
        train_ms: float,
        e2e_ms: float,
    ) -> None:
        with self._lock:
            self.applied += 1
            self.samples_applied += samples
            self.last_loss = loss
            self.last_mean_alpha = mean_alpha
            self.train_ms.add(train_ms)
            self.end_to_end_ms.add(e2e_ms)

    def record_rejected(self, reason: str) -> None:
        with self._lock:
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
                "loss": self.last_loss,
                "mean_alpha": self.last_mean_alpha,
                "train_ms": self.train_ms.summary(),
                "end_to_end_ms": self.end_to_end_ms.summary(),
                "peak_rss_mb": peak_rss_mb(),
            }
        if extra:
            report.update(extra)
        return report
