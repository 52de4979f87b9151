"""The quick bench end to end: every figure is in the JSON, with values.

Timings are never asserted: the machine is shared and the quick run is short.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dslo_edge.bench_process import cpu_us_per_message, thread_cpu_s
from dslo_edge.broker import find_mosquitto

pytest.importorskip("keras")

FIGURES = {
    "train_step",
    "dynamic_part",
    "dynamic_engine",
    "dynamic_part_floor",
    "throughput",
    "latency_p50",
    "latency_p99",
    "latency_p50_light_step",
    "latency_p99_light_step",
    "peak_rss",
    "startup",
    "wire_bytes",
    "wire_bytes_float16",
    "wire_bytes_top_k",
    "throughput_coalesced",
}


@pytest.mark.slow
@pytest.mark.skipif(find_mosquitto() is None, reason="the bench needs mosquitto")
def test_quick_bench_writes_every_figure(tmp_path) -> None:
    from dslo_edge.cli import main

    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", "--quick", "--out", str(out)])

    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert report["quick"] is True
    assert report["command"] == "dslo-edge bench --quick"
    assert set(report["figures"]) == FIGURES
    for name, figure in report["figures"].items():
        for field in ("value", "reference", "ratio"):
            assert isinstance(figure[field], (int, float)), (name, field)
            assert math.isfinite(figure[field]), (name, field)
            assert figure[field] > 0, (name, field)
        assert isinstance(figure["met"], bool), name
        assert figure["target"], name
    for name in FIGURES:
        assert name in result.output
    daemon = report["measured"]["daemon"]
    assert daemon["exit_code"] == 0
    assert daemon["rejected"] == {}
    assert daemon["applied"] == 120
    # One reading per throughput run: busiest thread first, all positive.
    (cpu,) = daemon["thread_cpu_us_per_message"]
    assert cpu
    assert cpu == sorted(cpu, reverse=True)
    assert cpu[-1] > 0
    assert "daemon CPU per message in the median throughput run" in result.output
    coalesced = report["measured"]["throughput_coalesced_samples_per_s"]
    assert coalesced["batch_size"] == 256
    assert coalesced["exit_code"] == 0
    # A warm-up of 10 messages, then the quick run's 100.
    assert coalesced["applied"] == 110
    assert len(coalesced["thread_cpu_us_per_message"]) == 1
    # The checkpoint is timed with the stores at their default capacity.
    checkpoint = report["measured"]["checkpoint"]
    assert checkpoint["stored_ids"] == 10_000
    assert checkpoint["content_ms"] > 0
    assert checkpoint["write_ms"] > 0
    assert "checkpoint of 10,000 smoothing and monitor ids" in result.output


def test_bench_out_under_file_fails_first(tmp_path) -> None:
    from dslo_edge.cli import main

    blocker = tmp_path / "afile"
    blocker.write_text("")

    result = CliRunner().invoke(main, ["bench", "--out", str(blocker / "out")])

    assert result.exit_code == 2, result.output
    assert f"Invalid value for --out: cannot write into {blocker}/out" in (
        result.output
    )
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert blocker.read_text() == ""


def test_docs_table_names_every_figure() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    table = docs.read_text().split("## Results")[0]
    named = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            named.update(re.findall(r"`([a-z0-9_]+)`", first_cell))

    assert named == FIGURES


def test_thread_cpu_counts_this_thread() -> None:
    pid, thread = os.getpid(), threading.get_native_id()
    before = thread_cpu_s(pid)
    started = time.thread_time()
    while time.thread_time() - started < 0.2:
        pass
    after = thread_cpu_s(pid)

    assert before is not None and after is not None
    assert after[thread] - before[thread] >= 0.15
    assert thread_cpu_s(2**22 + 1) is None


def _has_scheduler_statistics() -> bool:
    try:
        with open("/proc/self/schedstat") as schedstat:
            return int(schedstat.read().split()[0]) > 0
    except (OSError, ValueError, IndexError):
        return False


@pytest.mark.skipif(
    not _has_scheduler_statistics(), reason="the kernel keeps no scheduler statistics"
)
def test_thread_cpu_below_one_tick() -> None:
    # A quick bench run keeps a daemon thread busy for less than one 10 ms
    # tick. The worker is blocked at both readings, so its run time is exact.
    start, spun, finish = threading.Event(), threading.Event(), threading.Event()
    native_id = []

    def spin() -> None:
        native_id.append(threading.get_native_id())
        start.wait()
        started = time.thread_time()
        while time.thread_time() - started < 0.002:
            pass
        spun.set()
        finish.wait()

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        time.sleep(0.05)
        before = thread_cpu_s(os.getpid())
        start.set()
        assert spun.wait(5)
        time.sleep(0.05)
        after = thread_cpu_s(os.getpid())
    finally:
        start.set()
        finish.set()
        worker.join()

    assert before is not None and after is not None
    (thread,) = native_id
    assert 0.0019 <= after[thread] - before[thread] < 0.02


def test_cpu_per_message_leaves_out_idle_threads() -> None:
    # Thread 5 used 4 us in all, 0.04 us per message, which rounds to 0.
    before = {1: 1.0, 2: 5.0, 3: 0.5, 5: 2.0}
    after = {1: 1.2, 2: 5.0, 3: 0.6, 4: 0.02, 5: 2.000004}

    assert cpu_us_per_message(before, after, 100) == [2000.0, 1000.0, 200.0]
    assert cpu_us_per_message(None, after, 100) is None
    assert cpu_us_per_message(before, after, 0) is None


def test_queue_size_option_reaches_both_daemons() -> None:
    from dslo_edge.bench import COALESCED_SETTINGS, BenchOptions, _command

    options = BenchOptions.quick_run(queue_size=256)

    assert options.daemon_settings() == {"training": {"queue_size": 256}}
    assert options.daemon_settings(COALESCED_SETTINGS) == {
        "training": {"batch_size": 256, "batch_wait_ms": 0, "queue_size": 256}
    }
    assert "queue_size" not in COALESCED_SETTINGS["training"]
    assert _command(options) == "dslo-edge bench --quick --queue-size 256"


def test_default_bench_keeps_config_defaults() -> None:
    from dslo_edge.bench import COALESCED_SETTINGS, BenchOptions, _command

    options = BenchOptions()

    assert options.daemon_settings() is None
    assert options.daemon_settings(COALESCED_SETTINGS) is COALESCED_SETTINGS
    assert _command(options) == "dslo-edge bench"
