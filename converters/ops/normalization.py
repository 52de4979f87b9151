"""Batch normalization over the last axis, in training and inference mode."""

from __future__ import annotations

import tensorflow as tf


def batch_norm_train(
    x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Normalise with batch statistics, as Keras does with ``training=True``.

    Returns:
        The output, the batch mean and the biased batch variance (the moving
        statistics are updated with these, like Keras 3 does).
    """
    axes = list(range(len(x.shape) - 1))

    @tf.custom_gradient
    def op(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor):  # type: ignore[no-untyped-def]
        mean = tf.reduce_mean(x, axis=axes)
        centered = x - mean
        variance = tf.reduce_mean(centered * centered, axis=axes)
        inv = tf.math.rsqrt(variance + epsilon)
        normalized = centered * inv
        y = normalized * gamma + beta

        def grad(dy: tf.Tensor, *unused: tf.Tensor):  # type: ignore[no-untyped-def]
            # Standard closed form; mean and variance feed only the moving
            # statistics, so their upstream gradients are zero.
            count = tf.cast(tf.shape(x)[0], x.dtype)
            for size in x.shape[1:-1]:
                count = count * float(size)
            dbeta = tf.reduce_sum(dy, axis=axes)
            dgamma = tf.reduce_sum(dy * normalized, axis=axes)
            scale = gamma * inv / count
            dx = scale * (count * dy - dbeta - normalized * dgamma)
            return dx, dgamma, dbeta

        return (y, mean, variance), grad

    y, mean, variance = op(x, gamma, beta)
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance)


def batch_norm_infer(
    x: tf.Tensor,
    gamma: tf.Tensor,
    beta: tf.Tensor,
    moving_mean: tf.Tensor,
    moving_variance: tf.Tensor,
    epsilon: float,
) -> tf.Tensor:
    """Normalise with the moving statistics, as Keras does at inference.

    Also used in the train graph for a BatchNormalization layer that is not
    trained: its gradients for gamma and beta are still returned (the
    "biases and BatchNorm only" scope needs them only when training mode is
    on, so here they cost nothing unless watched).
    """
    axes = list(range(len(x.shape) - 1))

    @tf.custom_gradient
    def op(x, gamma, beta, moving_mean, moving_variance):  # type: ignore[no-untyped-def]
        inv = tf.math.rsqrt(moving_variance + epsilon)
        scale = gamma * inv
        y = x * scale + (beta - moving_mean * scale)

        def grad(dy: tf.Tensor):  # type: ignore[no-untyped-def]
            normalized = (x - moving_mean) * inv
            dgamma = tf.reduce_sum(dy * normalized, axis=axes)
            return dy * scale, dgamma, tf.reduce_sum(dy, axis=axes), None, None

        return y, grad

    return op(x, gamma, beta, moving_mean, moving_variance)
