"""scikit-learn's bundled digits, split for the demo, with a device-style shift.

The shift imitates one new device whose camera captures the same digits
differently: every image is rotated by 8 to 14 degrees (a tilted mount),
moved by about 0.6 pixel right and 0.4 pixel down, dimmed to 85 % contrast,
and given Gaussian sensor noise (sigma 0.05 on the 0..1 pixel scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SHIFT_DESCRIPTION: dict[str, Any] = {
    "rotation_degrees": [8.0, 14.0],
    "offset_pixels": [0.6, 0.4],
    "contrast": 0.85,
    "noise_sigma": 0.05,
}


@dataclass(frozen=True)
class DigitsSplits:
    """Inputs are flattened 8x8 images scaled to 0..1, labels 0..9."""

    base_x: np.ndarray
    base_y: np.ndarray
    hub_x: np.ndarray
    hub_y: np.ndarray
    adapt_x: np.ndarray
    adapt_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _affine(
    images: np.ndarray, angles: np.ndarray, offset: tuple[float, float]
) -> np.ndarray:
    from scipy import ndimage

    out = np.empty_like(images)
    for index, (image, angle) in enumerate(zip(images, angles, strict=True)):
        rotated = ndimage.rotate(image, angle, reshape=False, order=1, mode="constant")
        out[index] = ndimage.shift(rotated, offset, order=1, mode="constant")
    return out


def device_shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply the documented device shift to (N, 8, 8) images in 0..1."""
    low, high = SHIFT_DESCRIPTION["rotation_degrees"]
    angles = rng.uniform(low, high, size=len(images))
    dx, dy = SHIFT_DESCRIPTION["offset_pixels"]
    moved = _affine(images, angles, (dy, dx))
    dimmed = moved * SHIFT_DESCRIPTION["contrast"]
    noisy = dimmed + rng.normal(
        0.0, SHIFT_DESCRIPTION["noise_sigma"], size=dimmed.shape
    )
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def hub_augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random rotations, offsets, contrast and noise: the hub's varied data."""
    angles = rng.uniform(-20.0, 20.0, size=len(images))
    out = np.empty_like(images)
    for index in range(len(images)):
        offset = tuple(rng.uniform(-1.0, 1.0, size=2))
        out[index] = _affine(
            images[index : index + 1], angles[index : index + 1], offset
        )[0]
    contrast = rng.uniform(0.75, 1.0, size=(len(images), 1, 1))
    noisy = out * contrast + rng.normal(0.0, 0.05, size=out.shape)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def load_splits(seed: int) -> DigitsSplits:
    """Split the 1,797 digits into base, hub, adaptation and test parts.

    base (40 %): clean images the student and teacher first learn from.
    hub (20 %): clean images the hub's teacher also trains on, augmented.
    adapt (20 %): shifted images the device receives, unlabelled on the device.
    test (20 %): shifted images held out for every accuracy figure.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    cuts = (np.array([0.4, 0.6, 0.8]) * len(images)).astype(int)
    base, hub, adapt, test = np.split(order, cuts)

    def flat(batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1).astype(np.float32)

    return DigitsSplits(
        base_x=flat(images[base]),
        base_y=labels[base],
        hub_x=flat(images[hub]),
        hub_y=labels[hub],
        adapt_x=flat(device_shift(images[adapt], rng)),
        adapt_y=labels[adapt],
        test_x=flat(device_shift(images[test], rng)),
        test_y=labels[test],
    )


def teacher_training_set(
    splits: DigitsSplits, seed: int, copies: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Return the hub's teacher data: clean images plus augmented copies."""
    rng = np.random.default_rng(seed + 1)
    clean_x = np.concatenate([splits.base_x, splits.hub_x])
    clean_y = np.concatenate([splits.base_y, splits.hub_y])
    images = clean_x.reshape(-1, 8, 8)
    augmented = [
        hub_augment(images, rng).reshape(len(images), -1) for _ in range(copies)
    ]
    x = np.concatenate([clean_x, *augmented]).astype(np.float32)
    y = np.concatenate([clean_y] * (copies + 1)).astype(np.int32)
    return x, y
