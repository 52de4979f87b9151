"""flash and inspect reject a manifest whose shapes differ from the student's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from dslo_edge.bundle import load_bundle
from dslo_edge.cli import EXIT_ERROR, main
from dslo_edge.errors import BundleError
from dslo_edge.models import StudentModel

pytest.importorskip("ai_edge_litert")


def edited_copy(bundle: Path, folder: Path) -> Path:
    """Copy ``bundle`` with an input shape of 65 in its manifest, not 64."""
    shutil.copytree(bundle, folder)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["input"]["shape"] = [None, 65]
    manifest_path.write_text(json.dumps(manifest))
    return folder


def daemon_message(bundle: Path) -> str:
    """Return the error that the daemon gives at start for ``bundle``."""
    with pytest.raises(BundleError) as caught:
        StudentModel(load_bundle(bundle))
    return str(caught.value)


def target_state(root: Path) -> dict[str, object]:
    """Return every path under ``root`` with its file bytes or link target."""
    state: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            state[name] = os.readlink(path)
        elif path.is_file():
            state[name] = path.read_bytes()
        else:
            state[name] = "directory"
    return state


def flash_command(bundle: Path, root: Path) -> list[str]:
    return [
        "flash",
        str(bundle),
        "--profile",
        "raspberry-pi-4b",
        "--target",
        str(root),
    ]


def test_flash_rejects_edited_input_shape(mlp_pair, tmp_path: Path) -> None:
    edited = edited_copy(mlp_pair.bundle, tmp_path / "edited")
    root = tmp_path / "rootfs"
    root.mkdir()
    installed = CliRunner().invoke(main, flash_command(mlp_pair.bundle, root))
    before = target_state(root)

    result = CliRunner().invoke(main, flash_command(edited, root))

    expected = daemon_message(edited)
    assert installed.exit_code == 0, installed.output
    assert result.exit_code == EXIT_ERROR, result.output
    assert result.output == f"error: {expected}\n"
    assert (
        f"{edited / 'manifest.json'}: input.shape [None, 65] gives input x the "
        "per-sample shape (65,), but student.tflite has (64,)"
    ) in expected
    assert target_state(root) == before


def test_flash_rejects_edited_shape_on_empty_target(mlp_pair, tmp_path: Path) -> None:
    edited = edited_copy(mlp_pair.bundle, tmp_path / "edited")
    root = tmp_path / "rootfs"
    root.mkdir()

    result = CliRunner().invoke(main, flash_command(edited, root))

    assert result.exit_code == EXIT_ERROR, result.output
    assert result.output == f"error: {daemon_message(edited)}\n"
    assert list(root.iterdir()) == []


def test_inspect_rejects_edited_input_shape(mlp_pair, tmp_path: Path) -> None:
    edited = edited_copy(mlp_pair.bundle, tmp_path / "edited")

    result = CliRunner().invoke(main, ["inspect", str(edited)])
    unedited = CliRunner().invoke(main, ["inspect", str(mlp_pair.bundle)])

    assert result.exit_code == EXIT_ERROR, result.output
    assert result.output == f"error: {daemon_message(edited)}\n"
    assert unedited.exit_code == 0, unedited.output
    assert "student tensor shapes: not compared" not in unedited.output


def test_inspect_names_student_it_cannot_load(tmp_path: Path) -> None:
    from tests.bundle_files import write_bundle

    # The placeholder bundle's model files are random bytes.
    bundle = write_bundle(tmp_path / "bundle")

    result = CliRunner().invoke(main, ["inspect", str(bundle), "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["shapes_unchecked"] == (
        "the interpreter cannot load the model: The model is not a valid "
        "Flatbuffer buffer"
    )
