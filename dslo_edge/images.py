"""Small real image data for convolutional students, without TensorFlow.

scikit-learn's bundled digits (8x8 grayscale) are upsampled to 32x32 and
spread over three colour channels, which gives MobileNet-style students a
real 10-class image task that needs no download.
"""

from __future__ import annotations

import numpy as np

# Per-channel gains, so the three channels differ as in a colour image.
CHANNEL_GAINS = np.array([1.0, 0.8, 0.6], np.float32)


def digits_as_rgb32(images: np.ndarray) -> np.ndarray:
    """Turn (N, 64) or (N, 8, 8) digits on the 0..16 scale into (N, 32, 32, 3).

    Pixels are nearest-neighbour upsampled by 4 and scaled to 0..1.
    """
    square = np.asarray(images, np.float32).reshape(-1, 8, 8) / 16.0
    large = square.repeat(4, axis=1).repeat(4, axis=2)
    return np.ascontiguousarray(large[..., None] * CHANNEL_GAINS)
