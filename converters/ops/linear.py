"""Dense matmul and bias addition with builtin-op gradients."""

from __future__ import annotations

import tensorflow as tf


@tf.custom_gradient
def matmul(x: tf.Tensor, kernel: tf.Tensor):  # type: ignore[no-untyped-def]
    """Compute x @ kernel for a (batch, features) input with a matmul gradient."""
    y = tf.matmul(x, kernel)

    def grad(dy: tf.Tensor):  # type: ignore[no-untyped-def]
        return tf.matmul(dy, kernel, transpose_b=True), tf.matmul(
            x, dy, transpose_a=True
        )

    return y, grad


@tf.custom_gradient
def bias_add(x: tf.Tensor, bias: tf.Tensor):  # type: ignore[no-untyped-def]
    """Add a per-channel bias (last axis).

    The bias gradient is a sum over every other axis. TensorFlow's own Add
    gradient uses BroadcastGradientArgs, which needs Flex for a dynamic batch.
    """
    y = x + bias
    axes = list(range(len(x.shape) - 1))

    def grad(dy: tf.Tensor):  # type: ignore[no-untyped-def]
        return dy, tf.reduce_sum(dy, axis=axes)

    return y, grad


def dense(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None) -> tf.Tensor:
    """Compute x @ kernel (+ bias)."""
    y = matmul(x, kernel)
    return y if bias is None else bias_add(y, bias)
