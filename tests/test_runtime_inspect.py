"""``inspect_bundle`` on a converted bundle, with or without ai-edge-litert.

The probe set tests use placeholder bundles, whose op lists come from the
manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dslo_edge.errors import BundleError
from dslo_edge.inspect import format_report, inspect_bundle
from dslo_edge.runtime import load_interpreter
from tests.bundle_files import write_bundle
from tests.runtime_fixtures import fixture_dir


def test_inspect_reports_flex_free_mobilenet() -> None:
    report = inspect_bundle(fixture_dir() / "mobilenet", batch_size=8)
    student = report["files"]["student"]

    assert report["flex_free"] is True
    assert "DEPTHWISE_CONV_2D" in student["op_types"]["train"]
    assert student["variables"]["logits_kernel"]["kind"] == "trained"
    assert student["optimizer"]["name"] == "adam"
    if student["op_counts"] is not None:
        assert student["op_counts"]["infer"]["DEPTHWISE_CONV_2D"] == 7
        assert student["memory_estimate_bytes"] > student["bytes"]
    assert "Flex-free: yes" in format_report(report)


def test_inspect_lists_class_count(tmp_path: Path) -> None:
    report = inspect_bundle(write_bundle(tmp_path / "bundle"))

    assert report["heads"] == {"": 10}
    assert "student output: 10 classes" in format_report(report)


def test_inspect_lists_heads(two_head_bundle: Path) -> None:
    report = inspect_bundle(two_head_bundle)

    assert report["heads"] == {"digit": 10, "shape": 3}
    assert (
        "student heads, as [training.tasks.<head>] names them: "
        "digit (10 classes), shape (3 classes)"
    ) in format_report(report)


def test_inspect_counts_probe_samples(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    np.savez(bundle / "probe.npz", x=np.zeros((5, 64)), y=np.arange(5))

    report = inspect_bundle(bundle)

    assert report["probe"] == {"file": "probe.npz", "samples": 5, "used": True}
    assert "probe set: probe.npz, 5 samples" in format_report(report)


def test_inspect_without_probe_says_so(tmp_path: Path) -> None:
    report = inspect_bundle(write_bundle(tmp_path / "bundle"))

    assert report["probe"] is None
    assert "probe set: none, so rollbacks check the weights only" in format_report(
        report
    )


def test_inspect_rejects_probe_daemon_rejects(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    np.savez(bundle / "probe.npz", x=np.zeros((5, 32)), y=np.arange(5))

    with pytest.raises(BundleError) as caught:
        inspect_bundle(bundle)

    assert "has x (5, 32) and y (5,); expected x (N, 64)" in str(caught.value)


def test_empty_model_is_named(tmp_path: Path) -> None:
    model = tmp_path / "model.tflite"
    model.write_bytes(b"")

    with pytest.raises(BundleError) as from_file:
        load_interpreter(model)
    with pytest.raises(BundleError) as from_bytes:
        load_interpreter(model_content=b"")

    assert str(from_file.value) == "the model file is empty (0 bytes)"
    assert str(from_bytes.value) == "the model file is empty (0 bytes)"
