"""Unit checks of single ops: dropout masks and window geometry."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from converters.ops.dropout import keep_mask  # noqa: E402
from converters.ops.geometry import Window  # noqa: E402


def _mask(step: int, seed: int, rate: float, shape=(64, 32, 8)) -> np.ndarray:
    like = tf.zeros(shape)
    return keep_mask(tf.constant(step, tf.int32), seed, like, rate).numpy()


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.9])
def test_dropout_keeps_expected_fraction(rate: float) -> None:
    kept = _mask(step=3, seed=7919, rate=rate).mean()

    assert kept == pytest.approx(1.0 - rate, abs=0.01)


def test_dropout_masks_change_with_step_and_seed() -> None:
    first = _mask(step=0, seed=7919, rate=0.5)

    assert np.array_equal(first, _mask(step=0, seed=7919, rate=0.5))
    assert (first != _mask(step=1, seed=7919, rate=0.5)).mean() > 0.4
    assert (first != _mask(step=0, seed=15838, rate=0.5)).mean() > 0.4
    assert (first != _mask(step=46337, seed=7919, rate=0.5)).mean() > 0.4


def test_dropout_mask_has_no_row_pattern() -> None:
    mask = _mask(step=5, seed=7919, rate=0.5, shape=(256, 64))

    row_means = mask.mean(axis=1)
    column_means = mask.mean(axis=0)
    assert row_means.std() < 0.1
    assert column_means.std() < 0.1


@pytest.mark.parametrize("size", [7, 8, 9])
@pytest.mark.parametrize("kernel", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_window_output_matches_tensorflow(
    size: int, kernel: int, stride: int, padding: str
) -> None:
    window = Window((size, size + 1), (kernel, kernel), (stride, stride), padding)
    x = tf.zeros([1, size, size + 1, 1])

    y = tf.nn.max_pool2d(x, kernel, stride, padding.upper())
    assert window.output == tuple(y.shape[1:3])
