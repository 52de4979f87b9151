"""In-graph optimizers against Keras 3 optimizers, and exact checkpoint resume."""

from __future__ import annotations

import numpy as np
import pytest

from converters.optimizers import OptimizerConfig
from dslo_edge.errors import ConversionError
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

LEARNING_RATE = 0.01
STEPS = 50


def small_cnn() -> keras.Model:
    # No conv bias before BatchNorm: its gradient is zero up to rounding, and
    # Adam would scale that rounding noise up to full-size steps.
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv"),
            layers.BatchNormalization(name="norm"),
            layers.ReLU(),
            layers.Dropout(0.2),
            layers.GlobalAveragePooling2D(),
            layers.Dense(4, name="logits"),
        ]
    )


OPTIMIZER_CASES = {
    "sgd": (OptimizerConfig("sgd"), lambda: keras.optimizers.SGD()),
    "momentum": (
        OptimizerConfig("momentum", momentum=0.9),
        lambda: keras.optimizers.SGD(momentum=0.9),
    ),
    "nesterov": (
        OptimizerConfig("momentum", momentum=0.8, nesterov=True),
        lambda: keras.optimizers.SGD(momentum=0.8, nesterov=True),
    ),
    "adam": (OptimizerConfig("adam"), lambda: keras.optimizers.Adam()),
    "adamw": (
        OptimizerConfig("adamw", weight_decay=0.05),
        lambda: keras.optimizers.AdamW(weight_decay=0.05),
    ),
    "adam_clipped": (
        OptimizerConfig("adam", clip_global_norm=0.05),
        lambda: keras.optimizers.Adam(global_clipnorm=0.05),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_optimizer_matches_keras(case: str) -> None:
    config, build_optimizer = OPTIMIZER_CASES[case]
    keras.utils.set_random_seed(3)
    model = small_cnn()
    reference = KerasReference(model, build_optimizer())
    _, tflite = convert_student(model, optimizer=config)
    student = InterpreterStudent(tflite)
    batches = make_batches((6, 6, 2), 4, STEPS, size=8, seed=5)

    expected_loss = reference.train_step(batches[0], LEARNING_RATE)
    loss = student.train_step(batches[0], LEARNING_RATE)
    assert relative_error(loss, expected_loss) < 1e-4
    name, error = worst_weight_error(student.weights(), reference.weights())
    assert error < 1e-4, f"{name} differs by {error:.2e} after one step"

    for batch in batches[1:]:
        expected_loss = reference.train_step(batch, LEARNING_RATE)
        loss = student.train_step(batch, LEARNING_RATE)
        assert relative_error(loss, expected_loss) < 1e-3
    name, error = worst_weight_error(student.weights(), reference.weights())
    assert error < 1e-3, f"{name} differs by {error:.2e} after {STEPS} steps"


@pytest.mark.slow
def test_restored_state_resumes_exactly() -> None:
    keras.utils.set_random_seed(4)
    _, tflite = convert_student(small_cnn(), optimizer=OptimizerConfig("adam"))
    batches = make_batches((6, 6, 2), 4, 10, size=8, seed=6)
    original = InterpreterStudent(tflite)
    for batch in batches[:5]:
        original.train_step(batch, LEARNING_RATE)
    saved = original.weights()

    restored = InterpreterStudent(tflite)
    restored.set_weights(saved)
    for batch in batches[5:]:
        expected = original.train_step(batch, LEARNING_RATE)
        assert restored.train_step(batch, LEARNING_RATE) == expected

    final = original.weights()
    for name, value in restored.weights().items():
        assert np.array_equal(value, final[name]), name


def test_exported_state_names_are_labelled() -> None:
    keras.utils.set_random_seed(4)
    from converters.layers import read_student
    from converters.student_graph import StudentModule

    module = StudentModule(read_student(small_cnn()), optimizer=OptimizerConfig("adam"))
    kinds = module.kinds
    assert kinds["conv_kernel"] == "trained"
    assert kinds["norm_gamma"] == "trained"
    assert kinds["norm_moving_mean"] == "moving_statistic"
    assert kinds["optimizer__m__conv_kernel"] == "optimizer_state"
    assert kinds["optimizer__v__logits_bias"] == "optimizer_state"
    assert kinds["optimizer__iterations"] == "optimizer_state"
    assert kinds["dropout_step"] == "dropout_step"


def test_unknown_optimizer_is_rejected() -> None:
    with pytest.raises(ConversionError, match="unknown optimizer 'rmsprop'"):
        OptimizerConfig("rmsprop")


@pytest.mark.slow
def test_student_model_round_trips_scalar_state(tmp_path) -> None:
    from converters.bundle import convert_bundle
    from dslo_edge.bundle import load_bundle
    from dslo_edge.models import StudentModel

    keras.utils.set_random_seed(4)
    teacher = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            layers.Flatten(),
            layers.Dense(4, activation="softmax"),
        ]
    )
    convert_bundle(
        teacher, small_cnn(), tmp_path / "bundle", optimizer=OptimizerConfig("adam")
    )
    bundle = load_bundle(tmp_path / "bundle")
    shapes = bundle.weight_shapes
    batches = make_batches((6, 6, 2), 4, 4, size=8, seed=6)

    def step(student: StudentModel, batch) -> float:
        return student.train_step(
            batch.x, batch.soft, batch.hard, batch.alpha, 1.0, LEARNING_RATE
        )

    original = StudentModel(bundle)
    for batch in batches[:2]:
        step(original, batch)
    restored = StudentModel(bundle)
    restored.set_weights(original.get_weights())
    losses = [(step(original, batch), step(restored, batch)) for batch in batches[2:]]

    assert shapes["optimizer__iterations"] == ()
    assert shapes["dropout_step"] == ()
    assert restored.get_weights()["optimizer__iterations"].shape == ()
    for expected, got in losses:
        assert got == expected
    for name, value in restored.get_weights().items():
        assert np.array_equal(value, original.get_weights()[name]), name
