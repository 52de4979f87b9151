"""``dslo-edge bench``: each performance figure beside its reference, in one run.

The machines this runs on are shared and noisy. So every figure is measured
next to a reference in the same run and reported as a median over repeats,
and a target stated as a ratio is judged on that ratio. The run needs the
``convert`` extra (TensorFlow converts the bundle and runs the reference
train step) and mosquitto.

| figure | reference |
|---|---|
| train step, digits MLP, batch 32 | the same step as a TensorFlow ``tf.function`` |
| dynamic part (decode, validate, smoothing, alpha) | the train step |
| dynamic part alone (entropy, monitor, smoothing, alpha) | the whole update |
| samples per second applied by the daemon | two plain clients, same payloads |
| the same, coalescing queued updates into steps of 256 | the same |
| end-to-end latency p50 and p99, light load | broker-only latency plus one train step |
| daemon peak RSS and start-up time | a bare Python process importing numpy |
| bytes per sample on the wire | the same update as JSON |
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.bench_local import (
    measure_checkpoint,
    measure_train_step,
    measure_update_split,
    measure_wire_bytes,
)
from dslo_edge.bench_mqtt import (
    DaemonProcess,
    make_payloads,
    reference_latency,
    reference_throughput,
    with_new_ids,
)
from dslo_edge.bench_process import measure_startup
from dslo_edge.broker import Broker, find_mosquitto
from dslo_edge.checkpoint import fsync_directory
from dslo_edge.errors import DsloError

BENCH_FILE = "bench.json"
# The report of the run before, kept so that an interrupted run does not
# leave it under the name of this run's report.
PREVIOUS_BENCH_FILE = "bench-previous.json"
TEMPORARY_PREFIX = f".{BENCH_FILE}."
THROUGHPUT_TARGET = 20_000.0
# Samples per train step of the second daemon, which coalesces queued
# updates (training.batch_size) and never waits for more (batch_wait_ms 0).
COALESCED_BATCH = 256
COALESCED_SETTINGS = {"training": {"batch_size": COALESCED_BATCH, "batch_wait_ms": 0}}
RSS_TARGET_MB = 80.0
STARTUP_TARGET_S = 1.5
# dslo_edge.broker's default mosquitto settings plus set_tcp_nodelay.
MOSQUITTO_NODELAY = (
    "listener {port} 127.0.0.1\n"
    "allow_anonymous true\n"
    "max_queued_messages 10000\n"
    "max_inflight_messages 100\n"
    "set_tcp_nodelay true\n"
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchOptions:
    """Sizes of one bench run.

    Attributes:
        quick: the short run for CI; its figures are too few to judge.
        message_samples: samples per MQTT message.
        train_repeats: blocks of ``train_steps`` steps per side.
        dynamic_updates: updates timed for the dynamic part.
        latency_messages: messages sent at light load, one per
            ``latency_gap_s``.
        throughput_messages: messages per throughput run.
        throughput_repeats: throughput runs per side.
        startup_repeats: process starts per side.
        tcp_nodelay: start mosquitto with ``set_tcp_nodelay true``, which
            turns off Nagle's algorithm on its client sockets.
        queue_size: ``training.queue_size`` of both daemons, or None for
            the default of the device config.
    """

    quick: bool = False
    message_samples: int = 32
    train_repeats: int = 15
    train_steps: int = 200
    dynamic_updates: int = 300
    latency_messages: int = 300
    latency_gap_s: float = 0.02
    throughput_messages: int = 2000
    throughput_repeats: int = 3
    startup_repeats: int = 5
    tcp_nodelay: bool = False
    queue_size: int | None = None

    @classmethod
    def quick_run(
        cls,
        message_samples: int = 32,
        tcp_nodelay: bool = False,
        queue_size: int | None = None,
    ) -> BenchOptions:
        """Return the options of ``--quick``: seconds per figure."""
        return cls(
            quick=True,
            message_samples=message_samples,
            train_repeats=3,
            train_steps=50,
            dynamic_updates=30,
            latency_messages=20,
            throughput_messages=100,
            throughput_repeats=1,
            startup_repeats=1,
            tcp_nodelay=tcp_nodelay,
            queue_size=queue_size,
        )

    def daemon_settings(
        self, settings: dict[str, dict[str, Any]] | None = None
    ) -> dict[str, dict[str, Any]] | None:
        """Return the config overrides of a bench daemon, with the queue size."""
        if self.queue_size is None:
            return settings
        merged = {table: dict(values) for table, values in (settings or {}).items()}
        merged.setdefault("training", {})["queue_size"] = self.queue_size
        return merged


@dataclass(frozen=True)
class Figure:
    """One row of the table: a figure, its reference and the target.

    ``ratio`` is defined per figure (see ``_figures``) so that the target
    can be stated on it. ``met`` is True when this run reached the target.
    """

    name: str
    unit: str
    value: float
    reference: float
    reference_name: str
    ratio: float
    target: str
    met: bool


def run_bench(out: Path, options: BenchOptions) -> dict[str, Any]:
    """Run every measurement, write ``out/bench.json`` and return the report.

    Raises:
        DsloError: TensorFlow or mosquitto is missing, or a run failed.
    """
    if find_mosquitto() is None:
        raise DsloError(
            "the bench needs mosquitto (apt-get install mosquitto) for its "
            "throughput and latency runs"
        )
    prepare_out_dir(out)
    bundle, reference = _tensorflow_side(out)

    measured: dict[str, Any] = {}
    measured["train_step"] = asdict(
        measure_train_step(
            bundle,
            reference,
            repeats=options.train_repeats,
            steps=options.train_steps,
        )
    )
    measured["update_split"] = measure_update_split(
        bundle, updates=options.dynamic_updates, warmup=min(50, options.dynamic_updates)
    )
    measured["wire"] = measure_wire_bytes()
    measured["checkpoint"] = measure_checkpoint(bundle, out / "checkpoint")
    # The publisher and the hub client run in this process, which also
    # contains TensorFlow's objects. A full garbage collection of them took
    # about 170 ms (2-core Xeon, Python 3.11) and stalled the publisher in
    # the third throughput run of each daemon, so gc.freeze moves them out
    # of the collector's reach first.
    gc.collect()
    gc.freeze()
    try:
        measured.update(_mqtt_figures(out, bundle, options))
    finally:
        gc.unfreeze()

    report = {
        "command": _command(options),
        "quick": options.quick,
        "options": asdict(options),
        "environment": _environment(),
        "figures": {f.name: asdict(f) for f in _figures(measured)},
        "measured": measured,
    }
    write_bench_json(out, report)
    return report


def prepare_out_dir(out: Path) -> Path | None:
    """Create ``out`` and rename an earlier run's bench.json to bench-previous.json.

    Temporary files of a killed run's bench.json are deleted.

    bench.json is written only when a run ends, so an earlier one left in
    place would sit beside the files of an interrupted run as if it were
    that run's result.

    Returns:
        The path of the renamed earlier report, or None if there was none.

    Raises:
        DsloError: ``out/bench.json`` is a directory, or it cannot be
            renamed.
    """
    out.mkdir(parents=True, exist_ok=True)
    # Left by a run killed while it wrote bench.json. A second run into the
    # same folder would clash with this one's broker and device folders
    # anyway, so no running writer is checked for.
    for leftover in out.glob(f"{TEMPORARY_PREFIX}*.tmp"):
        leftover.unlink(missing_ok=True)
    earlier = out / BENCH_FILE
    if not earlier.exists() and not earlier.is_symlink():
        return None
    if earlier.is_dir():
        raise DsloError(
            f"{earlier} is a directory, but the bench writes its report there; "
            "move it away or choose another --out"
        )
    previous = out / PREVIOUS_BENCH_FILE
    try:
        os.replace(earlier, previous)
    except OSError as error:
        raise DsloError(
            f"cannot rename the earlier {earlier} to {previous}: "
            f"{error.strerror or error}; move one of them away"
        ) from error
    logger.info("Renamed the earlier %s to %s", earlier, previous)
    return previous


def write_bench_json(out: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` to ``out/bench.json`` through a temporary file and a rename.

    A write that fails, such as on a full disk, leaves bench.json as it was
    and no partial file under that name. The folder is fsynced after the
    rename, so the new file survives a power loss.
    """
    path = out / BENCH_FILE
    temporary = out / f"{TEMPORARY_PREFIX}{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as stream:
            stream.write(json.dumps(report, indent=2) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        fsync_directory(out)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _tensorflow_side(out: Path) -> tuple[Path, Any]:
    try:
        from converters.bench_reference import (
            TensorFlowTrainStep,
            convert_digits_pair,
        )
    except ImportError as error:
        raise DsloError(
            f"the bench needs TensorFlow ({error}); install the convert extra: "
            'pip install -e ".[convert]"'
        ) from error
    student, bundle = convert_digits_pair(out)
    return bundle, TensorFlowTrainStep(student)


def _mqtt_figures(out: Path, bundle: Path, options: BenchOptions) -> dict[str, Any]:
    samples = options.message_samples
    latency_payloads = make_payloads(options.latency_messages, samples)
    throughput_payloads = make_payloads(options.throughput_messages, samples)
    device = _fresh_device_dir(out / "device")
    config_text = MOSQUITTO_NODELAY if options.tcp_nodelay else None
    with Broker.start(
        kind="mosquitto", workdir=out / "broker", config_text=config_text
    ) as broker:
        host, port = broker.host, broker.port
        broker_latency = reference_latency(
            host, port, latency_payloads, options.latency_gap_s
        )
        daemon = DaemonProcess.start(
            device, bundle, host, port, options.daemon_settings()
        )
        try:
            daemon_latency = daemon.latency(
                with_new_ids(latency_payloads), options.latency_gap_s
            )
            broker_rates, daemon_rates = _alternating_throughput(
                daemon, host, port, throughput_payloads, options.throughput_repeats
            )
            metrics = daemon.metrics()
        finally:
            exit_code = daemon.stop()
        coalesced = _coalesced_throughput(
            out / "device-coalesced", bundle, host, port, throughput_payloads, options
        )
        startup = measure_startup(
            device / "device.toml", device / "daemon.log", options.startup_repeats
        )
    return {
        "latency_ms": {
            "daemon": _without_histogram(daemon_latency),
            "broker_only": broker_latency,
        },
        "throughput_samples_per_s": {
            "daemon": [round(rate) for rate in daemon_rates],
            "broker_only": [round(rate) for rate in broker_rates],
        },
        "throughput_coalesced_samples_per_s": coalesced,
        "daemon": {
            "peak_rss_mb": metrics.get("peak_rss_mb"),
            "applied": metrics.get("applied"),
            "rejected": metrics.get("rejected"),
            "train_ms": _without_histogram(metrics.get("train_ms")),
            "thread_cpu_us_per_message": daemon.thread_cpu,
            "exit_code": exit_code,
        },
        "startup": startup,
    }


def _fresh_device_dir(device: Path) -> Path:
    """Create ``device`` and delete checkpoints that an earlier run left there."""
    device.mkdir(exist_ok=True)
    for old in (device / "state" / "checkpoints").glob("*"):
        old.unlink()
    return device


def _alternating_throughput(
    daemon: DaemonProcess, host: str, port: int, payloads: list[bytes], repeats: int
) -> tuple[list[float], list[float]]:
    """Return broker-only and daemon rates of ``repeats`` alternating runs."""
    broker_rates, daemon_rates = [], []
    for _ in range(repeats):
        run = with_new_ids(payloads)
        broker_rates.append(reference_throughput(host, port, run))
        daemon_rates.append(daemon.throughput(with_new_ids(run)))
    return broker_rates, daemon_rates


def _coalesced_throughput(
    device: Path,
    bundle: Path,
    host: str,
    port: int,
    payloads: list[bytes],
    options: BenchOptions,
) -> dict[str, Any]:
    """Measure throughput of a daemon that trains in steps of COALESCED_BATCH.

    Each run alternates with a broker-only run of the same payloads, as for
    the daemon with the defaults. A first run of a tenth of the payloads,
    not counted, warms the daemon up, as the latency run does for the
    daemon with the defaults.
    """
    daemon = DaemonProcess.start(
        _fresh_device_dir(device),
        bundle,
        host,
        port,
        options.daemon_settings(COALESCED_SETTINGS),
        device_id="bench-coalesced",
    )
    try:
        daemon.throughput(with_new_ids(payloads[: max(1, len(payloads) // 10)]))
        daemon.thread_cpu.clear()
        broker_rates, daemon_rates = _alternating_throughput(
            daemon, host, port, payloads, options.throughput_repeats
        )
        applied = daemon.metrics().get("applied")
    finally:
        exit_code = daemon.stop()
    return {
        "batch_size": COALESCED_BATCH,
        "daemon": [round(rate) for rate in daemon_rates],
        "broker_only": [round(rate) for rate in broker_rates],
        "applied": applied,
        "thread_cpu_us_per_message": daemon.thread_cpu,
        "exit_code": exit_code,
    }


def _without_histogram(window: Any) -> Any:
    if not isinstance(window, dict):
        return window
    return {key: value for key, value in window.items() if key != "histogram"}


def _figures(measured: dict[str, Any]) -> list[Figure]:
    return (
        _compute_figures(measured)
        + _latency_figures(measured)
        + _process_figures(measured)
        + _wire_figures(measured["wire"])
    )


def _compute_figures(measured: dict[str, Any]) -> list[Figure]:
    step = measured["train_step"]
    split = measured["update_split"]
    floor_us = split["numpy_floor_us"]
    floor_share = round(floor_us / (floor_us + split["train_us"]), 4)
    rates = measured["throughput_samples_per_s"]
    return [
        Figure(
            "train_step",
            "us",
            step["interpreter_us"],
            step["tensorflow_us"],
            "TensorFlow tf.function",
            _ratio(step["tensorflow_us"], step["interpreter_us"]),
            ">= 30x faster",
            step["tensorflow_us"] >= 30 * step["interpreter_us"],
        ),
        Figure(
            "dynamic_part",
            "us",
            split["dynamic_us"],
            split["train_us"],
            "train step",
            split["share"],
            "<= 10% of update time",
            split["share"] <= 0.10,
        ),
        Figure(
            "dynamic_engine",
            "us",
            split["smoothing_alpha_us"],
            split["update_us"],
            "whole update",
            split["engine_share"],
            "<= 10% of update time",
            split["engine_share"] <= 0.10,
        ),
        Figure(
            "dynamic_part_floor",
            "us",
            floor_us,
            split["train_us"],
            "train step",
            floor_share,
            "<= 10% of update time",
            floor_share <= 0.10,
        ),
        _throughput_figure("throughput", rates),
        _throughput_figure(
            "throughput_coalesced", measured["throughput_coalesced_samples_per_s"]
        ),
    ]


def _throughput_figure(name: str, rates: dict[str, Any]) -> Figure:
    daemon_rate = statistics.median(rates["daemon"])
    broker_rate = statistics.median(rates["broker_only"])
    return Figure(
        name,
        "samples/s",
        round(daemon_rate),
        round(broker_rate),
        "broker only",
        _ratio(daemon_rate, broker_rate),
        ">= 20,000/s and >= 50% of broker only",
        daemon_rate >= THROUGHPUT_TARGET and daemon_rate >= 0.5 * broker_rate,
    )


def _latency_figures(measured: dict[str, Any]) -> list[Figure]:
    """Return end-to-end latency against two references.

    The first adds the median train step of the hot loop in ``train_step``.
    The second adds the daemon's own train step at the same percentile in
    the latency run. With updates 20 ms apart that step takes several times
    as long as in a hot loop (0.16 against 0.035 ms at p50 in one run),
    likely because caches are cold.
    """
    latency = measured["latency_ms"]
    hot_step_ms = measured["train_step"]["interpreter_us"] / 1000
    light_step_ms = latency["daemon"].get("train_step_ms", {})
    figures = []
    for percentile in ("p50", "p99"):
        value = latency["daemon"][percentile]
        broker_ms = latency["broker_only"][percentile]
        references = [
            (f"latency_{percentile}", hot_step_ms, "broker only + train step"),
            (
                f"latency_{percentile}_light_step",
                light_step_ms.get(percentile),
                "broker only + train step at light load",
            ),
        ]
        for name, step_ms, reference_name in references:
            if step_ms is None:
                continue
            reference = broker_ms + step_ms
            figures.append(
                Figure(
                    name,
                    "ms",
                    value,
                    round(reference, 3),
                    reference_name,
                    _ratio(value, reference),
                    "<= 2x reference",
                    value <= 2 * reference,
                )
            )
    return figures


def _process_figures(measured: dict[str, Any]) -> list[Figure]:
    startup = measured["startup"]
    peak_rss = float(measured["daemon"]["peak_rss_mb"] or 0.0)
    return [
        Figure(
            "peak_rss",
            "MiB",
            peak_rss,
            startup["bare_numpy_rss_mb"],
            "python -c 'import numpy'",
            _ratio(peak_rss, startup["bare_numpy_rss_mb"]),
            "<= 80 MiB",
            peak_rss <= RSS_TARGET_MB,
        ),
        Figure(
            "startup",
            "s",
            startup["daemon_s"],
            startup["bare_numpy_s"],
            "python -c 'import numpy'",
            _ratio(startup["daemon_s"], startup["bare_numpy_s"]),
            "<= 1.5 s",
            startup["daemon_s"] <= STARTUP_TARGET_S,
        ),
    ]


def _wire_figures(wire: dict[str, Any]) -> list[Figure]:
    return [
        Figure(
            "wire_bytes",
            "B/sample",
            wire["binary_bytes_per_sample"],
            wire["json_bytes_per_sample"],
            "JSON",
            _ratio(wire["binary_bytes_per_sample"], wire["json_bytes_per_sample"]),
            "<= 1/3 of JSON",
            wire["binary_bytes_per_sample"] * 3 <= wire["json_bytes_per_sample"],
        ),
        Figure(
            "wire_bytes_float16",
            "B/sample",
            wire["float16_bytes_per_sample"],
            wire["json_bytes_per_sample"],
            "JSON",
            _ratio(wire["float16_bytes_per_sample"], wire["json_bytes_per_sample"]),
            "<= 1/3 of JSON",
            wire["float16_bytes_per_sample"] * 3 <= wire["json_bytes_per_sample"],
        ),
        Figure(
            "wire_bytes_top_k",
            "B/sample",
            wire["top_k_bytes_per_sample"],
            wire["float16_bytes_per_sample"],
            "float16 inputs, full labels",
            _ratio(wire["top_k_bytes_per_sample"], wire["float16_bytes_per_sample"]),
            "smaller than full labels",
            wire["top_k_bytes_per_sample"] < wire["float16_bytes_per_sample"],
        ),
    ]


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("nan")


def _command(options: BenchOptions) -> str:
    command = "dslo-edge bench" + (" --quick" if options.quick else "")
    if options.message_samples != 32:
        command += f" --message-samples {options.message_samples}"
    if options.tcp_nodelay:
        command += " --tcp-nodelay"
    if options.queue_size is not None:
        command += f" --queue-size {options.queue_size}"
    return command


def _environment() -> dict[str, Any]:
    from dslo_edge.runtime import interpreter_class

    _, runtime = interpreter_class()
    environment: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "runtime": f"{runtime} {_package_version(runtime)}",
        "tensorflow": _package_version("tensorflow-cpu")
        or _package_version("tensorflow"),
        "mosquitto": _mosquitto_version(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
    }
    return environment


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _mosquitto_version() -> str | None:
    binary = find_mosquitto()
    if binary is None:
        return None
    result = subprocess.run(
        [str(binary), "-h"], capture_output=True, text=True, check=False
    )
    first = (result.stdout or result.stderr).splitlines()
    return first[0].strip() if first else None


def format_table(report: dict[str, Any]) -> str:
    """Return the figures as a plain-text table."""
    header = ("figure", "value", "reference", "ratio", "target", "met")
    rows = [header]
    for figure in report["figures"].values():
        unit = figure["unit"]
        rows.append(
            (
                figure["name"],
                f"{figure['value']:g} {unit}",
                f"{figure['reference']:g} {unit} ({figure['reference_name']})",
                f"{figure['ratio']:g}",
                figure["target"],
                "yes" if figure["met"] else "no",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    code = report["measured"]["update_split"].get("code")
    if code:
        lines.append(f"dynamic part run by the {code} code")
    cpu_line = _thread_cpu_line(report)
    if cpu_line:
        lines.append(cpu_line)
    checkpoint = report["measured"].get("checkpoint")
    if checkpoint:
        lines.append(
            f"checkpoint of {checkpoint['stored_ids']:,} smoothing and monitor ids "
            f"({checkpoint['tensor_bytes'] / 2**20:.1f} MiB of tensors): "
            f"{checkpoint['content_ms']:g} ms to build, "
            f"{checkpoint['write_ms']:g} ms to write"
        )
    if report["quick"]:
        lines.append("quick run: too few repeats to judge the targets")
    return "\n".join(line.rstrip() for line in lines)


def _thread_cpu_line(report: dict[str, Any]) -> str | None:
    """Describe the daemon threads' CPU per message in the median throughput run."""
    measured = report["measured"]
    rates = measured["throughput_samples_per_s"]["daemon"]
    cpu = measured["daemon"].get("thread_cpu_us_per_message") or []
    if not rates or len(cpu) != len(rates):
        return None
    run = sorted(range(len(rates)), key=rates.__getitem__)[len(rates) // 2]
    if not cpu[run] or not rates[run]:
        return None
    threads = ", ".join(f"{value:g}" for value in cpu[run][:3])
    wall_us = report["options"]["message_samples"] / rates[run] * 1e6
    return (
        f"daemon CPU per message in the median throughput run, busiest threads: "
        f"{threads} us, against {wall_us:.0f} us of wall time"
    )
