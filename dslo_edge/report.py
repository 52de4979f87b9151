"""PNG plots from a metrics log, and the log writer the daemon can use.

A metrics log is a JSON Lines file: one metrics report (the JSON object the
daemon publishes on ``dslo/<device>/metrics``) per line. Plotting needs
matplotlib, from the ``report`` extra. Writing the log does not.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from dslo_edge.errors import ConfigError, OutputPathError
from dslo_edge.json_input import parse_json
from dslo_edge.report_records import (
    ReportCollector,
    as_mapping,
    histogram_of,
    is_number,
)
from dslo_edge.report_staging import make_staging_dir, move_into_place

logger = logging.getLogger(__name__)

LATENCY_FIELDS = (
    ("infer_ms", "infer"),
    ("train_ms", "train step"),
    ("end_to_end_ms", "end to end (hub publish to applied)"),
)
DEFAULT_LOG_MAX_BYTES = 8 * 1024 * 1024
# Keys present in every metrics report the daemon publishes.
REPORT_KEYS = frozenset({"device"})
# Top-level fields that the daemon writes as finite numbers, and those that it
# writes as a number (NaN for a diverged loss) or null. A line with another
# value in one of them is not from the daemon and is skipped.
FINITE_FIELDS = ("timestamp", "applied", "samples_applied", "processed")
NUMBER_OR_NULL_FIELDS = (
    "last_processed_at",
    "loss",
    "mean_alpha",
    "peak_rss_mb",
    "probe_accuracy",
)


def append_metrics(
    path: str | Path, report: dict[str, Any], max_bytes: int = DEFAULT_LOG_MAX_BYTES
) -> None:
    """Append one report as a JSON line, rotating the file past ``max_bytes``.

    Rotation renames the log to ``<name>.1``, replacing an older one, so the
    log never takes more than about twice ``max_bytes``.
    """
    log = Path(path)
    if log.exists() and log.stat().st_size >= max_bytes:
        os.replace(log, log.with_name(log.name + ".1"))
    with open(log, "a") as stream:
        stream.write(json.dumps(report, separators=(",", ":")) + "\n")


def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    """Read a metrics log, skipping lines that are not metrics reports.

    A daemon killed mid-write leaves a torn last line, so unreadable lines are
    counted and logged instead of failing the report. A line counts as a
    report when it is a JSON object with the ``device`` key that every
    published report has, and with the value types that the daemon writes
    in ``FINITE_FIELDS`` and ``NUMBER_OR_NULL_FIELDS``. Zero bytes at the
    start of a line are ignored.

    The file is read line by line, and each report keeps only the fields
    that the plots read, as ``ReportCollector`` describes. For the daemon's
    reports that takes about 0.6 times the file size (measured with
    tracemalloc on CPython 3.11), against 6 times for whole reports.

    NOTE: ``series`` of a nested field that the plots do not draw, such as
    ``stage_ms.queue.p50``, finds no values in these reports.

    Returns:
        The reports in the order of the file. The last report of each device
        is whole.

    Raises:
        ConfigError: the file cannot be read or contains no report at all,
            for example because it is a binary file and not a text log.
    """
    source = Path(path)
    try:
        with source.open("rb") as stream:
            records, skipped, not_text, invalid = _read_reports(_lines(stream))
    except OSError as error:
        raise ConfigError(f"cannot read metrics log {source}: {error}") from error
    if not records and not_text:
        raise ConfigError(
            f"metrics log {source} is not a text metrics log: {not_text} of its "
            f"lines are not UTF-8 text, as in a binary file such as an .npz; "
            "give the JSON lines file that the daemon writes to "
            "logging.metrics_file (by default state_dir/metrics.jsonl)"
        )
    skipped += not_text
    if skipped:
        logger.warning(
            "Skipped %d %s in %s that %s not a metrics report, which is a JSON "
            "object with the %s %s",
            skipped,
            "line" if skipped == 1 else "lines",
            source,
            "is" if skipped == 1 else "are",
            "key" if len(REPORT_KEYS) == 1 else "keys",
            ", ".join(sorted(REPORT_KEYS)),
        )
    if invalid:
        first_line, first_problem = invalid[0]
        logger.warning(
            "Skipped %d %s in %s with an invalid value, first line %d: %s",
            len(invalid),
            "line" if len(invalid) == 1 else "lines",
            source,
            first_line,
            first_problem,
        )
    if not records:
        raise ConfigError(
            f"metrics log {source} has no metrics reports; expected one JSON "
            "object per line as published on dslo/<device>/metrics"
        )
    return records


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    """Yield the lines of a file as ``bytes.splitlines`` splits its content.

    Iterating a binary file splits only after a line feed, but ``splitlines``
    also splits at a lone carriage return, and warnings count those lines.
    """
    for chunk in stream:
        yield from chunk.splitlines()


def _read_reports(
    lines: Iterable[bytes],
) -> tuple[list[dict[str, Any]], int, int, list[tuple[int, str]]]:
    """Parse metrics reports from lines, counting the lines that are not reports.

    Returns:
        The reports, the count of lines that are not JSON objects with the
        ``REPORT_KEYS``, the count of lines that are not UTF-8 text, and the
        line number and problem of each report with an invalid value.
    """
    collector = ReportCollector([field for field, _ in LATENCY_FIELDS])
    skipped = 0
    not_text = 0
    invalid: list[tuple[int, str]] = []
    for number, raw in enumerate(lines, start=1):
        # A power cut can leave zeros where the last lines before it were,
        # and the daemon appends its next report right after them.
        raw = raw.lstrip(b"\0")
        if not raw.strip():
            continue
        try:
            record = parse_json(raw.decode("utf-8"))
        except UnicodeDecodeError:
            not_text += 1
            continue
        except ValueError:
            skipped += 1
            continue
        if not isinstance(record, dict) or not REPORT_KEYS <= record.keys():
            skipped += 1
            continue
        problem = _invalid_value(record)
        if problem is None:
            collector.add(record)
        else:
            invalid.append((number, problem))
    return collector.reports(), skipped, not_text, invalid


def _invalid_value(record: dict[str, Any]) -> str | None:
    """Describe the first field of ``record`` whose value the daemon never writes."""
    device = record["device"]
    if not isinstance(device, str):
        return f"device = {json.dumps(device)}, expected a string"
    for name in FINITE_FIELDS:
        value = record.get(name)
        number = _as_float(value)
        if name in record and (number is None or not math.isfinite(number)):
            return f"{name} = {json.dumps(value)}, expected a finite number"
    for name in NUMBER_OR_NULL_FIELDS:
        value = record.get(name)
        if value is not None and _as_float(value) is None:
            return f"{name} = {json.dumps(value)}, expected a number or null"
    return None


def _as_float(value: Any) -> float | None:
    """Convert a JSON number to float, or return None for another value.

    A JSON int can be beyond the float range, where float() raises
    OverflowError, and the daemon never writes one.
    """
    if not is_number(value):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def read_metrics_logs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read several metrics logs, such as rotated ones, in time order.

    The files are ordered by the timestamp of their first report, so
    ``metrics.jsonl`` given before ``metrics.jsonl.1`` still plots forward
    in time. Reports inside a file keep their order.

    Raises:
        ConfigError: a file is given twice, cannot be read or contains no
            report at all.
    """
    sources = [Path(path) for path in paths]
    for index, source in enumerate(sources):
        for earlier in sources[:index]:
            if _same_file(source, earlier):
                raise ConfigError(
                    f"metrics log {source} is given twice (also as {earlier}); "
                    "give each log once"
                )
    logs = [(source, read_metrics_log(source)) for source in sources]
    ordered = sorted(logs, key=lambda log: _first_timestamp(log[1]))
    if [source for source, _ in ordered] != sources:
        logger.info(
            "Read the metrics logs in time order: %s",
            ", ".join(str(source) for source, _ in ordered),
        )
    return [record for _, records in ordered for record in records]


def newest_device_reports(
    records: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Keep the reports of the device that sent the last report.

    Logs of several devices, given together or written to one
    ``metrics_file``, would otherwise be drawn as one line under one
    device's name.

    Returns:
        The kept reports in their order, and the count of left-out reports
        per other device.
    """
    device = records[-1].get("device")
    kept = [record for record in records if record.get("device") == device]
    others: dict[str, int] = {}
    for record in records:
        if record.get("device") != device:
            name = str(record.get("device"))
            others[name] = others.get(name, 0) + 1
    return kept, others


def _same_file(first: Path, second: Path) -> bool:
    try:
        return first.samefile(second)
    except OSError:
        return first == second


def _first_timestamp(records: Sequence[dict[str, Any]]) -> float:
    """Return the first report's timestamp, or infinity when none has one."""
    for record in records:
        stamp: Any = record.get("timestamp")
        if is_number(stamp):
            return float(stamp)
    return float("inf")


def _lookup(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def series(
    records: Sequence[dict[str, Any]], dotted: str
) -> tuple[list[float], list[float]]:
    """Return (minutes since the first report, value) for a numeric field.

    ``dotted`` names a nested field, for example ``teacher.mean_entropy``.
    Reports without the field, or with null, are left out. So are the
    ``teacher`` figures of a report whose teacher monitor (for a multi-head
    student, the head's monitor) has ``latest_round`` 0, because the monitor
    reports 0.0 for them before its first batch.
    """
    start = next(
        (
            r["timestamp"]
            for r in records
            if isinstance(r.get("timestamp"), int | float)
        ),
        0.0,
    )
    times, values = [], []
    for index, record in enumerate(records):
        value = _lookup(record, dotted)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if dotted.startswith("teacher.") and _before_first_batch(record, dotted):
            continue
        stamp = record.get("timestamp")
        minutes = (stamp - start) / 60 if isinstance(stamp, int | float) else index
        times.append(minutes)
        values.append(float(value))
    return times, values


def _before_first_batch(record: dict[str, Any], dotted: str) -> bool:
    """Check whether the monitor that reports ``dotted`` has seen no batch yet."""
    monitor = dotted.rsplit(".", 1)[0]
    latest_round = _lookup(record, f"{monitor}.latest_round")
    return is_number(latest_round) and latest_round == 0


def head_series(
    records: Sequence[dict[str, Any]], dotted: str
) -> list[tuple[str | None, list[float], list[float]]]:
    """Return (head, minutes, values) per line to plot for a field.

    A multi-head student reports ``teacher`` per head, as
    ``teacher.<head>.mean_entropy``. When ``dotted`` has no values and its
    parent object contains one object per head, each head gets its own line.
    Otherwise the one line has head None.
    """
    times, values = series(records, dotted)
    parent, _, name = dotted.rpartition(".")
    if values or not parent:
        return [(None, times, values)]
    heads: dict[str, None] = {}
    for record in records:
        for head, figures in as_mapping(_lookup(record, parent)).items():
            if isinstance(figures, dict) and name in figures:
                heads[head] = None
    lines: list[tuple[str | None, list[float], list[float]]] = []
    for head in heads:
        times, values = series(records, f"{parent}.{head}.{name}")
        if values:
            lines.append((head, times, values))
    return lines or [(None, [], [])]


def alpha_series(
    records: Sequence[dict[str, Any]],
) -> list[tuple[str | None, list[float], list[float]]]:
    """Return (label, minutes, values) per mean alpha line to plot.

    A multi-head student reports ``mean_alpha`` over all heads' samples and
    each head's own as ``dynamic.heads.<head>.alpha.mean``, so it gets an
    "all heads" line and one line per head. Otherwise the one line has label
    None.
    """
    times, values = series(records, "mean_alpha")
    heads: dict[str, None] = {}
    for record in records:
        for head, figures in as_mapping(_lookup(record, "dynamic.heads")).items():
            if isinstance(figures, dict):
                heads[head] = None
    lines: list[tuple[str | None, list[float], list[float]]] = []
    for head in heads:
        head_times, head_values = series(records, f"dynamic.heads.{head}.alpha.mean")
        if head_values:
            lines.append((head, head_times, head_values))
    if not lines:
        return [(None, times, values)]
    return [("all heads", times, values), *lines]


def probe_series(
    records: Sequence[dict[str, Any]],
) -> list[tuple[str | None, list[float], list[float]]]:
    """Return (label, minutes, values) per probe accuracy line to plot.

    A multi-head student reports ``probe_accuracy`` as the mean over its
    heads and each head's accuracy in ``probe_accuracy_heads``, and it rolls
    back when any one head falls. So it gets an "all heads" line and one
    line per head. Otherwise the one line has label None.
    """
    times, values = series(records, "probe_accuracy")
    heads: dict[str, None] = {}
    for record in records:
        for head in as_mapping(record.get("probe_accuracy_heads")):
            heads[head] = None
    lines: list[tuple[str | None, list[float], list[float]]] = []
    for head in heads:
        head_times, head_values = series(records, f"probe_accuracy_heads.{head}")
        if head_values:
            lines.append((head, head_times, head_values))
    if not lines:
        return [(None, times, values)]
    return [("all heads", times, values), *lines]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ConfigError(
            "plotting needs matplotlib; install it with: "
            "pip install 'dslo-edge[report]'"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def write_report(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``latency.png``, ``training.png`` and ``energy.png`` into a directory.

    The plots are saved into a staging folder first and replace the earlier
    ones only when all three are written, so a failed or interrupted run
    leaves an earlier report as it was (see ``dslo_edge.report_staging``).

    Returns:
        The paths written.

    Raises:
        ConfigError: matplotlib is not installed.
        OutputPathError: the directory or a plot cannot be written.
    """
    pyplot = _pyplot()
    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputPathError(
            f"cannot create the report directory {folder}: {error}; "
            "choose another --out"
        ) from error
    device = records[-1].get("device", "device")
    staging = make_staging_dir(folder)
    try:
        staged = [
            _plot_latency(pyplot, records, staging / "latency.png", device),
            _plot_training(pyplot, records, staging / "training.png", device),
            _plot_energy(pyplot, records, staging / "energy.png", device),
        ]
        return move_into_place(staged, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def latest_histogram(
    records: Sequence[dict[str, Any]], field: str
) -> tuple[dict[str, Any], tuple[list[float], list[float]]] | None:
    """Return ``field``'s summary and histogram from the newest report with samples.

    A daemon that restarted publishes reports with empty latency windows
    until it applies an update, so the last report of a log can have no
    samples while earlier ones do.
    """
    for record in reversed(records):
        summary = as_mapping(record.get(field))
        histogram = histogram_of(summary)
        if histogram is not None:
            return summary, histogram
    return None


def _save(pyplot: Any, figure: Any, path: Path) -> Path:
    try:
        figure.savefig(path, dpi=100)
    except OSError as error:
        raise OutputPathError(
            f"cannot write the plot {path}: {error}; choose another --out"
        ) from error
    finally:
        pyplot.close(figure)
    return path


def _empty(axes: Any, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes)
    # tick_params hides this panel's ticks only. set_xticks([]) would also
    # clear the ticks of every panel that shares the x axis.
    axes.tick_params(bottom=False, left=False, labelbottom=False, labelleft=False)


def _plot_latency(
    pyplot: Any, records: Sequence[dict[str, Any]], path: Path, device: str
) -> Path:
    figure, axes_row = pyplot.subplots(1, len(LATENCY_FIELDS), figsize=(15, 4.2))
    for axes, (field, title) in zip(axes_row, LATENCY_FIELDS, strict=True):
        latest = latest_histogram(records, field)
        if latest is None:
            axes.set_title(title)
            _empty(axes, f"no {field} histogram with samples in the log")
            continue
        summary, (edges, counts) = latest
        axes.set_title(f"{title}, last {summary.get('count', 0)} updates")
        widths = [high - low for low, high in zip(edges[:-1], edges[1:], strict=True)]
        axes.bar(
            edges[:-1],
            counts,
            width=widths,
            align="edge",
            color="#4c72b0",
            edgecolor="white",
        )
        axes.set_xscale("log")
        axes.set_xlabel("latency (ms)")
        axes.set_ylabel("updates")
        for name, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            value = summary.get(name)
            if is_number(value):
                axes.axvline(
                    value,
                    color="#c44e52",
                    linestyle=style,
                    label=f"{name} {value:.3g} ms",
                )
        axes.legend(fontsize="small")
    figure.suptitle(f"Latency on {device}")
    figure.tight_layout()
    return _save(pyplot, figure, path)


def _plot_training(
    pyplot: Any, records: Sequence[dict[str, Any]], path: Path, device: str
) -> Path:
    return _save(pyplot, _training_figure(pyplot, records, device), path)


def _training_figure(
    pyplot: Any, records: Sequence[dict[str, Any]], device: str
) -> Any:
    """Draw alpha, teacher entropy, loss and probe accuracy over time."""
    panels = (
        ("mean_alpha", "mean alpha (distillation weight)"),
        ("teacher.mean_entropy", "teacher entropy (normalised)"),
        ("loss", "training loss"),
        ("probe_accuracy", "probe accuracy"),
    )
    figure, grid = pyplot.subplots(2, 2, figsize=(12, 7), sharex=True)
    empty: set[int] = set()
    for index, (axes, (field, title)) in enumerate(zip(grid.flat, panels, strict=True)):
        if field == "mean_alpha":
            lines = alpha_series(records)
        elif field == "probe_accuracy":
            lines = probe_series(records)
        else:
            lines = head_series(records, field)
        axes.set_title(title)
        if not any(values for _, _, values in lines):
            _empty(axes, f"no {field} in the log")
            empty.add(index)
            continue
        for head, times, values in lines:
            marker = "." if len(values) < 50 else None
            if head == "all heads":
                # Black keeps each head's color the same as in the other panels.
                axes.plot(times, values, marker=marker, label=head, color="black")
            else:
                axes.plot(times, values, marker=marker, label=head)
        if lines[0][0] is not None:
            axes.legend(title="head", fontsize="small")
        axes.grid(alpha=0.3)
    for column, axes in enumerate(grid[1]):
        if column + 2 in empty and column not in empty:
            # sharex hides the tick labels of the top row, so without this a
            # panel above an empty one has no time axis.
            axes = grid[0][column]
            axes.tick_params(labelbottom=True)
        axes.set_xlabel("minutes since the first report")
    figure.suptitle(f"Adaptation on {device}")
    figure.tight_layout()
    return figure


def latest_energy(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the ``energy`` object of the newest report that has an energy figure.

    After a restart the daemon reports no ``joules_per_update`` and no battery
    figures until it trains again, so the last report may have none. Without
    any such report this returns the last report's ``energy``.
    """
    for record in reversed(records):
        energy = as_mapping(record.get("energy"))
        if is_number(energy.get("joules_per_update")):
            return energy
    return as_mapping(records[-1].get("energy"))


def _plot_energy(
    pyplot: Any, records: Sequence[dict[str, Any]], path: Path, device: str
) -> Path:
    figure, axes = pyplot.subplots(figsize=(9, 4.2))
    times, values = series(records, "energy.joules_per_update")
    energy = latest_energy(records)
    source = str(energy.get("source") or "no source")
    if energy.get("estimated"):
        source += ", an estimate"
    axes.set_title(f"Energy per update on {device} ({source})", fontsize="medium")
    if not values:
        _empty(axes, "no energy.joules_per_update in the log")
    else:
        axes.plot(
            times, [v * 1000 for v in values], marker="." if len(values) < 50 else None
        )
        axes.set_xlabel("minutes since the first report")
        axes.set_ylabel("mJ per update")
        axes.grid(alpha=0.3)
        battery = as_mapping(energy.get("battery"))
        per_thousand = battery.get("percent_per_1000_updates")
        if is_number(per_thousand):
            axes.text(
                0.99,
                0.95,
                f"battery: {per_thousand:.3g}% per 1,000 updates "
                f"({battery.get('capacity_source')})",
                ha="right",
                va="top",
                transform=axes.transAxes,
                fontsize="small",
            )
    figure.tight_layout()
    return _save(pyplot, figure, path)
