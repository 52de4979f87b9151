"""The MobileNetV2-style student converts without Flex and learns on device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.bundle import convert_bundle
from converters.mobilenet import DEFAULT_BLOCKS, build_mobilenet_student
from converters.optimizers import OptimizerConfig
from dslo_edge.bundle import load_bundle
from dslo_edge.images import digits_as_rgb32
from dslo_edge.models import StudentModel

keras = pytest.importorskip("keras")
datasets = pytest.importorskip("sklearn.datasets")

STEPS = 200
BATCH = 32


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keras.utils.set_random_seed(2)
    teacher = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, strides=4, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    path = tmp_path_factory.mktemp("mobilenet") / "bundle"
    convert_bundle(
        teacher, build_mobilenet_student(), path, optimizer=OptimizerConfig("adam")
    )
    return path


def test_student_has_mobilenet_structure() -> None:
    model = build_mobilenet_student()
    kinds = [type(layer).__name__ for layer in model.layers]

    assert len(DEFAULT_BLOCKS) >= 6
    assert model.input_shape == (None, 32, 32, 3)
    assert kinds.count("DepthwiseConv2D") == len(DEFAULT_BLOCKS)
    assert kinds.count("Add") >= 3
    assert "BatchNormalization" in kinds
    relu_caps = {
        layer.max_value for layer in model.layers if hasattr(layer, "max_value")
    }
    assert relu_caps == {6.0}


@pytest.mark.slow
def test_bundle_is_flex_free(bundle_path: Path) -> None:
    manifest = load_bundle(bundle_path).manifest
    train_ops = manifest["student"]["signatures"]["train"]["ops"]

    assert manifest["runtime"]["flex"] is False
    assert not [op for op in train_ops if op.startswith("Flex")]
    assert "DEPTHWISE_CONV_2D" in train_ops
    assert "RELU6" in train_ops


@pytest.mark.slow
def test_student_learns_digits_on_device(bundle_path: Path) -> None:
    digits = datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = digits_as_rgb32(digits.data[order])
    y = digits.target[order].astype(np.int32)
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]
    student = StudentModel(load_bundle(bundle_path))
    rng = np.random.default_rng(1)

    before = float((student.infer(test_x).argmax(axis=1) == test_y).mean())
    losses = []
    for _ in range(STEPS):
        index = rng.integers(0, len(train_y), BATCH)
        soft = np.full((BATCH, 10), 0.1 / 9, np.float32)
        soft[np.arange(BATCH), train_y[index]] = 0.9
        alpha = np.full(BATCH, 0.5, np.float32)
        losses.append(
            student.train_step(train_x[index], soft, train_y[index], alpha, 2.0, 2e-3)
        )
    after = float((student.infer(test_x).argmax(axis=1) == test_y).mean())

    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert after > before + 0.3
    assert after > 0.6
