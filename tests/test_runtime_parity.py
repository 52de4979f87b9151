"""Replay TensorFlow train trajectories in an interpreter, without TensorFlow.

Runs under either interpreter package (ai-edge-litert with numpy 2, or
tflite-runtime 2.14 with numpy < 2), so both are held to the same parity:
1e-4 relative after one step, 1e-3 over 50 steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.images import digits_as_rgb32
from dslo_edge.models import StudentModel
from dslo_edge.runtime import interpreter_class, load_interpreter
from tests.runtime_fixtures import case_names, fixture_dir, runtime_name

NORM_FLOOR = 1e-2


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Return ||actual - expected|| / max(||expected||, 0.01)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.linalg.norm(expected)), NORM_FLOOR)
    return float(np.linalg.norm(actual - expected)) / scale


class Runners:
    """Signature runners of one converted case."""

    def __init__(self, name: str):
        folder = fixture_dir() / "cases"
        interpreter = load_interpreter(
            folder / f"{name}.tflite", preference=runtime_name()
        )
        self.train = interpreter.get_signature_runner("train")
        self.infer = interpreter.get_signature_runner("infer")
        self.get_weights = interpreter.get_signature_runner("get_weights")
        self.set_weights = interpreter.get_signature_runner("set_weights")
        with np.load(folder / f"{name}.npz") as data:
            self.expected = {key: data[key] for key in data.files}

    def step(self, index: int) -> float:
        data = self.expected
        result = self.train(
            x=data["x"][index],
            soft=data["soft"][index],
            hard=data["hard"][index],
            alpha=data["alpha"][index],
            temperature=np.float32(2.0),
            learning_rate=np.float32(data["learning_rate"]),
        )
        return float(result["loss"])

    def weights(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.get_weights().items()}

    def worst(self, prefix: str) -> tuple[str, float]:
        weights = self.weights()
        errors = {
            key[len(prefix) :]: relative_error(weights[key[len(prefix) :]], value)
            for key, value in self.expected.items()
            if key.startswith(prefix)
        }
        name = max(errors, key=errors.__getitem__)
        return name, errors[name]


def test_runtime_is_the_requested_package() -> None:
    fixture_dir()
    requested = runtime_name()
    _, name = interpreter_class(requested)
    if requested != "auto":
        assert name == requested


@pytest.mark.parametrize("case", case_names())
def test_trajectory_matches_tensorflow(case: str) -> None:
    runners = Runners(case)
    losses = runners.expected["loss"]

    assert relative_error(runners.step(0), losses[0]) < 1e-4
    name, error = runners.worst("step1/")
    assert error < 1e-4, f"{name} differs by {error:.2e} after one step"

    for index in range(1, len(losses)):
        loss = runners.step(index)
        assert relative_error(loss, losses[index]) < 1e-3, f"step {index + 1}"
    name, error = runners.worst("final/")
    assert error < 1e-3, f"{name} differs by {error:.2e} after {len(losses)} steps"


@pytest.mark.parametrize("case", case_names())
def test_infer_matches_tensorflow(case: str) -> None:
    runners = Runners(case)
    weights = runners.weights()
    for key, value in runners.expected.items():
        if key.startswith("final/"):
            weights[key[len("final/") :]] = value
    runners.set_weights(**weights)
    x = runners.expected["x"][0]

    first = np.array(runners.infer(x=x)["logits"])
    second = np.array(runners.infer(x=x)["logits"])
    assert np.array_equal(first, second)
    shifted = first - first.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert relative_error(log_softmax, runners.expected["infer_log_softmax"]) < 1e-4


def test_restored_weights_resume_exactly() -> None:
    original = Runners("dropout_between_dense")
    for index in range(5):
        original.step(index)
    restored = Runners("dropout_between_dense")
    restored.set_weights(**original.weights())

    for index in range(5, 10):
        assert restored.step(index) == original.step(index)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(fixture_dir() / "digits.npz") as data:
        images, labels = data["images"], data["labels"]
    order = np.random.default_rng(0).permutation(len(labels))
    return digits_as_rgb32(images[order]), labels[order]


def test_mobilenet_student_learns_on_device() -> None:
    bundle = load_bundle(fixture_dir() / "mobilenet")
    student = StudentModel(bundle, runtime=runtime_name())
    x, y = _digits()
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]
    rng = np.random.default_rng(1)

    def accuracy() -> float:
        return float((student.infer(test_x).argmax(axis=1) == test_y).mean())

    before = accuracy()
    losses = []
    for _ in range(200):
        index = rng.integers(0, len(train_y), 32)
        soft = np.full((32, 10), 0.1 / 9, np.float32)
        soft[np.arange(32), train_y[index]] = 0.9
        alpha = np.full(32, 0.5, np.float32)
        losses.append(
            student.train_step(train_x[index], soft, train_y[index], alpha, 2.0, 2e-3)
        )
    after = accuracy()

    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert after > before + 0.3
    assert after > 0.6
