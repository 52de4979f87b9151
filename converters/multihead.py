"""Signature inputs, outputs and loss of a student with several output heads.

Each head (task) t gets its own train inputs, named after the head:
``soft_<head>`` (N, K_t), ``hard_<head>`` (N,) int32 with -1 masking the CE
term, ``alpha_<head>`` (N,), ``temperature_<head>`` () and ``weight_<head>``
(). The input batch ``x`` and ``learning_rate`` are shared. The loss is::

    L = sum_t weight_t * L_t(z_t, soft_t, hard_t, alpha_t, T_t)

where L_t is the single-head distillation loss of ``converters.loss``, so
each head keeps its closed-form logit gradient and the shared trunk receives
the weighted sum of the heads' gradients.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from converters.graph import OutputHead
from converters.loss import distillation_loss

HEAD_INPUTS = ("soft", "hard", "alpha", "temperature", "weight")
"""Per-head train inputs, each named ``<input>_<head>`` in the signature."""


def train_specs(
    input_shape: tuple[int, ...], heads: list[OutputHead]
) -> dict[str, tf.TensorSpec]:
    """Return the train signature's input specs by input name."""
    specs = {"x": tf.TensorSpec([None, *input_shape], tf.float32, name="x")}
    for head in heads:
        shapes = {
            "soft": ([None, head.class_count], tf.float32),
            "hard": ([None], tf.int32),
            "alpha": ([None], tf.float32),
            "temperature": ([], tf.float32),
            "weight": ([], tf.float32),
        }
        for field in HEAD_INPUTS:
            name = f"{field}_{head.name}"
            shape, dtype = shapes[field]
            specs[name] = tf.TensorSpec(shape, dtype, name=name)
    specs["learning_rate"] = tf.TensorSpec([], tf.float32, name="learning_rate")
    return specs


def head_losses(
    logits: dict[str, tf.Tensor],
    inputs: dict[str, tf.Tensor],
    heads: list[OutputHead],
) -> dict[str, tf.Tensor]:
    """Return each head's unweighted batch-mean distillation loss L_t."""
    return {
        head.name: distillation_loss(
            logits[head.name],
            inputs[f"soft_{head.name}"],
            inputs[f"hard_{head.name}"],
            inputs[f"alpha_{head.name}"],
            inputs[f"temperature_{head.name}"],
        )
        for head in heads
    }


def weighted_loss(
    losses: dict[str, tf.Tensor], inputs: dict[str, tf.Tensor]
) -> tf.Tensor:
    """Return sum_t weight_t * L_t over the heads in ``losses``."""
    terms = [inputs[f"weight_{name}"] * loss for name, loss in losses.items()]
    return tf.add_n(terms)


def infer_outputs(
    logits: dict[str, tf.Tensor], heads: list[OutputHead]
) -> dict[str, tf.Tensor]:
    """Return ``logits_<head>`` and ``probabilities_<head>`` for every head."""
    outputs = {}
    for head in heads:
        z = logits[head.name]
        outputs[f"logits_{head.name}"] = z
        outputs[f"probabilities_{head.name}"] = tf.nn.softmax(z)
    return outputs


def keyword_concrete_function(
    function: Callable[..., dict[str, tf.Tensor]], specs: dict[str, tf.TensorSpec]
) -> Any:
    """Trace ``function(**tensors)`` with one keyword input per spec.

    tf.function reads argument names from the Python signature, and LiteRT
    signature inputs take those names, so the signature is set explicitly.
    """
    function.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in specs]
    )
    return tf.function(function).get_concrete_function(**specs)
