"""The demo's text report, from the JSON report it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dslo_edge.demo import DEMO_MARKER, _daemon_exit_error, format_report
from dslo_edge.state_lock import StateLock
from tests.cli_process import run_cli

# Writes a report of about 100 kB under a 4 KiB file size limit
# (RLIMIT_FSIZE), so the write fails with EFBIG part way, as on a full disk.
WRITE_OVER_SIZE_LIMIT = """
import json
import resource
import signal
import sys
from pathlib import Path

from dslo_edge.demo import _write_report
from dslo_edge.errors import DsloError

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
report_path = Path(sys.argv[2]) if len(sys.argv) > 2 else None
try:
    _write_report({"padding": "x" * 100_000}, report_path, Path(sys.argv[1]))
except DsloError as error:
    print(error)
"""


def demo_report() -> dict:
    """Return a demo report with the figures of one real run (seed 0)."""
    return {
        "dataset": "scikit-learn digits",
        "broker": "mosquitto",
        "teacher_accuracy_shifted_test": {"teacher-round-1": 0.561},
        "student_accuracy_shifted_test": {
            "before_adaptation": 0.447,
            "after_dslo": 0.781,
            "after_static_kd": 0.828,
        },
        "updates": {"sent": 115, "applied": 115, "rejected": {}},
        "latency_ms": {
            "train_step": {"p50": 0.057, "p95": 0.241},
            "end_to_end": {"p50": 2.337, "p95": 7.549},
        },
        "energy": None,
        "daemon_peak_rss_mb": 59.6,
        "duration_s": 32.6,
        "report_path": "demo-out/report.json",
    }


def test_peak_rss_line_says_mib() -> None:
    # peak_rss_mb is VmHWM in KiB divided by 1024 (dslo_edge.metrics).
    lines = format_report(demo_report()).splitlines()

    assert "daemon peak RSS 59.6 MiB; took 32.6 s" in lines
    assert "updates: sent 115, applied 115, rejected 0" in lines


def write_over_size_limit(*paths) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WRITE_OVER_SIZE_LIMIT, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_failed_write_keeps_earlier_report(tmp_path) -> None:
    earlier = json.dumps(demo_report(), indent=2) + "\n"
    (tmp_path / "report.json").write_text(earlier)

    result = write_over_size_limit(tmp_path)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == (
        f"cannot write the report to {tmp_path / 'report.json'}: File too "
        "large; any earlier report there is unchanged. Free space or choose "
        "another --out"
    )
    assert (tmp_path / "report.json").read_text() == earlier
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json"]


def test_failed_fallback_keeps_both_reports(tmp_path) -> None:
    earlier = json.dumps(demo_report(), indent=2) + "\n"
    (tmp_path / "report.json").write_text(earlier)
    chosen = tmp_path / "chosen.json"
    chosen.write_text(earlier)

    result = write_over_size_limit(tmp_path, chosen)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"cannot write the report to {chosen}: File too large, nor to "
        f"{tmp_path / 'report.json'}: File too large; free space or choose "
        "another --report"
    )
    assert chosen.read_text() == earlier
    assert (tmp_path / "report.json").read_text() == earlier
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "chosen.json",
        "report.json",
    ]


def test_exited_daemon_error_names_last_log_line(tmp_path) -> None:
    log = tmp_path / "daemon.log"
    script = "print('INFO starting'); print('error: bundle is missing'); exit(78)"
    with log.open("wb") as stream:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=stream)
        process.wait(timeout=60)

    error = _daemon_exit_error(process, log)

    assert str(error) == (
        "the demo's daemon exited with status 78 before the push completed: "
        f"error: bundle is missing (from {log})"
    )


def test_running_daemon_gives_no_exit_error(tmp_path) -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _daemon_exit_error(process, tmp_path / "daemon.log") is None
    finally:
        process.kill()
        process.wait(timeout=60)


def test_second_demo_on_folder_names_demo(tmp_path) -> None:
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / DEMO_MARKER).write_text("Written by dslo-edge demo; safe to delete.\n")
    # The lock as a first demo holds it while it trains and converts.
    first = StateLock(out / "state", "demo-device", for_demo=True)
    try:
        result = run_cli("demo", f"--out={out}")
    finally:
        first.release()

    assert result.returncode == 78, result.stderr
    assert result.stderr == (
        f"error: {out / 'state'} is in use by another dslo-edge demo (pid "
        f"{os.getpid()}, device demo-device, dslo-edge demo); wait until it "
        "ends, or choose another --out\n"
    )
    assert sorted(path.name for path in out.iterdir()) == [DEMO_MARKER, "state"]
