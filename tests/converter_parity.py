"""Helpers for converter parity tests: run the same train step in TensorFlow
(autodiff on the Keras model, a Keras optimizer) and in a LiteRT interpreter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from converters.export import to_tflite  # noqa: E402
from converters.layers import read_student  # noqa: E402
from converters.ops import dropout as dropout_ops  # noqa: E402
from converters.optimizers import OptimizerConfig  # noqa: E402
from converters.student_graph import StudentModule, weight_name  # noqa: E402
from converters.trainable import TrainableScope  # noqa: E402
from dslo_edge.runtime import load_interpreter  # noqa: E402

TEMPERATURE = 2.0


@dataclass
class Batch:
    """One train batch in the ``train`` signature's layout."""

    x: np.ndarray
    soft: np.ndarray
    hard: np.ndarray
    alpha: np.ndarray


def make_batches(
    input_shape: tuple[int, ...], classes: int, count: int, size: int, seed: int = 0
) -> list[Batch]:
    """Return random batches with valid soft labels and some missing hard labels."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        x = rng.normal(size=(size, *input_shape)).astype(np.float32)
        logits = rng.normal(size=(size, classes)) * 2.0
        soft = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        hard = rng.integers(0, classes, size=size).astype(np.int32)
        hard[rng.random(size) < 0.25] = -1
        alpha = rng.uniform(0.2, 0.8, size=size).astype(np.float32)
        batches.append(Batch(x, soft.astype(np.float32), hard, alpha))
    return batches


def reference_loss(z: tf.Tensor, batch: Batch) -> tf.Tensor:
    """The distillation loss written with plain TensorFlow ops (autodiff)."""
    t = TEMPERATURE
    log_q_t = tf.nn.log_softmax(z / t)
    soft = tf.constant(batch.soft)
    kl = tf.reduce_sum(
        tf.where(soft > 0, soft * tf.math.log(tf.maximum(soft, 1e-30)), 0.0)
        - soft * log_q_t,
        axis=-1,
    )
    one_hot = tf.one_hot(batch.hard, z.shape[-1])
    ce = -tf.reduce_sum(one_hot * tf.nn.log_softmax(z), axis=-1)
    return tf.reduce_mean(batch.alpha * t * t * kl + (1.0 - batch.alpha) * ce)


class KerasReference:
    """One Keras model trained with TensorFlow autodiff and a Keras optimizer."""

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        trained: list[str] | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.graph = read_student(model)
        self.step = 0
        names = self.variable_names()
        self.trained = [
            v
            for v, name in zip(
                model.trainable_variables, names["trainable"], strict=True
            )
            if trained is None or name in trained
        ]
        self._patch_dropout()

    def variable_names(self) -> dict[str, list[str]]:
        """Exported names of the Keras model's variables, trainable ones apart."""
        names: dict[str, list[str]] = {"trainable": [], "all": []}
        for layer in self.model.layers:
            for variable in layer.weights:
                name = weight_name(layer.name, variable.name)
                names["all"].append(name)
                if variable.trainable and layer.trainable:
                    names["trainable"].append(name)
        return names

    def _patch_dropout(self) -> None:
        # Dropout draws its mask from Keras' RNG; use the converter's hash mask
        # (same step counter and seeds) so both sides drop the same elements.
        dropouts = [n for n in self.graph.nodes if n.op == "dropout"]
        for index, node in enumerate(dropouts):
            layer = self.model.get_layer(node.layer)
            seed, rate = (index + 1) * 7919, node.params["rate"]

            def call(inputs, training=None, _seed=seed, _rate=rate):  # type: ignore[no-untyped-def]
                if not training:
                    return inputs
                step = tf.constant(self.step, tf.int32)
                keep = dropout_ops.keep_mask(step, _seed, inputs, _rate)
                return inputs * keep / (1.0 - _rate)

            layer.call = call

    def logits(self, x: np.ndarray, training: bool) -> tf.Tensor:
        out = self.model(x, training=training)
        return tf.math.log(out) if self.graph.final_softmax else out

    def train_step(self, batch: Batch, learning_rate: float) -> float:
        self.optimizer.learning_rate.assign(learning_rate)
        with tf.GradientTape() as tape:
            loss = reference_loss(self.logits(batch.x, True), batch)
        grads = tape.gradient(loss, self.trained)
        self.optimizer.apply(grads, self.trained)
        self.step += 1
        return float(loss)

    def weights(self) -> dict[str, np.ndarray]:
        values = [v.numpy() for layer in self.model.layers for v in layer.weights]
        return dict(zip(self.variable_names()["all"], values, strict=True))


def convert_student(
    model: keras.Model,
    optimizer: OptimizerConfig | None = None,
    scope: TrainableScope | None = None,
) -> tuple[StudentModule, bytes]:
    """Build the student module for a Keras model and convert it to LiteRT."""
    module = StudentModule(read_student(model), optimizer=optimizer, scope=scope)
    return module, to_tflite(module, module.signatures(), "student")


class InterpreterStudent:
    """The converted student in a LiteRT interpreter."""

    def __init__(self, model: bytes, runtime: str = "auto"):
        self.interpreter = load_interpreter(model_content=model, preference=runtime)
        self.runners = {
            key: self.interpreter.get_signature_runner(key)
            for key in self.interpreter.get_signature_list()
        }

    def train_step(self, batch: Batch, learning_rate: float) -> float:
        result = self.runners["train"](
            x=batch.x,
            soft=batch.soft,
            hard=batch.hard,
            alpha=batch.alpha,
            temperature=np.float32(TEMPERATURE),
            learning_rate=np.float32(learning_rate),
        )
        return float(result["loss"])

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.runners["infer"](x=x)["logits"])

    def weights(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.runners["get_weights"]().items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.runners["set_weights"](**weights)


# Tensors whose norm is below this (for example a conv bias followed by
# BatchNorm, whose gradient is zero up to rounding) are compared absolutely.
NORM_FLOOR = 1e-2


def relative_error(actual: Any, expected: Any) -> float:
    """Return ||actual - expected|| / max(||expected||, NORM_FLOOR)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.linalg.norm(expected)), NORM_FLOOR)
    return float(np.linalg.norm(actual - expected)) / scale


def worst_weight_error(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> tuple[str, float]:
    """Return the expected weight with the largest relative error, and that error."""
    errors = {
        name: relative_error(actual[name], value) for name, value in expected.items()
    }
    worst = max(errors, key=errors.__getitem__)
    return worst, errors[worst]
