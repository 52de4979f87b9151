"""Conv2D and DepthwiseConv2D with gradients made of convolutions and slices.

Input gradients are a stride-1 correlation of the zero-dilated, padded output
gradient with the flipped kernel (CONV_2D or DEPTHWISE_CONV_2D). Filter
gradients gather, for each kernel tap, the input elements that tap saw
(strided slices) and contract them with the output gradient: one matmul over
all taps for Conv2D, a multiply and sum per tap for depthwise kernels.
"""

from __future__ import annotations

import tensorflow as tf

from converters.ops.geometry import (
    Window,
    backward_pads,
    dilate,
    pad_spatial,
    window_slice,
)


def conv2d(x: tf.Tensor, kernel: tf.Tensor, window: Window) -> tf.Tensor:
    """Compute a Keras-style Conv2D (NHWC, kernel [kh, kw, in, out]) without bias."""
    if window.kernel == (1, 1) and window.strides == (1, 1):
        return _pointwise_conv2d(x, kernel)

    @tf.custom_gradient
    def op(x: tf.Tensor, kernel: tf.Tensor):  # type: ignore[no-untyped-def]
        y = tf.nn.conv2d(
            x, kernel, strides=list(window.strides), padding=window.padding.upper()
        )

        def grad(dy: tf.Tensor):  # type: ignore[no-untyped-def]
            return _conv_input_grad(dy, kernel, window), _conv_filter_grad(
                x, dy, window
            )

        return y, grad

    return op(x, kernel)


def _pointwise_conv2d(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Compute a 1x1, stride-1 conv as one matmul over all pixels.

    The same arithmetic as CONV_2D, but LiteRT runs a matmul with a
    computed right-hand side faster than a conv with a non-constant filter
    (about 3x for the MobileNet-style student in tflite-runtime 2.14).
    """
    _, h, w, channels = x.shape
    filters = kernel.shape[-1]

    @tf.custom_gradient
    def op(x: tf.Tensor, kernel: tf.Tensor):  # type: ignore[no-untyped-def]
        pixels = tf.reshape(x, [-1, channels])
        weights = tf.reshape(kernel, [channels, filters])
        y = tf.reshape(tf.matmul(pixels, weights), [-1, h, w, filters])

        def grad(dy: tf.Tensor):  # type: ignore[no-untyped-def]
            dy_pixels = tf.reshape(dy, [-1, filters])
            dx = tf.matmul(dy_pixels, weights, transpose_b=True)
            dkernel = tf.matmul(pixels, dy_pixels, transpose_a=True)
            return (
                tf.reshape(dx, [-1, h, w, channels]),
                tf.reshape(dkernel, [1, 1, channels, filters]),
            )

        return y, grad

    return op(x, kernel)


def _flip(kernel: tf.Tensor) -> tf.Tensor:
    """Reverse a kernel along height and width.

    A negative-stride slice, not tf.reverse: REVERSE_V2 over two axes gives
    wrong results in tflite-runtime 2.14 (checked by the runtime parity tests).
    """
    return kernel[::-1, ::-1]


def _conv_input_grad(dy: tf.Tensor, kernel: tf.Tensor, window: Window) -> tf.Tensor:
    flipped = tf.transpose(_flip(kernel), [0, 1, 3, 2])
    spread = pad_spatial(dilate(dy, window.strides), backward_pads(window))
    return tf.nn.conv2d(spread, flipped, strides=1, padding="VALID")


def _conv_filter_grad(x: tf.Tensor, dy: tf.Tensor, window: Window) -> tf.Tensor:
    kh, kw = window.kernel
    channels, filters = x.shape[-1], dy.shape[-1]
    padded = pad_spatial(x, window.pads)
    taps = [window_slice(padded, window, i, j) for i in range(kh) for j in range(kw)]
    patches = taps[0] if len(taps) == 1 else tf.concat(taps, axis=-1)
    patches = tf.reshape(patches, [-1, kh * kw * channels])
    grad = tf.matmul(patches, tf.reshape(dy, [-1, filters]), transpose_a=True)
    return tf.reshape(grad, [kh, kw, channels, filters])


def depthwise_conv2d(x: tf.Tensor, kernel: tf.Tensor, window: Window) -> tf.Tensor:
    """Compute a depthwise conv (kernel [kh, kw, in, multiplier]) without bias."""

    @tf.custom_gradient
    def op(x: tf.Tensor, kernel: tf.Tensor):  # type: ignore[no-untyped-def]
        sh, sw = window.strides
        y = tf.nn.depthwise_conv2d(
            x, kernel, strides=[1, sh, sw, 1], padding=window.padding.upper()
        )

        def grad(dy: tf.Tensor):  # type: ignore[no-untyped-def]
            return _depthwise_input_grad(dy, kernel, window), _depthwise_filter_grad(
                x, dy, window
            )

        return y, grad

    return op(x, kernel)


def _depthwise_input_grad(
    dy: tf.Tensor, kernel: tf.Tensor, window: Window
) -> tf.Tensor:
    kh, kw, channels, multiplier = kernel.shape
    flipped = tf.reshape(_flip(kernel), [kh, kw, channels * multiplier, 1])
    spread = pad_spatial(dilate(dy, window.strides), backward_pads(window))
    dx = tf.nn.depthwise_conv2d(spread, flipped, strides=[1, 1, 1, 1], padding="VALID")
    if multiplier == 1:
        return dx
    h, w = window.size
    return tf.reduce_sum(tf.reshape(dx, [-1, h, w, channels, multiplier]), axis=-1)


def _depthwise_filter_grad(x: tf.Tensor, dy: tf.Tensor, window: Window) -> tf.Tensor:
    kh, kw = window.kernel
    channels = x.shape[-1]
    multiplier = dy.shape[-1] // channels
    padded = pad_spatial(x, window.pads)
    if multiplier > 1:
        dy = tf.reshape(dy, [-1, channels, multiplier])
    taps = []
    for i in range(kh):
        for j in range(kw):
            seen = window_slice(padded, window, i, j)
            if multiplier == 1:
                taps.append(tf.reduce_sum(seen * dy, axis=[0, 1, 2]))
            else:
                seen = tf.reshape(seen, [-1, channels, 1])
                taps.append(tf.reduce_sum(seen * dy, axis=0))
    return tf.reshape(tf.stack(taps), [kh, kw, channels, multiplier])
