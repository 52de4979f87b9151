"""The bench's output folder: the earlier bench.json and the new one."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dslo_edge.bench import prepare_out_dir, write_bench_json
from dslo_edge.errors import DsloError

# Writes a report larger than the file size limit, as on a full disk.
WRITE_OVER_LIMIT = """
import resource
import signal
import sys
from pathlib import Path

from dslo_edge.bench import write_bench_json

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
try:
    write_bench_json(Path(sys.argv[1]), {"values": list(range(5000))})
except OSError as error:
    print(error.errno)
"""


def test_prepare_renames_earlier_report(tmp_path) -> None:
    out = tmp_path / "bench-out"
    out.mkdir()
    (out / "bench.json").write_text('{"run": "earlier"}\n')
    (out / "bench-previous.json").write_text('{"run": "before earlier"}\n')
    (out / ".bench.json.4242.tmp").write_text('{"run": "killed"')

    previous = prepare_out_dir(out)

    assert previous == out / "bench-previous.json"
    assert not (out / "bench.json").exists()
    assert json.loads(previous.read_text()) == {"run": "earlier"}
    assert sorted(path.name for path in out.iterdir()) == ["bench-previous.json"]


def test_prepare_creates_missing_folder(tmp_path) -> None:
    out = tmp_path / "runs" / "bench-out"

    assert prepare_out_dir(out) is None
    assert out.is_dir()
    assert list(out.iterdir()) == []


def test_prepare_keeps_previous_without_earlier(tmp_path) -> None:
    out = tmp_path / "bench-out"
    out.mkdir()
    (out / "bench-previous.json").write_text('{"run": "complete"}\n')

    assert prepare_out_dir(out) is None
    assert (out / "bench-previous.json").read_text() == '{"run": "complete"}\n'


def test_prepare_rejects_directory_report(tmp_path) -> None:
    out = tmp_path / "bench-out"
    (out / "bench.json").mkdir(parents=True)

    with pytest.raises(DsloError) as caught:
        prepare_out_dir(out)

    assert str(caught.value) == (
        f"{out / 'bench.json'} is a directory, but the bench writes its report "
        "there; move it away or choose another --out"
    )
    assert (out / "bench.json").is_dir()


def test_write_replaces_report(tmp_path) -> None:
    (tmp_path / "bench.json").write_text('{"run": "earlier"}\n')
    report = {"quick": True, "figures": {"train_step": {"value": 1.5}}}

    path = write_bench_json(tmp_path, report)

    assert path == tmp_path / "bench.json"
    assert json.loads(path.read_text()) == report
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["bench.json"]


def test_failed_write_keeps_earlier_report(tmp_path) -> None:
    earlier = '{"run": "earlier"}\n'
    (tmp_path / "bench.json").write_text(earlier)

    result = subprocess.run(
        [sys.executable, "-c", WRITE_OVER_LIMIT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[1],
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(errno.EFBIG)
    assert (tmp_path / "bench.json").read_text() == earlier
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["bench.json"]
