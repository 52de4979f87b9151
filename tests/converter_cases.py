"""Small Keras students, one per group of supported layers.

Shared by the converter parity tests and by ``tests.make_runtime_fixtures``,
which converts the same students for the TensorFlow-free runtime tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

layers = keras.layers


def _model(input_shape: tuple[int, ...], *stack: keras.layers.Layer) -> keras.Model:
    return keras.Sequential([keras.Input(input_shape), *stack])


def conv_same_batch_norm_relu6() -> keras.Model:
    return _model(
        (8, 8, 3),
        layers.Conv2D(4, 3, padding="same"),
        layers.BatchNormalization(momentum=0.9),
        layers.ReLU(6.0),
        layers.Flatten(),
        layers.Dense(5),
    )


def conv_strided_valid_and_same() -> keras.Model:
    return _model(
        (9, 9, 2),
        layers.Conv2D(4, 3, strides=2, padding="valid", activation="relu"),
        layers.Conv2D(3, 2, strides=2, padding="same", use_bias=False),
        layers.Flatten(),
        layers.Dense(5),
    )


def depthwise_convs() -> keras.Model:
    return _model(
        (8, 8, 3),
        layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.DepthwiseConv2D(3, padding="valid", activation="relu6"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(5),
    )


def separable_convs() -> keras.Model:
    return _model(
        (8, 8, 3),
        layers.SeparableConv2D(4, 3, padding="same", activation="relu"),
        layers.SeparableConv2D(6, 3, strides=2, padding="valid"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(5),
    )


def max_pools() -> keras.Model:
    return _model(
        (9, 9, 2),
        layers.Conv2D(4, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.MaxPooling2D(3, strides=2, padding="same"),
        layers.Flatten(),
        layers.Dense(5),
    )


def average_pools() -> keras.Model:
    return _model(
        (9, 9, 2),
        layers.Conv2D(4, 3, padding="same"),
        layers.AveragePooling2D(2),
        layers.AveragePooling2D(3, strides=2, padding="same"),
        layers.Flatten(),
        layers.Dense(5),
    )


def activations() -> keras.Model:
    return _model(
        (6,),
        layers.Dense(8, activation="sigmoid"),
        layers.Dense(8, activation="tanh"),
        layers.Dense(8, activation="swish"),
        layers.Dense(8, activation="hard_swish"),
        layers.LeakyReLU(0.1),
        layers.Dense(8, activation="leaky_relu"),
        layers.Activation("leaky_relu"),
        layers.Dense(8, activation="hard_sigmoid"),
        layers.Dense(8, activation="softmax"),
        layers.Dense(8),
        layers.ReLU(max_value=1.5, negative_slope=0.05),
        layers.Dense(5, activation="softmax"),
    )


def residual_add_and_concatenate() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    stem = layers.Conv2D(4, 3, padding="same")(inputs)
    stem = layers.BatchNormalization()(stem)
    stem = layers.ReLU()(stem)
    branch = layers.Conv2D(4, 1)(stem)
    branch = layers.Activation("relu6")(branch)
    merged = layers.Add()([stem, branch])
    joined = layers.Concatenate()([merged, stem, inputs])
    pooled = layers.GlobalAveragePooling2D()(joined)
    shaped = layers.Reshape((11, 1))(pooled)
    flat = layers.Flatten()(shaped)
    logits = layers.Dense(5)(flat)
    outputs = layers.Activation("softmax")(logits)
    return keras.Model(inputs, outputs)


def dropout_between_dense() -> keras.Model:
    return _model(
        (10,),
        layers.Dense(16, activation="relu"),
        layers.Dropout(0.3),
        layers.Dense(12, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(5),
    )


def bias_free_matmuls_then_relu() -> keras.Model:
    # The TensorFlow 2.21 LiteRT converter drops a ReLU fused into a matmul
    # whose kernel is a variable, so these ReLUs must stay unfused.
    return _model(
        (4, 4, 3),
        layers.Conv2D(4, 1, use_bias=False, activation="relu"),
        layers.SeparableConv2D(4, 3, use_bias=False, activation="relu6"),
        layers.Flatten(),
        layers.Dense(8, use_bias=False, activation="relu"),
        layers.Dense(8, use_bias=False),
        layers.Dropout(0.3),
        layers.ReLU(max_value=1.0),
        layers.Dense(5),
    )


CASES: list[Callable[[], keras.Model]] = [
    conv_same_batch_norm_relu6,
    conv_strided_valid_and_same,
    depthwise_convs,
    separable_convs,
    max_pools,
    average_pools,
    activations,
    residual_add_and_concatenate,
    dropout_between_dense,
    bias_free_matmuls_then_relu,
]
