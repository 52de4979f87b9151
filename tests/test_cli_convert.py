"""The convert and demo commands: output paths and option values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dslo_edge.cli import EXIT_CONFIG, main


def run(*arguments: str):
    return CliRunner().invoke(main, list(arguments))


@pytest.fixture
def keras_files(mlp_pair, tmp_path: Path) -> list[str]:
    """The --teacher and --student options for the session's MLP pair."""
    teacher = tmp_path / "teacher.keras"
    student = tmp_path / "student.keras"
    mlp_pair.teacher.save(teacher)
    mlp_pair.student.save(student)
    return ["convert", "--teacher", str(teacher), "--student", str(student)]


@pytest.mark.slow
def test_convert_creates_missing_parents(keras_files, tmp_path) -> None:
    parent = tmp_path / "new" / "deep"

    result = run(*keras_files, "--out", str(parent / "bundle"))

    assert result.exit_code == 0, result.output
    manifest = json.loads((parent / "bundle" / "manifest.json").read_text())
    assert manifest["class_count"] == 10
    assert sorted(path.name for path in parent.iterdir()) == ["bundle"]


def test_convert_parent_file_fails_first(keras_files, tmp_path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")

    result = run(*keras_files, "--out", str(blocker / "bundle"))

    assert result.exit_code == EXIT_CONFIG
    assert f"error: {blocker} is a file, not a directory" in result.output
    assert blocker.read_text() == ""


def test_convert_overwrite_keeps_other_files(keras_files, tmp_path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("user data")

    result = run(*keras_files, "--out", str(out), "--overwrite")

    assert result.exit_code == EXIT_CONFIG
    assert f"output directory {out} is not a bundle" in result.output
    assert "--overwrite replaces only a directory written by convert" in result.output
    assert (out / "notes.txt").read_text() == "user data"


def test_convert_error_names_overwrite_option(keras_files, tmp_path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "notes.txt").write_text("user data")

    result = run(*keras_files, "--out", str(out))

    assert result.exit_code == EXIT_CONFIG
    assert "exists and is not empty" in result.output
    assert "pass --overwrite to replace it" in result.output
    assert "overwrite=True" not in result.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--optimizer", "adam", "--weight-decay", "0.01"],
            "--weight-decay is used only with --optimizer adamw",
        ),
        (["--momentum", "0.5"], "--momentum is used only with --optimizer momentum"),
        (
            ["--optimizer", "adamw", "--nesterov"],
            "--nesterov is used only with --optimizer momentum",
        ),
        (
            ["--representative", "REPRESENTATIVE"],
            "--representative is used only with --teacher-precision int8 or "
            "--int8-student-copy",
        ),
    ],
)
def test_convert_rejects_ignored_options(
    keras_files, tmp_path, options, message
) -> None:
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.zeros((4, 64), np.float32))
    options = [str(samples) if word == "REPRESENTATIVE" else word for word in options]
    out = tmp_path / "bundle"

    result = run(*keras_files, "--out", str(out), *options)

    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_demo_rejects_negative_seed(tmp_path) -> None:
    out = tmp_path / "demo"

    result = run("demo", "--seed", "-5", "--out", str(out))

    assert result.exit_code == 2
    assert "-5 is not in the range 0<=x<=4294967295" in result.output
    assert not out.exists()


def test_demo_report_under_file_fails_first(tmp_path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    out = tmp_path / "demo"

    result = run("demo", "--out", str(out), "--report", str(blocker / "r.json"))

    assert result.exit_code == EXIT_CONFIG
    assert f"error: {blocker} is a file, not a directory" in result.output
    assert not out.exists()
