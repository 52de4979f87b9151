"""Window geometry and the zero-insertion helpers shared by conv and pool grads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class Window:
    """A 2-D sliding window over an NHWC input, with TensorFlow's padding rules.

    Attributes:
        size: input height and width.
        kernel: window height and width.
        strides: step between windows along height and width.
        padding: "same" or "valid", as in Keras.
    """

    size: tuple[int, int]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: str

    @property
    def output(self) -> tuple[int, int]:
        """Output height and width."""
        return (self._out(0), self._out(1))

    def _out(self, axis: int) -> int:
        if self.padding == "same":
            return math.ceil(self.size[axis] / self.strides[axis])
        return (self.size[axis] - self.kernel[axis]) // self.strides[axis] + 1

    @property
    def pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Implicit (before, after) padding along height and width."""
        return (self._pad(0), self._pad(1))

    def _pad(self, axis: int) -> tuple[int, int]:
        if self.padding == "valid":
            return (0, 0)
        span = (self._out(axis) - 1) * self.strides[axis] + self.kernel[axis]
        total = max(span - self.size[axis], 0)
        return (total // 2, total - total // 2)

    @property
    def padded_size(self) -> tuple[int, int]:
        """Input height and width after the implicit padding."""
        (top, bottom), (left, right) = self.pads
        return (self.size[0] + top + bottom, self.size[1] + left + right)

    @property
    def dilated_output(self) -> tuple[int, int]:
        """Output size after inserting stride - 1 zeros between elements."""
        (ho, wo), (sh, sw) = self.output, self.strides
        return ((ho - 1) * sh + 1, (wo - 1) * sw + 1)


def dilate(t: tf.Tensor, strides: tuple[int, int]) -> tf.Tensor:
    """Insert ``stride - 1`` zero rows and columns between the elements of t.

    Uses reshapes and a 4-D PAD per axis, since a 6-D interleave is not
    available in every LiteRT version.
    """
    sh, sw = strides
    _, ho, wo, c = t.shape
    if sh > 1:
        t = tf.reshape(t, [-1, 1, wo, c])
        t = tf.pad(t, [[0, 0], [0, sh - 1], [0, 0], [0, 0]])
        t = tf.reshape(t, [-1, ho * sh, wo, c])[:, : (ho - 1) * sh + 1]
    if sw > 1:
        h = t.shape[1]
        t = tf.reshape(t, [-1, wo, 1, c])
        t = tf.pad(t, [[0, 0], [0, 0], [0, sw - 1], [0, 0]])
        t = tf.reshape(t, [-1, h, wo * sw, c])[:, :, : (wo - 1) * sw + 1]
    return t


def pad_spatial(
    t: tf.Tensor,
    pads: tuple[tuple[int, int], tuple[int, int]],
    value: float = 0.0,
) -> tf.Tensor:
    """Pad height and width of an NHWC tensor; a no-op for zero padding."""
    if not any(pads[0]) and not any(pads[1]):
        return t
    return tf.pad(
        t, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]], constant_values=value
    )


def backward_pads(window: Window) -> tuple[tuple[int, int], tuple[int, int]]:
    """Padding of the dilated output gradient for a stride-1 correlation.

    Correlating the padded, dilated gradient with the flipped kernel (VALID,
    stride 1) gives a tensor of exactly the input's height and width.
    """
    result = []
    for axis in (0, 1):
        before = window.pads[axis][0]
        kernel, size = window.kernel[axis], window.size[axis]
        dilated = window.dilated_output[axis]
        result.append((kernel - 1 - before, size - dilated + before))
    return (result[0], result[1])


def window_slice(t: tf.Tensor, window: Window, i: int, j: int) -> tf.Tensor:
    """Return the input elements that kernel tap (i, j) reads, one per output.

    ``t`` is the padded input; the result has the output's height and width.
    """
    (ho, wo), (sh, sw) = window.output, window.strides
    return t[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw, :]


def scatter_tap(t: tf.Tensor, window: Window, i: int, j: int) -> tf.Tensor:
    """Place output-shaped values at the padded-input positions of tap (i, j).

    This is the adjoint of ``window_slice``.
    """
    hp, wp = window.padded_size
    hd, wd = window.dilated_output
    return pad_spatial(dilate(t, window.strides), ((i, hp - i - hd), (j, wp - j - wd)))


def crop_padding(t: tf.Tensor, window: Window) -> tf.Tensor:
    """Drop the implicit padding from a padded-input-shaped tensor."""
    (top, _), (left, _) = window.pads
    h, w = window.size
    if t.shape[1] == h and t.shape[2] == w:
        return t
    return t[:, top : top + h, left : left + w, :]
