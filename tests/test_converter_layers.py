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

from tests.converter_parity import (
    InterpreterStudent,
    KerasReference,
    convert_student,
    make_batches,
    relative_error,
    worst_weight_error,
)

keras = pytest.importorskip("keras")
layers = keras.layers

LEARNING_RATE = 0.05
STEP_TOLERANCE = 1e-4
TRAJECTORY_TOLERANCE = 1e-3
TRAJECTORY_STEPS = 50


def _model(input_shape: tuple[int, ...], *stack: keras.layers.Layer) -> keras.Model:
    return keras.Sequential([keras.Input(input_shape), *stack])


def conv_same_batch_norm_relu6() -> keras.Model:
    return _model(
        (8, 8, 3),
        layers.Conv2D(4, 3, padding="same"),
        layers.BatchNormalization(momentum=0.9),
        layers.ReLU(6.0),
        layers.Flatten(),
        layers.Dense(5),
    )


def conv_strided_valid_and_same() -> keras.Model:
    return _model(
        (9, 9, 2),
        layers.Conv2D(4, 3, strides=2, padding="valid", activation="relu"),
        layers.Conv2D(3, 2, strides=2, padding="same", use_bias=False),
        layers.Flatten(),
        layers.Dense(5),
    )


def depthwise_convs() -> keras.Model:
    return _model(
        (8, 8, 3),
        layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.DepthwiseConv2D(3, padding="valid", activation="relu6"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(5),
    )


def separable_convs() -> keras.Model:
    return _model(
        (8, 8, 3),
        layers.SeparableConv2D(4, 3, padding="same", activation="relu"),
        layers.SeparableConv2D(6, 3, strides=2, padding="valid"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(5),
    )


def max_pools() -> keras.Model:
    return _model(
        (9, 9, 2),
        layers.Conv2D(4, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.MaxPooling2D(3, strides=2, padding="same"),
        layers.Flatten(),
        layers.Dense(5),
    )


def average_pools() -> keras.Model:
    return _model(
        (9, 9, 2),
        layers.Conv2D(4, 3, padding="same"),
        layers.AveragePooling2D(2),
        layers.AveragePooling2D(3, strides=2, padding="same"),
        layers.Flatten(),
        layers.Dense(5),
    )


def activations() -> keras.Model:
    return _model(
        (6,),
        layers.Dense(8, activation="sigmoid"),
        layers.Dense(8, activation="tanh"),
        layers.Dense(8, activation="swish"),
        layers.Dense(8, activation="hard_swish"),
        layers.LeakyReLU(0.1),
        layers.Dense(8, activation="leaky_relu"),
        layers.Dense(8, activation="hard_sigmoid"),
        layers.Dense(8, activation="softmax"),
        layers.Dense(8),
        layers.ReLU(max_value=1.5, negative_slope=0.05),
        layers.Dense(5, activation="softmax"),
    )


def residual_add_and_concatenate() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    stem = layers.Conv2D(4, 3, padding="same")(inputs)
    stem = layers.BatchNormalization()(stem)
    stem = layers.ReLU()(stem)
    branch = layers.Conv2D(4, 1)(stem)
    branch = layers.Activation("relu6")(branch)
    merged = layers.Add()([stem, branch])
    joined = layers.Concatenate()([merged, stem, inputs])
    pooled = layers.GlobalAveragePooling2D()(joined)
    shaped = layers.Reshape((11, 1))(pooled)
    flat = layers.Flatten()(shaped)
    logits = layers.Dense(5)(flat)
    outputs = layers.Activation("softmax")(logits)
    return keras.Model(inputs, outputs)


def dropout_between_dense() -> keras.Model:
    return _model(
        (10,),
        layers.Dense(16, activation="relu"),
        layers.Dropout(0.3),
        layers.Dense(12, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(5),
    )


CASES: list[Callable[[], keras.Model]] = [
    conv_same_batch_norm_relu6,
    conv_strided_valid_and_same,
    depthwise_convs,
    separable_convs,
    max_pools,
    average_pools,
    activations,
    residual_add_and_concatenate,
    dropout_between_dense,
]


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
