"""The per-device privacy budget report of 'dslo-edge hub --show-budget'."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from dslo_edge.cli import main
from dslo_edge.hub_state import HubState

pytest.importorskip("dp_accounting")

from dslo_edge.privacy import PrivacySettings, epsilon_spent  # noqa: E402

PRIVACY = "[privacy]\nnoise_multiplier = 4.0\nepsilon_budget = 8.0\n"


def write_config(folder: Path, extra: str = PRIVACY) -> Path:
    (folder / "teacher.tflite").write_bytes(b"model")
    path = folder / "hub.toml"
    path.write_text(
        '[hub]\nstate_file = "state/hub.sqlite"\n[teacher]\n'
        'path = "teacher.tflite"\noutput_kind = "logits"\n' + extra
    )
    return path


def show_budget(config: Path) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["hub", "--config", str(config), "--show-budget"])
    return result.exit_code, result.output.splitlines()


def test_show_budget_lists_spent_epsilon(tmp_path) -> None:
    config = write_config(tmp_path)
    settings = PrivacySettings(noise_multiplier=4.0, epsilon_budget=8.0)
    state = HubState(tmp_path / "state" / "hub.sqlite", "w1")
    assert state.charge_releases("kitchen-pi", 32, settings) == ""
    assert state.charge_releases("door-cam", 1, settings) == ""
    # A device charged at another multiplier before a configuration change.
    earlier = PrivacySettings(noise_multiplier=8.0, epsilon_budget=8.0)
    assert state.charge_releases("door-cam", 10, earlier) == ""

    # The workers keep the file open, so the report reads it beside them.
    exit_code, lines = show_budget(config)
    state.close()

    door_epsilon = epsilon_spent({4.0: 1, 8.0: 10}, 1e-5)
    assert exit_code == 0
    assert lines[0] == (
        f"Privacy budget per device in {tmp_path / 'state' / 'hub.sqlite'} "
        "(accountant rdp, delta 1e-05, budget 8)"
    )
    assert lines[1].split() == ["DEVICE", "SAMPLES", "EPSILON", "LEFT"]
    assert lines[2].split() == [
        "door-cam",
        "11",
        f"{door_epsilon:.4g}",
        f"{8.0 - door_epsilon:.4g}",
    ]
    # docs/hub.md lists epsilon 7.08 for 32 samples at noise multiplier 4.
    assert lines[3].split() == ["kitchen-pi", "32", "7.077", "0.9226"]
    assert len(lines) == 4


def test_show_budget_uses_configured_accountant(tmp_path) -> None:
    config = write_config(tmp_path, PRIVACY + 'accountant = "pld"\n')
    settings = PrivacySettings(noise_multiplier=4.0, epsilon_budget=8.0)
    state = HubState(tmp_path / "state" / "hub.sqlite", "w1")
    state.charge_releases("kitchen-pi", 32, settings)
    state.close()

    exit_code, lines = show_budget(config)

    expected = epsilon_spent({4.0: 32}, 1e-5, "pld")
    assert exit_code == 0
    assert "accountant pld" in lines[0]
    assert lines[2].split()[2] == f"{expected:.4g}"


def test_show_budget_without_charges(tmp_path) -> None:
    config = write_config(tmp_path)
    HubState(tmp_path / "state" / "hub.sqlite", "w1").close()

    exit_code, lines = show_budget(config)

    assert exit_code == 0
    assert lines[1] == "no device has been charged"


def test_show_budget_missing_state_file(tmp_path) -> None:
    config = write_config(tmp_path)

    exit_code, lines = show_budget(config)

    assert exit_code == 78
    assert lines == [
        f"error: {config}: hub.state_file {tmp_path / 'state' / 'hub.sqlite'} not "
        "found: no "
        "worker with this configuration has run yet, or hub.state_file names "
        "another file"
    ]
    # The report creates neither the file nor its directory.
    assert not (tmp_path / "state").exists()


def test_show_budget_needs_privacy_table(tmp_path) -> None:
    config = write_config(tmp_path, extra="")

    exit_code, lines = show_budget(config)

    assert exit_code == 78
    assert lines[0].startswith(f"error: {config}: --show-budget needs the [privacy]")


def test_show_budget_rejects_other_file(tmp_path) -> None:
    config = write_config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "hub.sqlite").write_text("not a database")

    exit_code, lines = show_budget(config)

    assert exit_code == 78
    assert lines[0].startswith(
        f"error: {config}: cannot read the privacy budgets in hub.state_file "
    )


def test_show_budget_rejects_newer_schema(tmp_path) -> None:
    config = write_config(tmp_path)
    state_file = tmp_path / "state" / "hub.sqlite"
    state = HubState(state_file, "w1")
    settings = PrivacySettings(noise_multiplier=4.0, epsilon_budget=8.0)
    assert state.charge_releases("kitchen-pi", 32, settings) == ""
    state.close()
    database = sqlite3.connect(state_file)
    database.execute("PRAGMA user_version = 2")
    database.close()

    exit_code, lines = show_budget(config)

    assert exit_code == 78
    assert lines == [
        f"error: {config}: hub.state_file {state_file} has schema version 2, "
        "written by a newer dslo-edge; this version reads up to 1. Upgrade "
        "dslo-edge on this machine to the version of the other workers, or set "
        "hub.state_file to another path"
    ]


def test_show_budget_with_print_unit(tmp_path) -> None:
    config = write_config(tmp_path)
    arguments = ["hub", "--config", str(config), "--show-budget", "--print-unit"]

    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 2
    assert "give --print-unit or --show-budget, not both" in result.output
