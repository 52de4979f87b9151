"""Per-layer parity: a train step in LiteRT against TensorFlow autodiff.

Each case is a small Keras student built around the layers under test. The
converted ``train`` signature must give the same loss, updated weights and
BatchNorm moving statistics as one step of autodiff plus ``keras.optimizers.SGD``
on the Keras model (1e-4 relative), and stay within 1e-3 over 50 steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tests.converter_cases import CASES
from tests.converter_parity import (
    InterpreterStudent,
    KerasReference,
    convert_student,
    make_batches,
    relative_error,
    worst_weight_error,
)

keras = pytest.importorskip("keras")

LEARNING_RATE = 0.05
STEP_TOLERANCE = 1e-4
TRAJECTORY_TOLERANCE = 1e-3
TRAJECTORY_STEPS = 50


@pytest.mark.slow
@pytest.mark.parametrize("build", CASES, ids=lambda build: build.__name__)
def test_train_step_matches_tensorflow(build: Callable[[], keras.Model]) -> None:
    keras.utils.set_random_seed(1)
    model = build()
    reference = KerasReference(model, keras.optimizers.SGD())
    _, tflite = convert_student(model)
    student = InterpreterStudent(tflite)
    input_shape = tuple(model.input_shape[1:])
    classes = int(model.output_shape[-1])
    batches = make_batches(input_shape, classes, TRAJECTORY_STEPS, size=8)

    expected_loss = reference.train_step(batches[0], LEARNING_RATE)
    loss = student.train_step(batches[0], LEARNING_RATE)
    assert relative_error(loss, expected_loss) < STEP_TOLERANCE
    name, error = worst_weight_error(student.weights(), reference.weights())
    assert error < STEP_TOLERANCE, f"{name} differs by {error:.2e} after one step"

    for batch in batches[1:]:
        expected_loss = reference.train_step(batch, LEARNING_RATE)
        loss = student.train_step(batch, LEARNING_RATE)
        assert relative_error(loss, expected_loss) < TRAJECTORY_TOLERANCE
    name, error = worst_weight_error(student.weights(), reference.weights())
    assert error < TRAJECTORY_TOLERANCE, f"{name} differs by {error:.2e} at the end"

    # Logits of a final-softmax model are known only up to a per-row shift.
    x = batches[0].x
    expected = _log_softmax(np.asarray(reference.logits(x, training=False)))
    actual = _log_softmax(student.logits(x))
    assert relative_error(actual, expected) < TRAJECTORY_TOLERANCE


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
