"""Trainable scopes: parity with Keras on the chosen weights, no frozen work."""

from __future__ import annotations

import pytest

from converters.trainable import TrainableScope
from dslo_edge.errors import ConversionError
from dslo_edge.modelfile import summarize_model
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
STEPS = 50


def two_conv_student() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem"),
            layers.BatchNormalization(name="stem_norm"),
            layers.ReLU(name="stem_relu"),
            layers.Conv2D(6, 3, strides=2, padding="same", name="body"),
            layers.ReLU(name="body_relu"),
            layers.GlobalAveragePooling2D(name="pool"),
            layers.Dense(8, activation="tanh", name="hidden"),
            layers.Dense(3, name="logits"),
        ]
    )


def _reference(model: keras.Model, scope: TrainableScope) -> KerasReference:
    """Mirror the scope in Keras: frozen layers, or a subset of variables."""
    if scope.kind == "biases-and-batchnorm":
        names = KerasReference(model, keras.optimizers.SGD()).variable_names()
        trained = [
            name
            for name in names["trainable"]
            if name.endswith(("_bias", "_gamma", "_beta"))
        ]
        return KerasReference(model, keras.optimizers.SGD(), trained=trained)
    order = [layer.name for layer in model.layers]
    first = order.index(scope.layer) if scope.layer else len(order) - scope.count
    for layer in model.layers[:first]:
        layer.trainable = False
    return KerasReference(model, keras.optimizers.SGD())


SCOPES = {
    "from_layer": TrainableScope.parse("from:body"),
    "last_layers": TrainableScope.parse("last:2"),
    "biases_and_batchnorm": TrainableScope.parse("biases-and-batchnorm"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SCOPES))
def test_scope_matches_keras(case: str) -> None:
    scope = SCOPES[case]
    keras.utils.set_random_seed(7)
    model = two_conv_student()
    module, tflite = convert_student(model, scope=scope)
    reference = _reference(model, scope)
    student = InterpreterStudent(tflite)
    before = student.weights()
    batches = make_batches((8, 8, 2), 3, STEPS, size=8, seed=8)

    expected_loss = reference.train_step(batches[0], LEARNING_RATE)
    assert (
        relative_error(student.train_step(batches[0], LEARNING_RATE), expected_loss)
        < 1e-4
    )
    name, error = worst_weight_error(student.weights(), reference.weights())
    assert error < 1e-4, f"{name} differs by {error:.2e} after one step"

    for batch in batches[1:]:
        reference.train_step(batch, LEARNING_RATE)
        student.train_step(batch, LEARNING_RATE)
    after = student.weights()
    name, error = worst_weight_error(after, reference.weights())
    assert error < 1e-3, f"{name} differs by {error:.2e} after {STEPS} steps"
    for name, kind in module.kinds.items():
        if kind == "frozen":
            assert (after[name] == before[name]).all(), name


def _train_ops(scope: str) -> dict[str, int]:
    keras.utils.set_random_seed(7)
    _, tflite = convert_student(two_conv_student(), scope=TrainableScope.parse(scope))
    return summarize_model(tflite).op_counts["train"]


@pytest.mark.slow
def test_frozen_layers_get_no_gradient_ops() -> None:
    whole = _train_ops("all")
    head = _train_ops("last:2")
    biases = _train_ops("biases-and-batchnorm")

    # Forward convs only: the two convs before the trained Dense layers
    # need neither input nor filter gradients.
    assert head["CONV_2D"] == 2
    assert whole["CONV_2D"] > 2
    # Filter gradients gather kernel taps with CONCATENATION; the low-memory
    # scope still needs input gradients but no filter gradients.
    assert "CONCATENATION" in whole
    assert "CONCATENATION" not in biases
    assert sum(head.values()) < sum(biases.values()) < sum(whole.values())


def test_unknown_scope_layer_is_rejected() -> None:
    with pytest.raises(ConversionError, match="'missing'.*layers are: stem"):
        convert_student(two_conv_student(), scope=TrainableScope.parse("from:missing"))


@pytest.mark.parametrize("text", ["last:0", "from:", "bias", "last:x"])
def test_invalid_scope_text_is_rejected(text: str) -> None:
    with pytest.raises(ConversionError, match="invalid trainable scope"):
        TrainableScope.parse(text)


def test_last_count_too_large_is_rejected() -> None:
    # stem, stem_norm, body, hidden and logits have weights.
    scope = TrainableScope.parse("last:6")

    with pytest.raises(ConversionError) as raised:
        convert_student(two_conv_student(), scope=scope)
    message = str(raised.value)
    assert "last:6 names 6 layers" in message
    assert "has 5 layers with weights" in message
    assert "last:N with N from 1 to 5, from:LAYER, all" in message
