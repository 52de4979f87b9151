"""The bundle output directory: what overwrite replaces and what it keeps."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from converters.bundle import convert_bundle  # noqa: E402
from converters.optimizers import OptimizerConfig  # noqa: E402
from converters.output_dir import _carry_probe  # noqa: E402
from dslo_edge.errors import ConversionError  # noqa: E402


def _optimizer_name(bundle: Path) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return manifest["student"]["optimizer"]["name"]


def test_overwrite_keeps_directory_of_other_files(mlp_pair, tmp_path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("user data")

    with pytest.raises(ConversionError) as raised:
        convert_bundle(mlp_pair.teacher, mlp_pair.student, out, overwrite=True)
    message = str(raised.value)
    assert f"output directory {out} is not a bundle" in message
    assert "it contains notes.txt" in message
    assert "nothing was removed" in message
    assert (out / "notes.txt").read_text() == "user data"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["precious"]


def test_overwrite_keeps_bundle_with_extra_file(mlp_pair, tmp_path) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(mlp_pair.bundle, out)
    (out / "keep.txt").write_text("user data")
    manifest = (out / "manifest.json").read_bytes()

    with pytest.raises(ConversionError, match="it contains keep.txt"):
        convert_bundle(mlp_pair.teacher, mlp_pair.student, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"
    assert (out / "manifest.json").read_bytes() == manifest


def test_overwrite_keeps_directory_without_manifest(mlp_pair, tmp_path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "student.tflite").write_bytes(b"not a model")

    with pytest.raises(ConversionError, match="it has no manifest.json"):
        convert_bundle(mlp_pair.teacher, mlp_pair.student, out, overwrite=True)
    assert (out / "student.tflite").read_bytes() == b"not a model"


def test_api_error_names_overwrite_argument(mlp_pair, tmp_path) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(mlp_pair.bundle, out)

    with pytest.raises(ConversionError) as raised:
        convert_bundle(mlp_pair.teacher, mlp_pair.student, out)
    assert "exists and is not empty" in str(raised.value)
    assert "pass overwrite=True to replace it" in str(raised.value)
    assert "--overwrite" not in str(raised.value)


@pytest.mark.slow
def test_failed_conversion_keeps_earlier_bundle(mlp_pair, tmp_path) -> None:
    import tensorflow as tf

    keras = pytest.importorskip("keras")
    out = tmp_path / "bundle"
    shutil.copytree(mlp_pair.bundle, out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    # The student converts; the teacher fails later because cumprod has no
    # LiteRT builtin.
    teacher = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Lambda(lambda v: tf.math.cumprod(v, axis=1)),
            keras.layers.Dense(10),
        ]
    )

    with pytest.raises(ConversionError, match="Cumprod"):
        convert_bundle(teacher, mlp_pair.student, out, overwrite=True)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.slow
def test_overwrite_replaces_earlier_bundle(mlp_pair, tmp_path) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(mlp_pair.bundle, out)
    assert _optimizer_name(out) == "sgd"

    convert_bundle(
        mlp_pair.teacher,
        mlp_pair.student,
        out,
        overwrite=True,
        optimizer=OptimizerConfig("adam"),
    )

    assert _optimizer_name(out) == "adam"
    assert sorted(path.name for path in out.iterdir()) == [
        "manifest.json",
        "student.tflite",
        "teacher.tflite",
    ]
    # Neither the staging directory nor the replaced bundle is left behind.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle"]


def test_overwrite_carries_probe_set_over(mlp_pair, tmp_path) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(mlp_pair.bundle, out)
    (out / "probe.npz").write_bytes(b"probe set of the user")

    convert_bundle(mlp_pair.teacher, mlp_pair.student, out, overwrite=True)

    assert (out / "probe.npz").read_bytes() == b"probe set of the user"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle"]


def test_overwrite_warns_of_unfit_probe(mlp_pair, tmp_path, caplog) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(mlp_pair.bundle, out)
    np.savez(out / "probe.npz", x=np.zeros((4, 13)), y=np.arange(4))
    kept = (out / "probe.npz").read_bytes()

    with caplog.at_level(logging.INFO, logger="converters.output_dir"):
        convert_bundle(mlp_pair.teacher, mlp_pair.student, out, overwrite=True)

    assert (out / "probe.npz").read_bytes() == kept
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "does not fit the new student" in warnings[0].getMessage()
    assert "has x (4, 13) and y (4,); expected x (N, 64)" in warnings[0].getMessage()


def test_overwrite_keeps_fitting_probe_quietly(mlp_pair, tmp_path, caplog) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(mlp_pair.bundle, out)
    np.savez(out / "probe.npz", x=np.zeros((4, 64)), y=np.arange(4))

    with caplog.at_level(logging.INFO, logger="converters.output_dir"):
        convert_bundle(mlp_pair.teacher, mlp_pair.student, out, overwrite=True)

    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "Kept probe.npz from the earlier bundle" in caplog.text


def test_carried_single_y_probe_of_two_heads(two_head_bundle, tmp_path, caplog) -> None:
    # An earlier bundle's probe set with one y, kept for a two-head student.
    target = tmp_path / "bundle"
    target.mkdir()
    np.savez(target / "probe.npz", x=np.zeros((4, 64)), y=np.arange(4))
    staging = tmp_path / "staging"
    shutil.copytree(two_head_bundle, staging)
    (staging / "probe.npz").unlink(missing_ok=True)

    with caplog.at_level(logging.INFO, logger="converters.output_dir"):
        _carry_probe(target, staging)

    assert (staging / "probe.npz").read_bytes() == (target / "probe.npz").read_bytes()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    # The daemon starts with such a file and leaves it out, with a warning.
    assert "the daemon does not start with it" not in warnings[0]
    assert "checks the weights without it" in warnings[0]
    assert "flash and ota-send reject the bundle" in warnings[0]
    assert "save each head's labels as y_<head>" in warnings[0]
