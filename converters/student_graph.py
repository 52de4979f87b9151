"""The trainable student as a ``tf.Module`` made of LiteRT builtin ops only.

Every differentiable op comes from ``converters.ops`` and carries a
``tf.custom_gradient`` written with builtin ops. The loss supplies its own
gradient with respect to the logits in closed form. The optimizer runs in the
same graph, so one ``train`` call is one full update.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from converters import multihead
from converters.forward import ForwardPass, StateUpdate
from converters.graph import StudentGraph
from converters.loss import distillation_loss, log_softmax
from converters.optimizers import GraphOptimizer, OptimizerConfig
from converters.trainable import TrainableScope, is_trained, trained_layers
from dslo_edge.errors import ConversionError

__all__ = [
    "StudentModule",
    "distillation_loss",
    "initial_weights",
    "log_softmax",
    "weight_name",
]

DROPOUT_STEP = "dropout_step"
"""Exported name of the train step counter that seeds dropout masks."""


def weight_name(layer_name: str, part: str) -> str:
    """Return a signature-safe name for a layer weight, e.g. 'dense_1_kernel'."""
    return re.sub(r"\W", "_", f"{layer_name}_{part}", flags=re.ASCII)


def _check_weight_name(name: str, layer: str, layer_of_name: dict[str, str]) -> None:
    """Reject a weight name that the exported signatures cannot carry.

    TensorFlow 2.21 binds signature tensors as Python parameters, so a name
    must be unique and must not start with a digit or, because tf.function
    renames such parameters, with "_".
    """
    if not name[0].isalpha():
        raise ConversionError(
            f"the student's layer {layer!r} gives the weight name {name!r}, but "
            "exported weight names must start with a letter; rename the layer "
            "so that its name starts with a letter"
        )
    other = layer_of_name.get(name)
    if other is not None and other != layer:
        raise ConversionError(
            f"the student's layers {other!r} and {layer!r} both give the weight "
            f"name {name!r}, because characters other than ASCII letters, digits "
            "and '_' become '_'; rename one of the layers"
        )


class StudentModule(tf.Module):
    """Student network with infer, train, get_weights and set_weights signatures.

    Attributes:
        weight_names: every exported tensor name, in signature order: layer
            weights, BatchNorm moving statistics, optimizer state, then the
            dropout step counter when the student has Dropout.
        variables_list: the variables behind ``weight_names``.
        kinds: the role of each exported tensor: "trained", "frozen",
            "moving_statistic", "optimizer_state" or "dropout_step".
    """

    def __init__(
        self,
        graph: StudentGraph,
        *,
        optimizer: OptimizerConfig | None = None,
        scope: TrainableScope | None = None,
    ):
        super().__init__(name="student")
        self.graph = graph
        self.input_shape = graph.input_shape
        self.class_count = graph.class_count
        self.optimizer_config = optimizer or OptimizerConfig()
        self.scope = scope or TrainableScope()
        self.weight_names: list[str] = []
        # Keras variables are not tracked by tf.Module, so the module owns copies.
        self.variables_list: list[tf.Variable] = []
        self.kinds: dict[str, str] = {}
        node_variables = self._create_weights()

        self.trained = [
            (name, variable)
            for name, variable in zip(
                self.weight_names, self.variables_list, strict=True
            )
            if self.kinds[name] == "trained"
        ]
        if not self.trained:
            raise ConversionError(
                f"the student has no weight that trainable scope "
                f"{self.scope.describe()} would train: the layers it selects "
                "have trainable=False or, for biases-and-batchnorm, no bias, "
                "gamma or beta; set trainable=True on the layers to adapt or "
                "choose another scope"
            )
        self.optimizer = GraphOptimizer(self.optimizer_config, self.trained)
        for name, variable in self.optimizer.state:
            self._export(name, variable, "optimizer_state")

        self.dropout_step: tf.Variable | None = None
        if any(node.op == "dropout" for node in graph.nodes):
            # A float32 counter is exact up to 2**24 (16.7 million) steps.
            self.dropout_step = tf.Variable(0.0, name=DROPOUT_STEP)
            self._export(DROPOUT_STEP, self.dropout_step, "dropout_step")

        training_nodes = {
            node.name
            for node in graph.nodes
            if node.op == "batch_norm"
            and node.layer in self.trained_layers
            and not node.params.get("frozen")
        }
        self.forward = ForwardPass(graph, node_variables, training_nodes)

    def _create_weights(self) -> dict[str, dict[str, tf.Variable]]:
        # Layers with at least one trained weight; see converters.trainable.
        self.trained_layers = trained_layers(self.graph, self.scope)
        node_variables: dict[str, dict[str, tf.Variable]] = {}
        layer_of_name: dict[str, str] = {}
        for node in self.graph.nodes:
            node_variables[node.name] = {}
            for part, value in node.weights.items():
                name = weight_name(node.layer, part)
                _check_weight_name(name, node.layer, layer_of_name)
                layer_of_name[name] = node.layer
                variable = tf.Variable(value, name=name)
                node_variables[node.name][part] = variable
                if part in ("moving_mean", "moving_variance"):
                    kind = "moving_statistic"
                elif is_trained(node, part, self.trained_layers, self.scope):
                    kind = "trained"
                else:
                    kind = "frozen"
                self._export(name, variable, kind)
        return node_variables

    def _export(self, name: str, variable: tf.Variable, kind: str) -> None:
        self.weight_names.append(name)
        self.variables_list.append(variable)
        self.kinds[name] = kind

    def logits(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Return the logits; in training mode the state updates are dropped."""
        return self.forward(x, training, self._step())[0]

    def _step(self) -> tf.Tensor | None:
        if self.dropout_step is None:
            return None
        return tf.cast(self.dropout_step, tf.int32)

    def train_step(
        self,
        x: tf.Tensor,
        soft: tf.Tensor,
        hard: tf.Tensor,
        alpha: tf.Tensor,
        temperature: tf.Tensor,
        learning_rate: tf.Tensor,
    ) -> tf.Tensor:
        """Run one optimizer step on the distillation loss and return the loss."""
        head = self.graph.heads[0].name

        def loss_of(logits: dict[str, tf.Tensor]) -> tf.Tensor:
            return distillation_loss(logits[head], soft, hard, alpha, temperature)

        return self._optimize(x, learning_rate, loss_of)

    def _optimize(
        self,
        x: tf.Tensor,
        learning_rate: tf.Tensor,
        loss_of: Callable[[dict[str, tf.Tensor]], tf.Tensor],
    ) -> tf.Tensor:
        # One forward pass in training mode, one optimizer step, then the
        # BatchNorm and dropout state updates.
        trained = [variable for _, variable in self.trained]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(trained)
            logits, updates = self.forward.heads(x, True, self._step())
            loss = loss_of(logits)
        grads = tape.gradient(loss, trained)
        self.optimizer.apply(grads, learning_rate)
        _assign(updates)
        if self.dropout_step is not None:
            self.dropout_step.assign_add(1.0)
        return loss

    def _x_spec(self) -> tf.TensorSpec:
        return tf.TensorSpec([None, *self.input_shape], tf.float32, name="x")

    def signatures(self) -> dict[str, Any]:
        """Build the concrete functions to export, keyed by signature name.

        A single-head student gets ``train(x, soft, hard, alpha, temperature,
        learning_rate)`` and ``infer`` outputs ``logits`` and
        ``probabilities``. A student with several heads gets the per-head
        inputs and outputs described in ``converters.multihead``.
        """
        if self.graph.multi_head:
            infer, train = self._multi_head_functions()
        else:
            infer, train = self._single_head_functions()
        get_weights = tf.function(self._get_weights).get_concrete_function()
        return {
            "infer": infer,
            "train": train,
            "get_weights": get_weights,
            "set_weights": self._set_weights_function(),
        }

    def _single_head_functions(self) -> tuple[Any, Any]:
        k = self.class_count
        infer = tf.function(self._infer).get_concrete_function(self._x_spec())
        train = tf.function(self._train).get_concrete_function(
            self._x_spec(),
            tf.TensorSpec([None, k], tf.float32, name="soft"),
            tf.TensorSpec([None], tf.int32, name="hard"),
            tf.TensorSpec([None], tf.float32, name="alpha"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.float32, name="learning_rate"),
        )
        return infer, train

    def _multi_head_functions(self) -> tuple[Any, Any]:
        heads = self.graph.heads

        def infer(x: tf.Tensor) -> dict[str, tf.Tensor]:
            logits, _ = self.forward.heads(x, False, self._step())
            return multihead.infer_outputs(logits, heads)

        def train(**inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            losses: dict[str, tf.Tensor] = {}

            def loss_of(logits: dict[str, tf.Tensor]) -> tf.Tensor:
                losses.update(multihead.head_losses(logits, inputs, heads))
                return multihead.weighted_loss(losses, inputs)

            loss = self._optimize(inputs["x"], inputs["learning_rate"], loss_of)
            per_head = {f"loss_{name}": value for name, value in losses.items()}
            return {"loss": loss, **per_head}

        specs = multihead.train_specs(self.input_shape, heads)
        return (
            tf.function(infer).get_concrete_function(self._x_spec()),
            multihead.keyword_concrete_function(train, specs),
        )

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        z = self.logits(x)
        return {"logits": z, "probabilities": tf.nn.softmax(z)}

    def _train(self, x, soft, hard, alpha, temperature, learning_rate):  # type: ignore[no-untyped-def]
        loss = self.train_step(x, soft, hard, alpha, temperature, learning_rate)
        return {"loss": loss}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {
            name: variable.read_value()
            for name, variable in zip(
                self.weight_names, self.variables_list, strict=True
            )
        }

    def _set_weights_function(self) -> Any:
        names = list(self.weight_names)
        variables = list(self.variables_list)

        def set_weights(**weights: tf.Tensor) -> dict[str, tf.Tensor]:
            for name, variable in zip(names, variables, strict=True):
                variable.assign(weights[name])
            return {"assigned": tf.constant(len(names), tf.int32)}

        # tf.function reads argument names from the signature, and LiteRT
        # signature inputs take those names.
        set_weights.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
        )
        specs = {
            name: tf.TensorSpec(variable.shape, tf.float32, name=name)
            for name, variable in zip(names, variables, strict=True)
        }
        return tf.function(set_weights).get_concrete_function(**specs)


def _assign(updates: list[StateUpdate]) -> None:
    for variable, value in updates:
        variable.assign(value)


def initial_weights(module: StudentModule) -> dict[str, np.ndarray]:
    """Return the module's current exported tensors by name."""
    return {
        name: variable.numpy()
        for name, variable in zip(
            module.weight_names, module.variables_list, strict=True
        )
    }
