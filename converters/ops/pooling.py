"""Max, average and global average pooling with builtin-op gradients."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from converters.ops.geometry import (
    Window,
    backward_pads,
    crop_padding,
    dilate,
    pad_spatial,
    scatter_tap,
    window_slice,
)

# Padding value for max pooling. It is never a window maximum, because every
# window contains at least one real input element.
_LOWEST = float(np.finfo(np.float32).min)


def max_pool(x: tf.Tensor, window: Window) -> tf.Tensor:
    """Max pooling whose gradient goes to the first maximum of each window.

    TensorFlow's MaxPoolGrad also routes each output's gradient to one input:
    the first maximum in row-major window order. The masks below follow the
    same rule, so ties (for example all-zero windows after a ReLU) match.
    """

    @tf.custom_gradient
    def op(x: tf.Tensor):  # type: ignore[no-untyped-def]
        y = tf.nn.max_pool2d(
            x, list(window.kernel), list(window.strides), window.padding.upper()
        )

        def grad(dy: tf.Tensor) -> tf.Tensor:
            padded = pad_spatial(x, window.pads, _LOWEST)
            taken = tf.zeros_like(y)
            total = None
            for i in range(window.kernel[0]):
                for j in range(window.kernel[1]):
                    hit = tf.cast(
                        tf.equal(window_slice(padded, window, i, j), y), y.dtype
                    )
                    first = hit * (1.0 - taken)
                    taken = taken + first
                    part = scatter_tap(first * dy, window, i, j)
                    total = part if total is None else total + part
            return crop_padding(total, window)

        return y, grad

    return op(x)


def _window_counts(window: Window) -> np.ndarray:
    """Real (unpadded) input elements per output position, shape [1, Ho, Wo, 1]."""
    counts = []
    for axis in (0, 1):
        before = window.pads[axis][0]
        starts = np.arange(window.output[axis]) * window.strides[axis] - before
        ends = np.minimum(starts + window.kernel[axis], window.size[axis])
        counts.append(ends - np.maximum(starts, 0))
    grid = np.outer(counts[0], counts[1]).astype(np.float32)
    return grid[None, :, :, None]


def avg_pool(x: tf.Tensor, window: Window) -> tf.Tensor:
    """Average pooling; with "same" padding the padded elements are not counted.

    The gradient spreads each output gradient evenly over its window: a
    stride-1 depthwise correlation of the dilated gradient with a kernel of
    ones.
    """
    channels = x.shape[-1]
    counts = _window_counts(window)
    ones = np.ones((*window.kernel, channels, 1), np.float32)

    @tf.custom_gradient
    def op(x: tf.Tensor):  # type: ignore[no-untyped-def]
        y = tf.nn.avg_pool2d(
            x, list(window.kernel), list(window.strides), window.padding.upper()
        )

        def grad(dy: tf.Tensor) -> tf.Tensor:
            share = dilate(dy / counts, window.strides)
            spread = pad_spatial(share, backward_pads(window))
            return tf.nn.depthwise_conv2d(
                spread, ones, strides=[1, 1, 1, 1], padding="VALID"
            )

        return y, grad

    return op(x)


def global_avg_pool(x: tf.Tensor, keepdims: bool = False) -> tf.Tensor:
    """Mean over height and width."""
    _, h, w, c = x.shape
    share = np.full((1, h, w, c), 1.0 / (h * w), np.float32)

    @tf.custom_gradient
    def op(x: tf.Tensor):  # type: ignore[no-untyped-def]
        y = tf.reduce_mean(x, axis=[1, 2], keepdims=keepdims)

        def grad(dy: tf.Tensor) -> tf.Tensor:
            return tf.reshape(dy, [-1, 1, 1, c]) * share

        return y, grad

    return op(x)
