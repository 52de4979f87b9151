"""Dropout whose mask comes from an integer hash instead of a random op.

LiteRT's random ops and TensorFlow's stateless random ops need Flex, so the
mask is a hash of (train step, layer seed, element index) computed with int32
MUL, ADD, FLOOR_DIV and FLOOR_MOD, which every LiteRT version runs exactly.
The train step is a variable that the ``train`` signature increments, so
each step draws a new mask and a restored checkpoint draws the same ones.
"""

from __future__ import annotations

import math

import tensorflow as tf

# Largest prime whose square fits in int32, so h * h never overflows.
PRIME = 46337


def keep_mask(step: tf.Tensor, seed: int, like: tf.Tensor, rate: float) -> tf.Tensor:
    """Return a float 0/1 mask shaped like ``like``; 1 keeps the element.

    Each element is kept with probability 1 - rate, rounded to a multiple of
    1 / 46337.

    Args:
        step: int32 scalar, the train step counter.
        seed: per-layer seed, so two dropout layers draw different masks.
        like: the tensor to mask; its batch size may be dynamic.
        rate: fraction of elements to drop, in [0, 1).
    """
    sample_shape = [int(d) for d in like.shape[1:]]
    size = math.prod(sample_shape)
    position = tf.reshape(tf.range(size, dtype=tf.int32), [1, *sample_shape])
    sample = tf.range(tf.shape(like)[0], dtype=tf.int32)
    sample = tf.reshape(sample, [-1, *([1] * len(sample_shape))])
    index = sample * size + position

    low, high = index % PRIME, (index // PRIME) % PRIME
    step_low, step_high = step % PRIME, (step // PRIME) % PRIME
    h = (low * 9973 % PRIME + step_low * 7919 % PRIME + seed % PRIME) % PRIME
    h = (h * h % PRIME + high * 7901 % PRIME + step_high * 6007 % PRIME + 1013) % PRIME
    h = (h * h % PRIME + low + 4099) % PRIME
    h = (h * h % PRIME + step_low + 2719) % PRIME
    threshold = round(rate * PRIME)
    return tf.cast(h >= threshold, like.dtype)


def dropout(x: tf.Tensor, keep: tf.Tensor, rate: float) -> tf.Tensor:
    """Apply a keep mask and scale the kept elements by 1 / (1 - rate)."""
    factor = keep * (1.0 / (1.0 - rate))

    @tf.custom_gradient
    def op(x: tf.Tensor):  # type: ignore[no-untyped-def]
        def grad(dy: tf.Tensor) -> tf.Tensor:
            return dy * factor

        return x * factor, grad

    return op(x)
