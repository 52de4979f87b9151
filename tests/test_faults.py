"""The fault suite at a small scale: no update applied twice, none lost.

``dslo-edge selftest --faults`` runs the same scenarios at full scale
(1,000 updates, 20 SIGKILLs, 10,000 fuzzed payloads).
"""

from __future__ import annotations

import pytest

from dslo_edge.broker import find_mosquitto
from dslo_edge.fault_scenarios import SCENARIOS, Scale, run_suite

if find_mosquitto() is None:
    pytest.skip("the fault suite needs mosquitto", allow_module_level=True)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault_scenario(name: str, mlp_pair, tmp_path) -> None:
    (row,) = run_suite(tmp_path, mlp_pair.bundle, Scale.quick(), [name])

    if row.detail.startswith("skipped"):
        pytest.skip(row.detail)
    assert row.applied_twice == 0, row.detail
    assert row.lost == 0, row.detail
    assert row.applied > 0, row.detail
    assert row.passed, row.detail


def test_selftest_with_relative_out(mlp_pair, tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from dslo_edge.cli import main

    monkeypatch.chdir(tmp_path)
    arguments = ["selftest", "--faults", "--quick", "--only", "broker-restart"]
    arguments += ["--bundle", str(mlp_pair.bundle), "--out", "relative-out"]

    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 0, result.output
    assert "pass: broker restart" in result.output
    state = tmp_path / "relative-out" / "broker-restart" / "state"
    assert any((state / "checkpoints").iterdir())


@pytest.mark.parametrize("option", ["--out", "--report"])
def test_selftest_path_under_file_fails_first(tmp_path, option: str) -> None:
    from click.testing import CliRunner

    from dslo_edge.cli import main

    blocker = tmp_path / "afile"
    blocker.write_text("")
    paths = {"--out": str(tmp_path / "out"), "--report": str(tmp_path / "r.txt")}
    paths[option] = str(blocker / "sub" / "x")
    arguments = ["selftest", "--faults", "--quick", "--bundle", str(tmp_path)]
    arguments += ["--out", paths["--out"], "--report", paths["--report"]]

    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 2, result.output
    assert f"Invalid value for {option}: cannot write into {blocker}/sub" in (
        result.output
    )
    assert "Not a directory" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert blocker.read_text() == ""
