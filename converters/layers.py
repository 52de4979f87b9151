"""Read a Keras student into a plain list of layer steps the converter can lower.

Only layers whose forward pass and gradient we can write with LiteRT builtin
ops are accepted; anything else is rejected by name before TensorFlow tries to
convert it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dslo_edge.errors import ConversionError

ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax")
SUPPORTED_LAYERS = ("InputLayer", "Dense", "Activation", "ReLU", "Flatten")


@dataclass
class LayerStep:
    """One step of the student's forward pass.

    Attributes:
        kind: "dense", "activation" or "flatten".
        name: the Keras layer name, used in errors and weight names.
        activation: activation applied after the step ("linear" for none).
        weights: kernel and bias arrays for dense steps, empty otherwise.
    """

    kind: str
    name: str
    activation: str = "linear"
    weights: list[np.ndarray] = field(default_factory=list)


def _activation_name(layer: object) -> str:
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    if name not in ACTIVATIONS:
        raise ConversionError(
            f"layer '{layer.name}' uses activation '{name}', which the converter "
            f"has no builtin-op gradient for; use one of: {', '.join(ACTIVATIONS)}"
        )
    return name


def _relu_step(layer: object) -> LayerStep:
    config = layer.get_config()
    if config.get("max_value") is not None or config.get("negative_slope", 0.0):
        raise ConversionError(
            f"layer '{layer.name}' is a ReLU with max_value or negative_slope set; "
            "only the plain ReLU is supported"
        )
    return LayerStep("activation", layer.name, "relu")


def _dense_step(layer: object) -> LayerStep:
    if not layer.use_bias:
        raise ConversionError(
            f"Dense layer '{layer.name}' has use_bias=False; "
            "the converter expects a bias, so set use_bias=True"
        )
    kernel, bias = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
    return LayerStep("dense", layer.name, _activation_name(layer), [kernel, bias])


def read_student(model: object) -> list[LayerStep]:
    """Turn a Keras student into layer steps.

    Args:
        model: a built Keras model whose layers form a single chain.

    Returns:
        The steps in forward order.

    Raises:
        ConversionError: a layer is not supported, or softmax appears anywhere
            but at the end.
    """
    steps: list[LayerStep] = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        if kind == "Dense":
            steps.append(_dense_step(layer))
        elif kind == "Activation":
            steps.append(LayerStep("activation", layer.name, _activation_name(layer)))
        elif kind == "ReLU":
            steps.append(_relu_step(layer))
        elif kind == "Flatten":
            steps.append(LayerStep("flatten", layer.name))
        else:
            raise ConversionError(
                f"layer '{layer.name}' of type {kind} is not supported in a "
                f"trainable student; supported layers: {', '.join(SUPPORTED_LAYERS)}"
            )
    _check_softmax_last(steps)
    if not any(step.kind == "dense" for step in steps):
        raise ConversionError("the student has no Dense layer, so nothing to train")
    return steps


def _check_softmax_last(steps: list[LayerStep]) -> None:
    for step in steps[:-1]:
        if step.activation == "softmax":
            raise ConversionError(
                f"layer '{step.name}' applies softmax before the last layer; "
                "the student must end in logits or a final softmax"
            )
