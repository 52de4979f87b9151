"""Activation functions with gradients written as masks and products.

Each gradient matches the one TensorFlow's autodiff gives for the Keras
activation (TensorFlow 2.21, Keras 3.15), including the value chosen at the
kinks: ReLU-type masks use strict inequalities, as ReluGrad and Relu6Grad do.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

Activation = Callable[[tf.Tensor], tf.Tensor]


def _identity(x: tf.Tensor) -> tf.Tensor:
    return x


def relu_family(
    negative_slope: float = 0.0,
    max_value: float | None = None,
    fusable: bool = True,
) -> Activation:
    """Return a leaky, capped ReLU: slope * x below 0, x up to max_value.

    With ``fusable=False`` the plain ReLU is written as a select, which the
    LiteRT converter cannot fuse into the op before it. The converter of
    TensorFlow 2.21 drops a RELU, RELU6 or RELU_N1_TO_1 that follows a matmul
    with a variable right-hand side (BATCH_MATMUL), so such a ReLU must not
    be fused.
    """

    @tf.custom_gradient
    def op(x: tf.Tensor):  # type: ignore[no-untyped-def]
        if fusable:
            y = tf.maximum(x, 0.0)
        else:
            y = tf.where(x > 0.0, x, tf.zeros_like(x))
        if negative_slope:
            y = tf.where(x > 0.0, x, x * negative_slope)
        if max_value is not None:
            y = tf.minimum(y, max_value)

        def grad(dy: tf.Tensor) -> tf.Tensor:
            positive = tf.cast(x > 0.0, dy.dtype)
            if max_value is not None:
                positive = positive * tf.cast(x < max_value, dy.dtype)
            if not negative_slope:
                return dy * positive
            negative = tf.cast(x <= 0.0, dy.dtype) * negative_slope
            return dy * (positive + negative)

        return y, grad

    return op


@tf.custom_gradient
def sigmoid(x: tf.Tensor):  # type: ignore[no-untyped-def]
    """Sigmoid with gradient y * (1 - y) instead of the SigmoidGrad op."""
    y = tf.sigmoid(x)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * y * (1.0 - y)

    return y, grad


@tf.custom_gradient
def tanh(x: tf.Tensor):  # type: ignore[no-untyped-def]
    """Tanh with gradient 1 - y^2 instead of the TanhGrad op."""
    y = tf.tanh(x)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * (1.0 - y * y)

    return y, grad


@tf.custom_gradient
def silu(x: tf.Tensor):  # type: ignore[no-untyped-def]
    """Swish (SiLU), x * sigmoid(x)."""
    s = tf.sigmoid(x)
    y = x * s

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return dy * (s + y * (1.0 - s))

    return y, grad


@tf.custom_gradient
def hard_sigmoid(x: tf.Tensor):  # type: ignore[no-untyped-def]
    """Keras hard sigmoid, relu6(x + 3) / 6."""
    y = tf.minimum(tf.maximum(x + 3.0, 0.0), 6.0) / 6.0

    def grad(dy: tf.Tensor) -> tf.Tensor:
        inside = tf.cast(x > -3.0, dy.dtype) * tf.cast(x < 3.0, dy.dtype)
        return dy * inside / 6.0

    return y, grad


@tf.custom_gradient
def hard_silu(x: tf.Tensor):  # type: ignore[no-untyped-def]
    """Hard swish, x * relu6(x + 3) / 6."""
    gate = tf.minimum(tf.maximum(x + 3.0, 0.0), 6.0) / 6.0
    y = x * gate

    def grad(dy: tf.Tensor) -> tf.Tensor:
        inside = tf.cast(x > -3.0, dy.dtype) * tf.cast(x < 3.0, dy.dtype)
        return dy * (gate + x * inside / 6.0)

    return y, grad


@tf.custom_gradient
def softmax(x: tf.Tensor):  # type: ignore[no-untyped-def]
    """Softmax over the last axis, for use inside the network."""
    y = tf.nn.softmax(x)

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return y * (dy - tf.reduce_sum(dy * y, axis=-1, keepdims=True))

    return y, grad


ACTIVATIONS: dict[str, Activation] = {
    "linear": _identity,
    "relu": relu_family(),
    "relu6": relu_family(max_value=6.0),
    "sigmoid": sigmoid,
    "tanh": tanh,
    "silu": silu,
    "hard_sigmoid": hard_sigmoid,
    "hard_silu": hard_silu,
    "softmax": softmax,
}
"""Activations by Keras name (``keras.activations.get(name).__name__``)."""
