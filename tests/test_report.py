"""Metrics log writing, reading and the PNG report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from dslo_edge.cli import main
from dslo_edge.errors import ConfigError
from dslo_edge.metrics import HISTOGRAM_EDGES_MS, DaemonMetrics, LatencyWindow
from dslo_edge.power import BatteryCapacity, EnergyMeter, PowerModel
from dslo_edge.power.sources import CpuModelSource
from dslo_edge.report import (
    alpha_series,
    append_metrics,
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
from dslo_edge.report_records import histogram_of
from tests.sysfs_tree import FakeClock

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics_log(path: Path, reports: int = 40) -> Path:
    """Write a metrics log from real DaemonMetrics and EnergyMeter objects."""
    rng = np.random.default_rng(0)
    clock = FakeClock(start=0.0)
    cpu = FakeClock(start=0.0)
    model = PowerModel("raspberry-pi-4b", 2.7, 6.4, 4)
    meter = EnergyMeter(
        [CpuModelSource(model, cpu_seconds=cpu, clock=clock)],
        fallback_capacity=BatteryCapacity(37.0, "config battery_wh"),
        clock=clock,
    )
    metrics = DaemonMetrics()
    for index in range(reports):
        for _ in range(5):
            train_ms = float(rng.lognormal(mean=-1.5, sigma=0.6))
            with meter.measure():
                clock.advance(train_ms / 1000)
                cpu.advance(train_ms / 1000)
            clock.advance(1.0)
            metrics.record_applied(
                32,
                loss=2.0 * math.exp(-index / 15) + 0.2,
                mean_alpha=0.8 - 0.5 * index / reports,
                train_ms=train_ms,
                e2e_ms=train_ms + float(rng.lognormal(2.0, 0.5)),
            )
        extra = {
            "teacher": {"mean_entropy": 0.9 * math.exp(-index / 10) + 0.05},
            "probe_accuracy": 0.45 + 0.4 * (1 - math.exp(-index / 12)),
            "energy": meter.report(),
        }
        report = metrics.snapshot("kitchen-cam", extra)
        report["timestamp"] = 1_700_000_000 + 30.0 * index
        append_metrics(path, report)
    return path


def test_histogram_counts_samples_per_bucket() -> None:
    window = LatencyWindow()
    for value in (0.001, 0.015, 0.3, 0.3, 7.0, 1e6):
        window.add(value)
    histogram = window.histogram()
    assert histogram["edges_ms"] == list(HISTOGRAM_EDGES_MS)
    counts = histogram["counts"]
    assert len(counts) == len(HISTOGRAM_EDGES_MS) - 1
    assert sum(counts) == 6
    assert counts[0] == 2  # 0.001 ms is clipped into the first bucket
    assert counts[HISTOGRAM_EDGES_MS.index(0.2)] == 2
    assert counts[HISTOGRAM_EDGES_MS.index(5.0)] == 1
    assert counts[-1] == 1  # 1e6 ms is clipped into the last bucket


def test_snapshot_includes_latency_histograms() -> None:
    metrics = DaemonMetrics()
    metrics.record_applied(8, 1.0, 0.5, train_ms=0.4, e2e_ms=12.0)
    report = metrics.snapshot("cam")
    assert report["train_ms"]["p50"] == pytest.approx(0.4)
    assert sum(report["train_ms"]["histogram"]["counts"]) == 1
    assert sum(report["end_to_end_ms"]["histogram"]["counts"]) == 1


def test_log_rotates_past_size_limit(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    for index in range(3):
        append_metrics(log, {"applied": index, "pad": "x" * 100}, max_bytes=150)
    rotated = tmp_path / "metrics.jsonl.1"
    assert [json.loads(line)["applied"] for line in log.read_text().splitlines()] == [2]
    rotated_lines = rotated.read_text().splitlines()
    assert [json.loads(line)["applied"] for line in rotated_lines] == [0, 1]


def test_read_skips_torn_lines(tmp_path: Path, caplog) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        '{"device": "d", "applied": 1}\n\n[1, 2]\n{"bad": 1}\n'
        '{"device": "d", "applied": 2}\n{"appl'
    )
    with caplog.at_level("WARNING", logger="dslo_edge.report"):
        records = read_metrics_log(log)
    several = caplog.text
    log.write_text('{"device": "d", "applied": 3}\n{}\n')
    caplog.clear()
    with caplog.at_level("WARNING", logger="dslo_edge.report"):
        read_metrics_log(log)

    assert [r["applied"] for r in records] == [1, 2]
    assert "Skipped 3 lines in " in several
    assert "that are not a metrics report" in several
    assert f"Skipped 1 line in {log} that is not a metrics report, " in caplog.text
    assert "which is a JSON object with the key device" in caplog.text


def test_read_accepts_zeros_from_power_cut(tmp_path: Path, caplog) -> None:
    log = tmp_path / "metrics.jsonl"
    # The daemon accepts such a log at start and appends to it.
    log.write_bytes(
        b"\0" * 4096
        + b'{"device": "d", "applied": 1}\n'
        + b'{"device": "d", "applied": 2}\n'
        + b"\0" * 512
        + b'{"device": "d", "applied": 3}\n\0\0\0\n'
    )

    with caplog.at_level("WARNING", logger="dslo_edge.report"):
        records = read_metrics_log(log)

    assert [r["applied"] for r in records] == [1, 2, 3]
    assert "Skipped" not in caplog.text


def test_read_rejects_log_without_reports(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text("not json\n")
    with pytest.raises(ConfigError, match="has no metrics reports"):
        read_metrics_log(log)
    # JSON objects without the device key are not reports either.
    log.write_text('{"bad": 1}\n{"applied": 3}\n')
    with pytest.raises(ConfigError, match="has no metrics reports"):
        read_metrics_log(log)
    with pytest.raises(ConfigError, match="cannot read metrics log"):
        read_metrics_log(tmp_path / "missing.jsonl")


def test_report_command_names_binary_file(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).random((50, 64)))

    result = CliRunner().invoke(
        main, ["report", "--metrics", str(data), "--out", str(tmp_path / "plots")]
    )

    assert result.exit_code == 78
    assert result.output.startswith(
        f"error: metrics log {data} is not a text metrics log: "
    )
    assert "lines are not UTF-8 text, as in a binary file" in result.output
    assert "logging.metrics_file" in result.output
    assert "codec" not in result.output
    assert not (tmp_path / "plots").exists()


def test_read_skips_line_that_is_not_utf8(tmp_path: Path, caplog) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(
        b'{"device": "d", "applied": 1}\n\xf1\xff\n{"device": "d", "applied": 2}\n'
    )

    with caplog.at_level("WARNING", logger="dslo_edge.report"):
        records = read_metrics_log(log)

    assert [r["applied"] for r in records] == [1, 2]
    assert f"Skipped 1 line in {log} that is not a metrics report" in caplog.text


INVALID_VALUES = {
    "timestamp is text": (
        {"device": "x", "timestamp": "abc", "applied": "zz"},
        'timestamp = "abc", expected a finite number',
    ),
    "applied is text": ({"device": "x", "applied": "zz"}, 'applied = "zz"'),
    "applied is true": ({"device": "x", "applied": True}, "applied = true"),
    "timestamp is NaN": ({"device": "x", "timestamp": math.nan}, "timestamp = NaN"),
    "device is a number": ({"device": 7}, "device = 7, expected a string"),
    "loss is text": (
        {"device": "x", "loss": "0.5"},
        'loss = "0.5", expected a number or null',
    ),
    # Ints beyond the float range, where math.isfinite and float() raise.
    "applied is huge": (
        {"device": "x", "applied": 10**400},
        f"applied = {10**400}, expected a finite number",
    ),
    "loss is huge": (
        {"device": "x", "loss": -(10**400)},
        f"loss = {-(10**400)}, expected a number or null",
    ),
}


@pytest.mark.parametrize(
    ("fields", "problem"), INVALID_VALUES.values(), ids=INVALID_VALUES
)
def test_read_skips_invalid_values(
    tmp_path: Path, caplog, fields: dict, problem: str
) -> None:
    log = tmp_path / "metrics.jsonl"
    append_metrics(log, {"device": "x", "timestamp": 1.0, "applied": 1})
    append_metrics(log, fields)
    append_metrics(log, fields)
    append_metrics(log, {"device": "x", "timestamp": 2.0, "applied": 2})

    with caplog.at_level("WARNING", logger="dslo_edge.report"):
        records = read_metrics_log(log)

    assert [r["applied"] for r in records] == [1, 2]
    assert f"Skipped 2 lines in {log} with an invalid value, first line 2: " in (
        caplog.text
    )
    assert problem in caplog.text


@pytest.mark.parametrize(
    "line",
    [
        # json.loads raises a plain ValueError for an int of more digits than
        # sys.get_int_max_str_digits(), 4300 by default.
        '{"device": "x", "applied": ' + "1" * 5000 + "}",
        # and RecursionError for arrays nested deeper than the recursion limit.
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=["too_many_digits", "nested_too_deeply"],
)
def test_read_skips_unparsable_line(tmp_path: Path, caplog, line: str) -> None:
    log = tmp_path / "metrics.jsonl"
    append_metrics(log, {"device": "x", "timestamp": 1.0, "applied": 1})
    with log.open("a") as stream:
        stream.write(line + "\n")
    append_metrics(log, {"device": "x", "timestamp": 2.0, "applied": 2})

    with caplog.at_level("WARNING", logger="dslo_edge.report"):
        records = read_metrics_log(log)

    assert [r["applied"] for r in records] == [1, 2]
    assert f"Skipped 1 line in {log} that is not a metrics report" in caplog.text


def test_read_keeps_null_and_nan_loss(tmp_path: Path, caplog) -> None:
    log = tmp_path / "metrics.jsonl"
    append_metrics(log, {"device": "x", "timestamp": 1.0, "loss": None})
    append_metrics(log, {"device": "x", "timestamp": 2.0, "loss": math.nan})

    with caplog.at_level("WARNING", logger="dslo_edge.report"):
        records = read_metrics_log(log)

    assert [r["timestamp"] for r in records] == [1.0, 2.0]
    assert caplog.text == ""


def test_report_command_skips_invalid_line(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"device":"x","timestamp":"abc","applied":"zz"}\n')
    out = tmp_path / "plots"

    result = CliRunner().invoke(
        main, ["report", "--metrics", str(log), "--out", str(out)]
    )

    assert result.exit_code == 78, result.output
    assert f"error: metrics log {log} has no metrics reports" in result.output
    assert not out.exists()


def test_series_reads_nested_fields() -> None:
    records: list[dict[str, Any]] = [
        {"timestamp": 100.0, "teacher": {"mean_entropy": 0.9}},
        {"timestamp": 160.0, "teacher": {"mean_entropy": None}},
        {"timestamp": 220.0, "teacher": {"mean_entropy": 0.5}},
    ]
    assert series(records, "teacher.mean_entropy") == ([0.0, 2.0], [0.9, 0.5])
    assert series(records, "loss") == ([], [])


def test_series_skips_teacher_before_first_batch() -> None:
    # The teacher monitor reports 0.0 until its first batch (latest_round 0).
    records: list[dict[str, Any]] = [
        {"timestamp": 0.0, "teacher": {"mean_entropy": 0.0, "latest_round": 0.0}},
        {"timestamp": 60.0, "teacher": {"mean_entropy": 0.6, "latest_round": 1.0}},
        {"timestamp": 120.0, "teacher": {"mean_entropy": 0.0, "latest_round": 2.0}},
        {"timestamp": 180.0, "teacher": {"mean_entropy": 0.4}},
    ]

    times, values = series(records, "teacher.mean_entropy")

    assert times == [1.0, 2.0, 3.0]
    assert values == [0.6, 0.0, 0.4]


def test_head_series_splits_multi_head_teacher() -> None:
    # A multi-head student reports one teacher monitor per head.
    records: list[dict[str, Any]] = [
        {
            "timestamp": 0.0,
            "teacher": {
                "digit": {"mean_entropy": 0.0, "latest_round": 0.0},
                "shape": {"mean_entropy": 0.0, "latest_round": 0.0},
            },
        },
        {
            "timestamp": 60.0,
            "teacher": {
                "digit": {"mean_entropy": 0.8, "latest_round": 1.0},
                "shape": {"mean_entropy": 0.3, "latest_round": 1.0},
            },
        },
        {
            "timestamp": 120.0,
            "teacher": {"digit": {"mean_entropy": 0.6, "latest_round": 2.0}},
        },
    ]

    lines = head_series(records, "teacher.mean_entropy")

    assert lines == [("digit", [1.0, 2.0], [0.8, 0.6]), ("shape", [1.0], [0.3])]
    assert head_series(records[:1], "teacher.mean_entropy") == [(None, [], [])]
    assert head_series(records, "loss") == [(None, [], [])]
    single = [{"timestamp": 0.0, "teacher": {"mean_entropy": 0.5}}]
    assert head_series(single, "teacher.mean_entropy") == [(None, [0.0], [0.5])]


def test_alpha_series_splits_heads() -> None:
    records: list[dict[str, Any]] = [
        {"timestamp": 0.0, "mean_alpha": None, "dynamic": {"heads": {}}},
        {
            "timestamp": 60.0,
            "mean_alpha": 0.7,
            "dynamic": {
                "heads": {
                    "digit": {"alpha": {"mean": 0.8}},
                    "shape": {"alpha": {"mean": 0.6}},
                }
            },
        },
        {
            "timestamp": 120.0,
            "mean_alpha": 0.5,
            "dynamic": {
                "heads": {"digit": {"alpha": None}, "shape": {"alpha": {"mean": 0.6}}}
            },
        },
    ]

    lines = alpha_series(records)

    assert lines == [
        ("all heads", [1.0, 2.0], [0.7, 0.5]),
        ("digit", [1.0], [0.8]),
        ("shape", [1.0, 2.0], [0.6, 0.6]),
    ]
    single = [{"timestamp": 0.0, "mean_alpha": 0.4, "dynamic": {"progress": 0.1}}]
    assert alpha_series(single) == [(None, [0.0], [0.4])]


def test_probe_series_splits_heads(tmp_path: Path) -> None:
    # The daemon reports the mean over the heads and each head's accuracy, and
    # rolls back when one head falls, so each head needs its own line.
    log = tmp_path / "metrics.jsonl"
    reports = [
        (0.0, None, None),
        (60.0, 0.5, {"digit": 0.3, "big": 0.7}),
        (120.0, 0.9, {"digit": 0.85, "big": 0.95}),
    ]
    for timestamp, mean, heads in reports:
        report = {"device": "dev1", "timestamp": timestamp, "applied": 1}
        report |= {"probe_accuracy": mean, "probe_accuracy_heads": heads}
        append_metrics(log, report)
    records = read_metrics_log(log)

    lines = probe_series(records)

    assert lines == [
        ("all heads", [1.0, 2.0], [0.5, 0.9]),
        ("digit", [1.0, 2.0], [0.3, 0.85]),
        ("big", [1.0, 2.0], [0.7, 0.95]),
    ]
    single = [{"timestamp": 0.0, "probe_accuracy": 0.4}]
    assert probe_series(single) == [(None, [0.0], [0.4])]
    paths = write_report(records, tmp_path / "report")
    assert (tmp_path / "report" / "training.png") in paths


def test_report_writes_three_pngs(tmp_path: Path) -> None:
    records = read_metrics_log(metrics_log(tmp_path / "metrics.jsonl"))
    assert records[-1]["energy"]["source"] == (
        "profile raspberry-pi-4b power model (CPU time)"
    )
    paths = write_report(records, tmp_path / "report")
    assert [p.name for p in paths] == ["latency.png", "training.png", "energy.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 10_000


def test_report_handles_log_without_optional_fields(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    append_metrics(log, {"device": "old", "applied": 1, "loss": 0.5})
    paths = write_report(read_metrics_log(log), tmp_path / "report")
    assert all(path.is_file() for path in paths)


def test_report_command(tmp_path: Path) -> None:
    log = metrics_log(tmp_path / "metrics.jsonl", reports=5)
    out = tmp_path / "plots"
    result = CliRunner().invoke(
        main, ["report", "--metrics", str(log), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "read 5 metrics reports" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "energy.png",
        "latency.png",
        "training.png",
    ]


def test_report_command_reads_rotated_logs(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    for applied in range(5):
        append_metrics(log, {"device": "cam", "applied": applied}, max_bytes=60)
    rotated = tmp_path / "metrics.jsonl.1"
    out = tmp_path / "plots"

    result = CliRunner().invoke(
        main,
        ["report", "--metrics", str(rotated), "--metrics", str(log), "--out", str(out)],
    )

    assert result.exit_code == 0, result.output
    assert [r["applied"] for r in read_metrics_log(rotated)] == [0, 1, 2]
    assert [r["applied"] for r in read_metrics_log(log)] == [3, 4]
    assert f"read 5 metrics reports from {rotated}, {log}" in result.output
    assert (out / "training.png").read_bytes()[:8] == PNG_SIGNATURE


def test_report_command_plots_one_device(tmp_path: Path) -> None:
    kitchen = tmp_path / "kitchen.jsonl"
    porch = tmp_path / "porch.jsonl"
    for index in range(4):
        report = {"device": "kitchen", "applied": index, "timestamp": 1000.0 + index}
        append_metrics(kitchen, report)
    for index in range(3):
        report = {"device": "porch", "applied": index, "timestamp": 2000.0 + index}
        append_metrics(porch, report)
    out = tmp_path / "plots"

    result = CliRunner().invoke(
        main,
        [
            "report",
            "--metrics",
            str(kitchen),
            "--metrics",
            str(porch),
            "--out",
            str(out),
        ],
    )

    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: left out 4 reports of other devices (kitchen: 4); the plots "
        "show only device porch, which sent the last report read. Give only one "
        "device's logs to plot another"
    ]
    assert (
        f"read 7 metrics reports from {kitchen}, {porch}, plotted 3 of device porch"
    ) in result.stdout
    assert (out / "training.png").read_bytes()[:8] == PNG_SIGNATURE


def test_newest_device_reports_keeps_order() -> None:
    records = [
        {"device": "a", "applied": 0},
        {"device": "b", "applied": 1},
        {"device": "c", "applied": 2},
        {"device": "a", "applied": 3},
    ]

    kept, others = newest_device_reports(records)

    assert [r["applied"] for r in kept] == [0, 3]
    assert others == {"b": 1, "c": 1}


def test_rotated_logs_read_in_time_order(tmp_path: Path) -> None:
    newest_first = [
        tmp_path / "metrics.jsonl",
        tmp_path / "metrics.jsonl.1",
        tmp_path / "metrics.jsonl.2",
    ]
    for index in range(6):
        report = {"device": "cam", "applied": index, "timestamp": 1000.0 + 60 * index}
        append_metrics(newest_first[2 - index // 2], report)

    records = read_metrics_logs(newest_first)

    assert [r["applied"] for r in records] == [0, 1, 2, 3, 4, 5]
    minutes, _ = series(records, "applied")
    assert minutes == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_report_command_rejects_log_given_twice(tmp_path: Path) -> None:
    log = metrics_log(tmp_path / "metrics.jsonl", reports=2)

    result = CliRunner().invoke(
        main,
        ["report", "--metrics", str(log), "--metrics", str(log), "--out", "plots"],
    )

    assert result.exit_code == 78
    assert f"metrics log {log} is given twice" in result.output
    assert not (tmp_path / "plots").exists()


def test_report_command_names_empty_rotated_log(tmp_path: Path) -> None:
    log = metrics_log(tmp_path / "metrics.jsonl", reports=2)
    empty = tmp_path / "metrics.jsonl.1"
    empty.write_text("")

    result = CliRunner().invoke(
        main,
        ["report", "--metrics", str(empty), "--metrics", str(log), "--out", "plots"],
    )

    assert result.exit_code == 78
    assert result.output.startswith(f"error: metrics log {empty} has no metrics")
    assert not (tmp_path / "plots").exists()


def test_empty_panel_keeps_shared_ticks(tmp_path: Path) -> None:
    pyplot = pytest.importorskip("matplotlib.pyplot")
    from dslo_edge.report import _empty

    figure, (top, bottom) = pyplot.subplots(2, 1, sharex=True)
    top.plot([0.0, 5.0, 10.0], [1.0, 2.0, 3.0])
    _empty(bottom, "no data")
    figure.canvas.draw()

    assert len(top.get_xticks()) > 0
    assert len(bottom.get_xticks()) == len(top.get_xticks())
    assert not any(label.get_visible() for label in bottom.get_xticklabels())
    pyplot.close(figure)


def test_report_command_unwritable_out(tmp_path: Path) -> None:
    log = metrics_log(tmp_path / "metrics.jsonl", reports=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "plots"

    result = CliRunner().invoke(
        main, ["report", "--metrics", str(log), "--out", str(out)]
    )

    # Exit status 2, as for convert's or demo's unwritable --out.
    assert result.exit_code == 2
    assert (
        f"Error: Invalid value for --out: cannot create the report directory {out}:"
        in result.output
    )
    assert result.output.rstrip().endswith("choose another --out")
    assert blocker.read_text() == "not a directory"


def test_report_command_unwritable_plot(tmp_path: Path) -> None:
    log = metrics_log(tmp_path / "metrics.jsonl", reports=2)
    out = tmp_path / "plots"
    (out / "latency.png").mkdir(parents=True)

    result = CliRunner().invoke(
        main, ["report", "--metrics", str(log), "--out", str(out)]
    )

    assert result.exit_code == 2
    assert (
        f"Error: Invalid value for --out: cannot write the plot {out / 'latency.png'}:"
        in result.output
    )
    assert result.output.rstrip().endswith("choose another --out")


MALFORMED_FIELDS = {
    "energy is a string": {"energy": "x"},
    "battery is a string": {"energy": {"joules_per_update": 0.1, "battery": "x"}},
    "battery figure is a string": {
        "energy": {
            "joules_per_update": 0.1,
            "battery": {"percent_per_1000_updates": "x"},
        }
    },
    "histogram without counts": {"train_ms": {"histogram": {"edges_ms": [1, 2]}}},
    "histogram is a list": {"train_ms": {"histogram": [1, 2]}},
    "histogram count is text": {
        "train_ms": {"histogram": {"edges_ms": [1, 2], "counts": ["a"]}}
    },
    "histogram of wrong length": {
        "train_ms": {"histogram": {"edges_ms": [1, 2, 3], "counts": [1]}}
    },
}


@pytest.mark.parametrize("fields", MALFORMED_FIELDS.values(), ids=MALFORMED_FIELDS)
def test_report_skips_malformed_fields(tmp_path: Path, fields: dict) -> None:
    log = tmp_path / "metrics.jsonl"
    append_metrics(log, {"device": "cam", "timestamp": 1.0, "loss": 0.5, **fields})
    out = tmp_path / "plots"

    result = CliRunner().invoke(
        main, ["report", "--metrics", str(log), "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    for name in ("latency.png", "training.png", "energy.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE


def test_histogram_checks_shape_and_counts() -> None:
    summary = {"histogram": {"edges_ms": [0.1, 1.0, 10.0], "counts": [3, 0]}}

    assert histogram_of(summary) == ([0.1, 1.0, 10.0], [3, 0])
    assert histogram_of({"histogram": {"edges_ms": [0.1, 1.0], "counts": [0]}}) is None
    assert histogram_of({"histogram": {"edges_ms": [], "counts": []}}) is None
    assert histogram_of({"histogram": {"edges_ms": [1, True], "counts": [1]}}) is None


def test_latency_plot_skips_reports_after_restart(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    metrics = DaemonMetrics()
    for train_ms in (0.3, 0.4, 6.0):
        metrics.record_applied(32, 1.0, 0.5, train_ms=train_ms, e2e_ms=2.0)
    append_metrics(log, metrics.snapshot("cam", {"timestamp": 10.0}))
    # A restarted daemon reports empty windows until it applies an update.
    restarted = DaemonMetrics()
    append_metrics(log, restarted.snapshot("cam", {"timestamp": 20.0}))
    records = read_metrics_log(log)

    latest = latest_histogram(records, "train_ms")

    assert records[-1]["train_ms"]["count"] == 0
    assert latest is not None
    summary, (edges, counts) = latest
    assert summary["count"] == 3
    assert sum(counts) == 3
    assert counts[edges.index(0.2)] == 2
    assert counts[edges.index(5.0)] == 1
    assert latest_histogram(records, "infer_ms") is None


def test_energy_plot_skips_reports_after_restart(tmp_path: Path) -> None:
    log = metrics_log(tmp_path / "metrics.jsonl", reports=3)
    trained = read_metrics_log(log)[-1]["energy"]
    # A restarted daemon's meter has measured no update yet.
    clock = FakeClock(start=0.0)
    model = PowerModel("raspberry-pi-4b", 2.7, 6.4, 4)
    restarted = EnergyMeter(
        [CpuModelSource(model, cpu_seconds=FakeClock(start=0.0), clock=clock)],
        fallback_capacity=BatteryCapacity(37.0, "config battery_wh"),
        clock=clock,
    )
    append_metrics(log, {"device": "kitchen-cam", "energy": restarted.report()})
    records = read_metrics_log(log)

    energy = latest_energy(records)

    assert records[-1]["energy"]["joules_per_update"] is None
    assert energy == trained
    assert energy["joules_per_update"] > 0
    assert energy["battery"]["percent_per_1000_updates"] > 0
    assert latest_energy(records[-1:]) == records[-1]["energy"]


def test_training_plot_axis_above_empty_panel(tmp_path: Path) -> None:
    pyplot = pytest.importorskip("matplotlib.pyplot")
    from dslo_edge.report import _training_figure

    records = read_metrics_log(metrics_log(tmp_path / "metrics.jsonl", reports=8))
    for record in records:
        # A bundle without probe.npz: the daemon reports no probe accuracy.
        record["probe_accuracy"] = None
    figure = _training_figure(pyplot, records, "kitchen-cam")
    figure.canvas.draw()
    (_, entropy), (_, probe) = figure.axes[:2], figure.axes[2:]

    labels = [label.get_text() for label in entropy.get_xticklabels()]
    assert any(label.get_visible() for label in entropy.get_xticklabels())
    assert any(labels)
    assert entropy.get_xlabel() == "minutes since the first report"
    assert probe.get_xlabel() == ""
    pyplot.close(figure)
