"""SignatureCall against the interpreter's own SignatureRunner."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("keras")

from dslo_edge.bundle import load_bundle  # noqa: E402
from dslo_edge.config import render_config  # noqa: E402
from dslo_edge.errors import BundleError  # noqa: E402
from dslo_edge.models import SignatureCall, StudentModel  # noqa: E402
from tests.cli_process import run_cli  # noqa: E402


def batch(seed: int, count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    soft = rng.dirichlet(np.ones(10), size=count).astype(np.float32)
    return {
        "x": rng.random((count, 64), dtype=np.float32),
        "soft": soft,
        "hard": np.argmax(soft, axis=1).astype(np.int32),
        "alpha": np.full(count, 0.6, dtype=np.float32),
        "temperature": np.float32(2.0),
        "learning_rate": np.float32(0.05),
    }


class RunnerOnly:
    """A runner without the private attributes, like an unknown interpreter."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def __call__(self, **inputs):
        return self.runner(**inputs)


def test_signature_call_trains_like_the_runner(mlp_pair) -> None:
    bundle = load_bundle(mlp_pair.bundle)
    fast = StudentModel(bundle)
    plain = StudentModel(bundle)
    runner = plain.interpreter.get_signature_runner("train")
    sizes = [8, 8, 8, 5, 5, 8]

    for seed, count in enumerate(sizes):
        inputs = batch(seed, count)
        fast_loss = float(fast._train(**inputs)["loss"])
        plain_loss = float(runner(**inputs)["loss"])
        assert fast_loss == plain_loss

    expected = plain.get_weights()
    for name, value in fast.get_weights().items():
        np.testing.assert_array_equal(value, expected[name])


def test_signature_call_without_private_attributes(mlp_pair) -> None:
    student = StudentModel(load_bundle(mlp_pair.bundle))
    runner = student.interpreter.get_signature_runner("infer")
    call = SignatureCall(RunnerOnly(runner))
    x = batch(0, 4)["x"]

    first = call(x=x)["probabilities"]
    second = call(x=x)["probabilities"]

    np.testing.assert_array_equal(first, second)
    assert first.shape == (4, 10)


def test_signature_call_rejects_unknown_input(mlp_pair) -> None:
    student = StudentModel(load_bundle(mlp_pair.bundle))
    x = batch(0, 4)["x"]
    student.infer(x)

    with pytest.raises(ValueError):
        student._infer(y=x)


def edit_manifest(source: Path, target: Path, key: str, value: object) -> Path:
    """Copy a bundle and set one top-level manifest key, as a hand edit would."""
    shutil.copytree(source, target)
    manifest_path = target / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest[key] = value
    manifest_path.write_text(json.dumps(manifest))
    return target


def test_student_matches_its_manifest(mlp_pair) -> None:
    student = StudentModel(load_bundle(mlp_pair.bundle))

    assert student.infer(batch(0, 2)["x"]).shape == (2, 10)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "input",
            {"shape": [None, 65], "dtype": "float32"},
            "input.shape [None, 65] gives input x the per-sample shape (65,), "
            "but student.tflite has (64,)",
        ),
        (
            "class_count",
            11,
            "class_count 11 gives output probabilities the per-sample shape "
            "(11,), but student.tflite has (10,)",
        ),
    ],
    ids=["input shape", "class count"],
)
def test_edited_manifest_stops_daemon_start(
    mlp_pair, tmp_path, key, value, message
) -> None:
    bundle = edit_manifest(mlp_pair.bundle, tmp_path / "bundle", key, value)
    config = tmp_path / "device.toml"
    config.write_text(render_config("edited", bundle, tmp_path / "state", 9))

    with pytest.raises(BundleError, match=re.escape(message)):
        StudentModel(load_bundle(bundle))
    result = run_cli("run", "--config", str(config))

    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {bundle / 'manifest.json'}: {key}")
    assert message in result.stderr
