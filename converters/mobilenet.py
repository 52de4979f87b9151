"""A MobileNetV2-style student for 32x32x3 images, built from supported layers.

The blocks follow MobileNetV2's inverted residual design (Sandler et al.,
2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"). Each block
is a 1x1 expansion conv, a 3x3 depthwise conv and a linear 1x1 projection,
each followed by BatchNorm, with ReLU6 after the first two. A residual Add
joins input and output when the stride is 1 and the channel count is
unchanged. Widths are scaled down so that a train step is cheap on an edge
board.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402  (after quieting TensorFlow's C++ logging)

# (expansion factor, output channels, stride) per inverted residual block.
DEFAULT_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 16, 1),
    (4, 24, 2),
    (4, 24, 1),
    (4, 32, 2),
    (4, 32, 1),
    (4, 48, 1),
    (4, 48, 1),
)


# Keras defaults to 0.99, which leaves the moving statistics far from the
# batch statistics after a few hundred on-device steps from scratch.
BATCH_NORM_MOMENTUM = 0.9


def _batch_norm(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=name)


def _conv_bn(x: keras.KerasTensor, filters: int, kernel: int, stride: int, name: str):  # type: ignore[no-untyped-def]
    x = keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=name
    )(x)
    return _batch_norm(f"{name}_bn")(x)


def _inverted_residual(
    x: keras.KerasTensor, expansion: int, filters: int, stride: int, name: str
) -> keras.KerasTensor:
    channels = int(x.shape[-1])
    y = x
    if expansion != 1:
        y = _conv_bn(y, channels * expansion, 1, 1, f"{name}_expand")
        y = keras.layers.ReLU(6.0, name=f"{name}_expand_relu6")(y)
    y = keras.layers.DepthwiseConv2D(
        3, strides=stride, padding="same", use_bias=False, name=f"{name}_depthwise"
    )(y)
    y = _batch_norm(f"{name}_depthwise_bn")(y)
    y = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu6")(y)
    y = _conv_bn(y, filters, 1, 1, f"{name}_project")
    if stride == 1 and channels == filters:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def build_mobilenet_student(
    input_shape: tuple[int, int, int] = (32, 32, 3),
    class_count: int = 10,
    blocks: tuple[tuple[int, int, int], ...] = DEFAULT_BLOCKS,
    stem_filters: int = 16,
    head_filters: int = 96,
) -> keras.Model:
    """Return an untrained MobileNetV2-style student.

    Args:
        input_shape: image height, width and channels.
        class_count: number of output logits.
        blocks: (expansion, output channels, stride) for each block.
        stem_filters: channels of the stride-2 stem conv.
        head_filters: channels of the 1x1 conv before global pooling.
    """
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, stem_filters, 3, 2, "stem")
    x = keras.layers.ReLU(6.0, name="stem_relu6")(x)
    for index, (expansion, filters, stride) in enumerate(blocks):
        x = _inverted_residual(x, expansion, filters, stride, f"block{index}")
    x = _conv_bn(x, head_filters, 1, 1, "head")
    x = keras.layers.ReLU(6.0, name="head_relu6")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.1, name="dropout")(x)
    outputs = keras.layers.Dense(class_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="mobilenet_student")
