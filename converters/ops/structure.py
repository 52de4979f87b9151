"""Shape and merge ops: reshape, add and concatenate."""

from __future__ import annotations

import tensorflow as tf


def reshape(x: tf.Tensor, sample_shape: tuple[int, ...]) -> tf.Tensor:
    """Reshape each sample to ``sample_shape``, keeping the dynamic batch."""
    source = tuple(int(d) for d in x.shape[1:])

    @tf.custom_gradient
    def op(x: tf.Tensor):  # type: ignore[no-untyped-def]
        def grad(dy: tf.Tensor) -> tf.Tensor:
            return tf.reshape(dy, [-1, *source])

        return tf.reshape(x, [-1, *sample_shape]), grad

    return op(x)


def add(inputs: list[tf.Tensor]) -> tf.Tensor:
    """Sum same-shaped tensors; each input receives the output gradient."""

    @tf.custom_gradient
    def op(*xs: tf.Tensor):  # type: ignore[no-untyped-def]
        y = xs[0]
        for x in xs[1:]:
            y = y + x

        def grad(dy: tf.Tensor):  # type: ignore[no-untyped-def]
            return [dy for _ in xs]

        return y, grad

    return op(*inputs)


def concatenate(inputs: list[tf.Tensor], axis: int) -> tf.Tensor:
    """Concatenate along a non-batch axis.

    TensorFlow's ConcatV2 gradient uses ConcatOffset, a Flex-only op; the
    sizes are static here, so the gradient is a plain split.
    """
    sizes = [int(x.shape[axis]) for x in inputs]

    @tf.custom_gradient
    def op(*xs: tf.Tensor):  # type: ignore[no-untyped-def]
        def grad(dy: tf.Tensor):  # type: ignore[no-untyped-def]
            return tf.split(dy, sizes, axis=axis)

        return tf.concat(xs, axis=axis), grad

    return op(*inputs)
