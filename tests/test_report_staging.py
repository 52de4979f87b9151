"""The report's plots replace earlier ones only together, even on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dslo_edge import report
from dslo_edge.errors import OutputPathError
from dslo_edge.eval_staging import owned_prefix
from dslo_edge.report import read_metrics_log, write_report
from dslo_edge.report_staging import STAGING_PREFIX, _staging_places
from tests.test_report import PNG_SIGNATURE, metrics_log

pytest.importorskip("matplotlib")

PLOTS = ["energy.png", "latency.png", "training.png"]


def plot_bytes(folder: Path) -> dict[str, bytes | None]:
    """Return each file's content by name, with None for a directory."""
    return {
        path.name: path.read_bytes() if path.is_file() else None
        for path in sorted(folder.iterdir())
    }


def staging_leftovers(*folders: Path) -> list[str]:
    return [
        path.name
        for folder in folders
        for path in folder.iterdir()
        if path.name.startswith(STAGING_PREFIX)
    ]


def earlier_and_new_logs(tmp_path: Path) -> tuple[list[dict], list[dict]]:
    earlier = read_metrics_log(metrics_log(tmp_path / "earlier.jsonl", reports=3))
    new = read_metrics_log(metrics_log(tmp_path / "new.jsonl", reports=30))
    for record in new:
        record["device"] = "garage-cam"
    return earlier, new


def test_sigint_between_plots_keeps_earlier_report(tmp_path, monkeypatch) -> None:
    earlier, new = earlier_and_new_logs(tmp_path)
    out = tmp_path / "plots"
    write_report(earlier, out)
    before = plot_bytes(out)
    plot_training = report._plot_training

    def plot_then_interrupt(*args):
        # Ctrl-C after latency.png and training.png of the new log are saved.
        path = plot_training(*args)
        os.kill(os.getpid(), signal.SIGINT)
        return path

    monkeypatch.setattr(report, "_plot_training", plot_then_interrupt)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_report(new, out)
    finally:
        signal.signal(signal.SIGINT, previous)

    assert sorted(before) == PLOTS
    assert plot_bytes(out) == before
    assert staging_leftovers(tmp_path, out) == []


def test_report_replaces_every_earlier_plot(tmp_path) -> None:
    earlier, new = earlier_and_new_logs(tmp_path)
    out = tmp_path / "plots"
    write_report(earlier, out)
    before = plot_bytes(out)
    (out / "notes.txt").write_text("kept")

    paths = write_report(new, out)

    assert paths == [out / "latency.png", out / "training.png", out / "energy.png"]
    after = plot_bytes(out)
    assert sorted(after) == sorted([*PLOTS, "notes.txt"])
    assert after["notes.txt"] == b"kept"
    for name in PLOTS:
        assert after[name][:8] == PNG_SIGNATURE
        assert after[name] != before[name], name
    assert staging_leftovers(tmp_path, out) == []


def test_directory_in_way_keeps_earlier_plots(tmp_path) -> None:
    earlier, new = earlier_and_new_logs(tmp_path)
    out = tmp_path / "plots"
    write_report(earlier, out)
    (out / "energy.png").unlink()
    (out / "energy.png").mkdir()
    before = plot_bytes(out)

    with pytest.raises(OutputPathError) as caught:
        write_report(new, out)

    assert str(caught.value).startswith(
        f"cannot write the plot {out / 'energy.png'}: it is a directory"
    )
    assert plot_bytes(out) == before
    assert staging_leftovers(tmp_path, out) == []


def test_report_deletes_staging_of_dead_writer(tmp_path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(finished.stdout)
    this_prefix = owned_prefix(STAGING_PREFIX)
    host, _pid, namespace = this_prefix[len(STAGING_PREFIX) :].rsplit("-", 3)[:3]
    stale = tmp_path / f"{STAGING_PREFIX}{host}-{dead_pid}-{namespace}-abcd1234"
    stale.mkdir()
    (stale / "latency.png").write_bytes(PNG_SIGNATURE)
    foreign = tmp_path / f"{STAGING_PREFIX}{host}-{dead_pid}-{namespace}-efgh5678"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("not a plot")
    records = read_metrics_log(metrics_log(tmp_path / "metrics.jsonl", reports=2))

    write_report(records, tmp_path / "plots")

    assert not stale.exists()
    assert (foreign / "thesis.tex").read_text() == "not a plot"


def test_staging_goes_to_parent_on_same_device(tmp_path) -> None:
    folder = tmp_path.resolve() / "plots"
    folder.mkdir()

    assert _staging_places(folder) == [folder.parent, folder]


def test_staging_stays_inside_mount_point() -> None:
    mount = Path("/proc")
    if os.stat(mount).st_dev == os.stat("/").st_dev:
        pytest.skip("/proc is not a separate file system here")

    assert _staging_places(mount) == [mount]


def test_sigterm_in_report_leaves_no_staging(tmp_path) -> None:
    log = metrics_log(tmp_path / "metrics.jsonl", reports=200)
    out = tmp_path / "plots"
    command = [
        sys.executable,
        "-m",
        "dslo_edge.cli",
        "report",
        "--metrics",
        str(log),
        "--out",
        str(out),
    ]
    subprocess.run(command, capture_output=True, check=True, timeout=120)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # SIGTERM once the first plot is staged, while later ones are drawn.
        # Before that, matplotlib may still be importing its backend, and the
        # import turns the SystemExit into an ImportError.
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(f"{STAGING_PREFIX}*/latency.png")):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        process.send_signal(signal.SIGTERM)
        _stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().endswith(
        "error: dslo-edge report stopped on SIGTERM before it completed"
    )
    assert staging_leftovers(tmp_path, out) == []
    assert sorted(path.name for path in out.iterdir()) == PLOTS
