"""Evaluate a ``StudentGraph`` with the builtin-gradient ops.

The same code builds the ``infer`` graph (BatchNorm on moving statistics,
Dropout off) and the forward half of the ``train`` graph.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from converters.graph import INPUT, GraphNode, StudentGraph
from converters.ops import activations, conv, dropout, linear, pooling, structure
from converters.ops.geometry import Window
from converters.ops.normalization import batch_norm_infer, batch_norm_train

StateUpdate = tuple[tf.Variable, tf.Tensor]
"""A variable and the value the train step assigns to it."""

_SEED_STRIDE = 7919


class ForwardPass:
    """Callable that maps an input batch to logits and BatchNorm state updates."""

    def __init__(
        self,
        graph: StudentGraph,
        variables: dict[str, dict[str, tf.Variable]],
        training_batch_norms: set[str],
    ):
        self.graph = graph
        self.variables = variables
        self.training_batch_norms = training_batch_norms
        dropouts = [node.name for node in graph.nodes if node.op == "dropout"]
        self.seeds = {name: (i + 1) * _SEED_STRIDE for i, name in enumerate(dropouts)}
        self.handlers: dict[str, Callable[..., tf.Tensor]] = {
            "dense": self._dense,
            "conv2d": self._conv2d,
            "depthwise_conv2d": self._depthwise_conv2d,
            "batch_norm": self._batch_norm,
            "activation": self._activation,
            "max_pool": self._max_pool,
            "avg_pool": self._avg_pool,
            "global_avg_pool": self._global_avg_pool,
            "reshape": self._reshape,
            "add": self._add,
            "concatenate": self._concatenate,
            "dropout": self._dropout,
        }

    def __call__(
        self, x: tf.Tensor, training: bool, step: tf.Tensor | None
    ) -> tuple[tf.Tensor, list[StateUpdate]]:
        """Run the graph.

        Args:
            x: input batch.
            training: batch statistics for trained BatchNorm layers and
                active Dropout.
            step: int32 train step counter for the dropout masks.
        """
        values = self._run(x, training, step)
        return values[self.graph.logits], self._updates

    def heads(
        self, x: tf.Tensor, training: bool, step: tf.Tensor | None
    ) -> tuple[dict[str, tf.Tensor], list[StateUpdate]]:
        """Run the graph once and return every head's logits by head name.

        The arguments are those of ``__call__``.
        """
        values = self._run(x, training, step)
        logits = {head.name: values[head.logits] for head in self.graph.heads}
        return logits, self._updates

    def _run(
        self, x: tf.Tensor, training: bool, step: tf.Tensor | None
    ) -> dict[str, tf.Tensor]:
        self._training, self._step = training, step
        self._updates: list[StateUpdate] = []
        values = {INPUT: x}
        for node in self.graph.nodes:
            inputs = [values[name] for name in node.inputs]
            values[node.name] = self.handlers[node.op](node, inputs)
        return values

    def _weight(self, node: GraphNode, part: str) -> tf.Variable | None:
        return self.variables[node.name].get(part)

    def _first_weight(self, node: GraphNode, *parts: str) -> tf.Variable:
        for part in parts:
            if part in self.variables[node.name]:
                return self.variables[node.name][part]
        raise KeyError(f"node {node.name} has none of {parts}")

    def _window(self, node: GraphNode, x: tf.Tensor) -> Window:
        size = (int(x.shape[1]), int(x.shape[2]))
        params = node.params
        return Window(size, params["kernel"], params["strides"], params["padding"])

    def _with_bias(self, node: GraphNode, y: tf.Tensor) -> tf.Tensor:
        bias = self._weight(node, "bias")
        return y if bias is None else linear.bias_add(y, bias)

    def _dense(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        return self._with_bias(
            node, linear.matmul(inputs[0], self._weight(node, "kernel"))
        )

    def _conv2d(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        kernel = self._first_weight(node, "kernel", "pointwise_kernel")
        y = conv.conv2d(inputs[0], kernel, self._window(node, inputs[0]))
        return self._with_bias(node, y)

    def _depthwise_conv2d(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        kernel = self._first_weight(node, "kernel", "depthwise_kernel")
        y = conv.depthwise_conv2d(inputs[0], kernel, self._window(node, inputs[0]))
        return self._with_bias(node, y)

    def _batch_norm(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        x = inputs[0]
        channels = int(x.shape[-1])
        gamma = self._weight(node, "gamma")
        beta = self._weight(node, "beta")
        gamma = tf.ones([channels]) if gamma is None else gamma
        beta = tf.zeros([channels]) if beta is None else beta
        moving_mean = self._weight(node, "moving_mean")
        moving_variance = self._weight(node, "moving_variance")
        epsilon = node.params["epsilon"]
        if not (self._training and node.name in self.training_batch_norms):
            return batch_norm_infer(
                x, gamma, beta, moving_mean, moving_variance, epsilon
            )
        y, mean, variance = batch_norm_train(x, gamma, beta, epsilon)
        momentum = node.params["momentum"]
        self._updates.append(
            (moving_mean, moving_mean * momentum + mean * (1.0 - momentum))
        )
        self._updates.append(
            (moving_variance, moving_variance * momentum + variance * (1.0 - momentum))
        )
        return y

    def _activation(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        function = node.params["function"]
        if function in ("relu", "relu6", "leaky_relu"):
            max_value = 6.0 if function == "relu6" else node.params.get("max_value")
            op = activations.relu_family(
                node.params.get("negative_slope", 0.0),
                max_value,
                fusable=not self._follows_bias_free_matmul(node),
            )
            return op(inputs[0])
        return activations.ACTIVATIONS[function](inputs[0])

    def _follows_bias_free_matmul(self, node: GraphNode) -> bool:
        """Return whether a matmul without bias produces this node's input.

        Dense and 1x1 stride-1 convolutions are matmuls. Dropout and reshapes
        in between pass the values on unchanged at inference.
        """
        name = node.inputs[0]
        while name != INPUT and self.graph.node(name).op in ("dropout", "reshape"):
            name = self.graph.node(name).inputs[0]
        if name == INPUT:
            return False
        source = self.graph.node(name)
        if "bias" in source.weights:
            return False
        if source.op == "dense":
            return True
        params = source.params
        pointwise = params.get("kernel") == (1, 1) and params.get("strides") == (1, 1)
        return source.op == "conv2d" and pointwise

    def _max_pool(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        return pooling.max_pool(inputs[0], self._window(node, inputs[0]))

    def _avg_pool(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        return pooling.avg_pool(inputs[0], self._window(node, inputs[0]))

    def _global_avg_pool(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        return pooling.global_avg_pool(inputs[0], node.params["keepdims"])

    def _reshape(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        return structure.reshape(inputs[0], node.output_shape)

    def _add(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        return structure.add(inputs)

    def _concatenate(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        return structure.concatenate(inputs, node.params["axis"])

    def _dropout(self, node: GraphNode, inputs: list[tf.Tensor]) -> tf.Tensor:
        rate = node.params["rate"]
        if not self._training or rate == 0.0:
            return inputs[0]
        assert self._step is not None
        keep = dropout.keep_mask(self._step, self.seeds[node.name], inputs[0], rate)
        return dropout.dropout(inputs[0], keep, rate)
