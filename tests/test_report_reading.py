"""Reading a long metrics log: peak memory, and the same plotted values."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dslo_edge.metrics import HISTOGRAM_EDGES_MS
from dslo_edge.report import (
    alpha_series,
    head_series,
    latest_energy,
    latest_histogram,
    newest_device_reports,
    probe_series,
    read_metrics_log,
    read_metrics_logs,
    series,
    write_report,
)
from tests.test_report import PNG_SIGNATURE

START = 1_700_000_000.0


def latency(counts: list[int], p50: float | None) -> dict[str, Any]:
    """Return a latency summary as ``LatencyWindow.summary`` writes it."""
    return {
        "p50": p50,
        "p95": None if p50 is None else round(p50 * 3, 3),
        "p99": None if p50 is None else round(p50 * 4, 3),
        "count": sum(counts),
        "histogram": {"edges_ms": list(HISTOGRAM_EDGES_MS), "counts": counts},
    }


def monitor(index: int) -> dict[str, float]:
    """Return teacher-monitor figures as ``TeacherMonitor.snapshot`` writes them."""
    entropy = round(0.9 - 0.01 * index, 4)
    return {
        "mean_entropy": entropy,
        "mean_confidence": round(1 - entropy, 4),
        "batch_entropy": round(entropy + 0.05, 4),
        "batch_confidence": round(0.95 - entropy, 4),
        "drift": 0.0,
        "batch_drift": 0.0,
        "latest_round": float(index),
    }


def engine(index: int, alpha: float | None) -> dict[str, Any]:
    """Return dynamic figures as ``SoftLabelEngine.snapshot`` writes them."""
    return {
        "progress": round(index / 50, 4),
        "applied_updates": 5 * index,
        "highest_round": index,
        "smoothing_lambda": 0.3,
        "drift_boost_remaining": 0,
        "alpha": None if alpha is None else {"mean": alpha, "min": 0.1, "max": 0.9},
        "smoothed_ids": 32 * index,
        "teacher": monitor(index),
    }


def daemon_report(
    index: int,
    device: str = "kitchen-cam",
    heads: tuple[str, ...] = (),
    trained: bool = True,
    infer: bool = False,
) -> dict[str, Any]:
    """Return a report with the keys and nesting of ``EdgeDaemon.status_report``.

    A report that is not ``trained`` is one of a restarted daemon: empty
    latency windows and no loss, alpha or energy per update yet. ``heads``
    gives a multi-head student's reports.
    """
    # One sample per bucket, and 10 + index in bucket index % 21.
    counts = [1] * 21 if trained else [0] * 21
    if trained:
        counts[index % 21] = 10 + index
    alpha = round(0.8 - 0.02 * index, 4) if trained else None
    train_p50 = round(0.08 + index / 1000, 3) if trained else None
    end_to_end_p50 = round(1 + index / 100, 3) if trained else None
    joules_per_update = round(0.0008 + index / 100_000, 6) if trained else None
    infer_counts = counts if infer else [0] * 21
    infer_p50 = round(0.5 + index / 100, 3) if infer else None
    report: dict[str, Any] = {
        "device": device,
        "timestamp": START + 60.0 * index,
        "applied": 5 * index,
        "samples_applied": 160 * index,
        "rejected": {"stale": index % 3},
        "processed": 5 * index + index % 3,
        "last_processed_at": START + 60.0 * index - 0.25,
        "loss": round(2.0 / (index + 1), 4) if trained else None,
        "mean_alpha": alpha,
        "train_ms": latency(counts, train_p50),
        "end_to_end_ms": latency(counts, end_to_end_p50),
        "stage_ms": {
            stage: {"p50": 0.128, "p95": 2.553, "p99": 3.385, "count": 30}
            for stage in ("queue", "admit", "prepare")
        },
        "peak_rss_mb": 88.7,
        "pid": 27502,
        "progress": round(index / 50, 4),
        "applied_total": 5 * index,
        "restored_from": "factory weights",
        "queue_depth": 0,
        "unacknowledged": 0,
        "deferred_for_redelivery": 0,
        "inference_rejected": {},
        "stray_dropped": 0,
        "model_updates": {"installed": 0, "rejected": {}, "rolled_back": {}},
        "processed_total": 5 * index + index % 3,
        "checkpoints_written": index // 4,
        "unsaved": index % 4,
        "storage_error": None,
        "probe_accuracy": round(0.5 + 0.01 * index, 4) if trained else None,
        "rollbacks": 0,
        "last_rollback": None,
        "session_takeovers": 0,
        "connects": 1,
        "teacher": monitor(index),
        "dynamic": engine(index, alpha),
        "label_requests": None,
        "energy": {
            "source": "profile raspberry-pi-4b power model (CPU time)",
            "estimated": True,
            "updates": 5 * index,
            "joules": round(0.004 * index, 6),
            "joules_per_update": joules_per_update,
            "average_power_w": 3.625,
            "updates_per_hour": 3617.184286,
            "battery": {
                "capacity_wh": 37.0,
                "capacity_source": "config battery_wh",
                "percent": None,
                "status": None,
                "percent_per_1000_updates": 0.000678 if trained else None,
                "percent_per_hour": 0.002454,
            },
        },
        "training": {"paused": False, "reason": None, "codes": [], "resume_in_s": None},
        "infer_ms": latency(infer_counts, infer_p50),
    }
    if heads:
        report["teacher"] = {head: monitor(index + n) for n, head in enumerate(heads)}
        report["dynamic"] = {
            "progress": report["progress"],
            "applied_updates": 5 * index,
            "heads": {
                head: engine(index + n, head_alpha(alpha, n))
                for n, head in enumerate(heads)
            },
        }
        report["probe_accuracy_heads"] = {
            head: round(0.5 + 0.01 * index + n / 10, 4) for n, head in enumerate(heads)
        }
    return report


def head_alpha(alpha: float | None, head_index: int) -> float | None:
    return None if alpha is None else round(alpha - head_index / 10, 4)


def write_log(path: Path, reports: list[dict[str, Any]]) -> Path:
    # The daemon writes json.dumps(report) with the default separators.
    path.write_text("".join(json.dumps(report) + "\n" for report in reports))
    return path


def test_read_peak_memory_below_file_size(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "metrics.jsonl", [daemon_report(index) for index in range(2000)]
    )
    size = log.stat().st_size

    tracemalloc.start()
    try:
        records = read_metrics_log(log)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # About 2.9 kB a line, as the lines that EdgeDaemon writes.
    assert 2_500 < size / 2000 < 3_300
    assert len(records) == 2000
    assert series(records, "loss")[1][-1] == round(2.0 / 2000, 4)
    # Measured with tracemalloc on CPython 3.11, for this 5.8 MB log: reading
    # the whole file and keeping every parsed report peaked at 35.6 MB, 6.1
    # times the file size. Reading line by line and keeping the plotted
    # fields peaks at 3.6 MB, 0.61 times.
    assert peak < 1.0 * size


def rotated_logs(folder: Path) -> list[Path]:
    """Write two rotated logs of kitchen-cam, with a porch-cam report in the older.

    Only the older log has infer_ms samples, and the last report is one of a
    restarted daemon, so the newest histograms and energy are in earlier reports.
    """
    older = [daemon_report(index, infer=index < 3) for index in range(5)]
    older.insert(3, daemon_report(20, device="porch-cam", infer=True))
    newer = [daemon_report(index) for index in range(5, 8)]
    newer.append(daemon_report(8, trained=False))
    return [
        write_log(folder / "metrics.jsonl", newer),
        write_log(folder / "metrics.jsonl.1", older),
    ]


def plotted_values(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Return every value that the three plots draw or print."""
    device_reports, others = newest_device_reports(records)
    histograms: dict[str, list[Any] | None] = {}
    for name in ("infer_ms", "train_ms", "end_to_end_ms"):
        latest = latest_histogram(device_reports, name)
        if latest is None:
            histograms[name] = None
            continue
        summary, (_, counts) = latest
        peak = max(counts)
        histograms[name] = [summary["count"], summary["p50"], counts.index(peak), peak]
    energy = latest_energy(device_reports)
    return {
        "device": device_reports[-1]["device"],
        "others": others,
        "alpha": alpha_series(device_reports),
        "entropy": head_series(device_reports, "teacher.mean_entropy"),
        "loss": head_series(device_reports, "loss"),
        "probe": probe_series(device_reports),
        "energy": series(device_reports, "energy.joules_per_update"),
        "histograms": histograms,
        "energy_source": energy["source"],
        "battery": energy["battery"]["percent_per_1000_updates"],
    }


def multi_head_log(folder: Path) -> list[Path]:
    reports = [daemon_report(index, heads=("digit", "shape")) for index in range(4)]
    return [write_log(folder / "metrics.jsonl", reports)]


def test_rotated_logs_plot_golden_values(tmp_path: Path) -> None:
    minutes = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]

    values = plotted_values(read_metrics_logs(rotated_logs(tmp_path)))

    assert values["device"] == "kitchen-cam"
    assert values["others"] == {"porch-cam": 1}
    assert values["alpha"] == [
        (None, minutes, [0.8, 0.78, 0.76, 0.74, 0.72, 0.7, 0.68, 0.66])
    ]
    # The first report's monitor has seen no batch yet (latest_round 0).
    assert values["entropy"] == [
        (None, minutes[1:] + [8.0], [0.89, 0.88, 0.87, 0.86, 0.85, 0.84, 0.83, 0.82])
    ]
    assert values["loss"] == [
        (None, minutes, [2.0, 1.0, 0.6667, 0.5, 0.4, 0.3333, 0.2857, 0.25])
    ]
    assert values["probe"] == [
        (None, minutes, [0.5, 0.51, 0.52, 0.53, 0.54, 0.55, 0.56, 0.57])
    ]
    assert values["energy"] == (
        minutes,
        [0.0008, 0.00081, 0.00082, 0.00083, 0.00084, 0.00085, 0.00086, 0.00087],
    )
    # Count, p50, fullest bucket and its count: those of the report at
    # minute 7, before the restart, and for infer_ms of the one at minute 2
    # in the older log, not of porch-cam's later report.
    assert values["histograms"] == {
        "infer_ms": [32, 0.52, 2, 12],
        "train_ms": [37, 0.087, 7, 17],
        "end_to_end_ms": [37, 1.07, 7, 17],
    }
    assert values["energy_source"] == "profile raspberry-pi-4b power model (CPU time)"
    assert values["battery"] == 0.000678


def test_multi_head_log_plots_golden_values(tmp_path: Path) -> None:
    minutes = [0.0, 1.0, 2.0, 3.0]

    values = plotted_values(read_metrics_logs(multi_head_log(tmp_path)))

    assert values["others"] == {}
    assert values["alpha"] == [
        ("all heads", minutes, [0.8, 0.78, 0.76, 0.74]),
        ("digit", minutes, [0.8, 0.78, 0.76, 0.74]),
        ("shape", minutes, [0.7, 0.68, 0.66, 0.64]),
    ]
    assert values["entropy"] == [
        ("digit", minutes[1:], [0.89, 0.88, 0.87]),
        ("shape", minutes, [0.89, 0.88, 0.87, 0.86]),
    ]
    assert values["probe"] == [
        ("all heads", minutes, [0.5, 0.51, 0.52, 0.53]),
        ("digit", minutes, [0.5, 0.51, 0.52, 0.53]),
        ("shape", minutes, [0.6, 0.61, 0.62, 0.63]),
    ]
    assert values["histograms"] == {
        "infer_ms": None,
        "train_ms": [33, 0.083, 3, 13],
        "end_to_end_ms": [33, 1.03, 3, 13],
    }


@pytest.mark.parametrize("logs", [rotated_logs, multi_head_log])
def test_read_plots_same_as_whole_reports(
    tmp_path: Path, logs: Callable[[Path], list[Path]]
) -> None:
    pytest.importorskip("matplotlib")
    paths = logs(tmp_path)
    # The logs are listed newest first, as the daemon's rotated logs are named.
    whole = [
        json.loads(line)
        for path in reversed(paths)
        for line in path.read_text().splitlines()
    ]

    read = read_metrics_logs(paths)

    assert plotted_values(read) == plotted_values(whole)
    written = write_report(newest_device_reports(read)[0], tmp_path / "read")
    expected = write_report(newest_device_reports(whole)[0], tmp_path / "whole")
    for path, expected_path in zip(written, expected, strict=True):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.read_bytes() == expected_path.read_bytes(), path.name


def test_read_counts_carriage_return_lines(tmp_path: Path, caplog) -> None:
    log = tmp_path / "metrics.jsonl"
    # bytes.splitlines, which the line numbers follow, also splits at a lone \r.
    log.write_bytes(
        b'{"device": "x", "applied": 1}\r{"device": "x", "applied": 2}\r\n'
        b'{"device": 7}\n{"device": "x", "applied": 3}\r'
    )

    with caplog.at_level("WARNING", logger="dslo_edge.report"):
        records = read_metrics_log(log)

    assert [record["applied"] for record in records] == [1, 2, 3]
    assert f"Skipped 1 line in {log} with an invalid value, first line 3: " in (
        caplog.text
    )
