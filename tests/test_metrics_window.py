"""LatencyWindow against numpy's percentile and histogram on the same samples."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dslo_edge.metrics import (
    HISTOGRAM_EDGES_MS,
    DaemonMetrics,
    LatencyWindow,
    peak_rss_mb,
)


def reference_counts(values: np.ndarray) -> list[int]:
    edges = np.asarray(HISTOGRAM_EDGES_MS)
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return counts.tolist()


@pytest.mark.parametrize("added", [1, 2, 7, 100, 2048, 5000])
def test_window_matches_numpy(added: int) -> None:
    rng = np.random.default_rng(added)
    samples = rng.lognormal(mean=0.0, sigma=3.0, size=added)
    window = LatencyWindow(size=2048)
    for value in samples:
        window.add(float(value))
    kept = samples[-2048:]

    summary = window.summary()

    expected = np.percentile(kept, [50, 95, 99])
    assert summary["count"] == len(kept)
    assert summary["p50"] == pytest.approx(round(expected[0], 3), abs=1e-3)
    assert summary["p95"] == pytest.approx(round(expected[1], 3), abs=1e-3)
    assert summary["p99"] == pytest.approx(round(expected[2], 3), abs=1e-3)
    assert summary["histogram"]["counts"] == reference_counts(kept)


def test_window_counts_edge_values_like_numpy() -> None:
    window = LatencyWindow()
    values = [0.0, 0.01, 0.02, 5.0, 99_999.0, 100_000.0, 250_000.0]
    for value in values:
        window.add(value)

    counts = window.histogram()["counts"]

    assert counts == reference_counts(np.array(values))


def test_empty_window_reports_no_percentiles() -> None:
    summary = LatencyWindow().summary()

    assert summary["p50"] is None
    assert summary["count"] == 0
    assert sum(summary["histogram"]["counts"]) == 0


def test_peak_rss_is_positive() -> None:
    assert peak_rss_mb() > 0


def test_last_processed_time_follows_updates() -> None:
    metrics = DaemonMetrics()
    assert metrics.snapshot("dev")["last_processed_at"] is None

    before = time.time()
    metrics.record_applied(32, 0.5, 0.4, train_ms=0.1, e2e_ms=1.0)
    applied_at = metrics.snapshot("dev")["last_processed_at"]
    metrics.record_rejected("stale")
    rejected_at = metrics.snapshot("dev")["last_processed_at"]

    assert before <= applied_at <= rejected_at <= time.time()
    # The report's own timestamp is when it was built, not when an update was.
    time.sleep(0.05)
    report = metrics.snapshot("dev")
    assert report["last_processed_at"] == rejected_at
    assert report["timestamp"] >= rejected_at + 0.05
