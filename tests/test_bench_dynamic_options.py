"""Option checks of ``python -m dslo_edge.bench_dynamic``, before any timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from dslo_edge.bench_dynamic import main

BAD_OPTIONS = {
    "zero updates": (["--updates", "0"], "--updates: 0 is out of range"),
    "negative updates": (["--updates", "-1"], "--updates: -1 is out of range"),
    "zero batch": (["--batch-size", "0"], "--batch-size: 0 is out of range"),
    "batch of every id": (
        ["--batch-size", "360"],
        "--batch-size: 360 is out of range; expected 1 to 359",
    ),
    "batch not a number": (["--batch-size", "x"], "invalid integer 'x'"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS.values(), ids=BAD_OPTIONS)
def test_bad_option_exits_with_usage(case, capsys) -> None:
    argv, message = case

    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error


def test_bundle_not_a_bundle_exits_78(tmp_path: Path, capsys) -> None:
    not_bundle = tmp_path / "metrics.jsonl"
    not_bundle.write_text("{}\n")

    with pytest.raises(SystemExit) as exit_info:
        main(["--bundle", str(not_bundle), "--updates", "1"])

    assert exit_info.value.code == 78
    output = capsys.readouterr()
    assert output.err == (
        f"error: --bundle: no manifest.json in {not_bundle}; expected a "
        "directory written by 'dslo-edge convert'\n"
    )
    assert output.out == ""
    assert not_bundle.read_text() == "{}\n"
