"""The student as a graph of ops: what the Keras reader produces and the
``StudentModule`` lowers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

INPUT = "input"
"""Node name of the model input."""


@dataclass
class GraphNode:
    """One op of the student's forward pass.

    Attributes:
        name: unique node name; the Keras layer name, with ":activation"
            appended for an activation fused into a layer.
        op: the op kind, e.g. "conv2d", "batch_norm", "activation".
        layer: the Keras layer the node came from.
        inputs: names of the nodes this one reads, in call order.
        output_shape: shape of one sample of the output (no batch axis).
        params: static settings (strides, padding, epsilon, ...).
        weights: the layer's arrays by part name ("kernel", "bias", ...).
    """

    name: str
    op: str
    layer: str
    inputs: list[str]
    output_shape: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class StudentGraph:
    """The student as nodes in topological order.

    Attributes:
        input_shape: shape of one input sample.
        nodes: the ops; node inputs always come earlier in the list, and the
            name "input" is the model input.
        logits: name of the node whose output is the logits.
        final_softmax: whether the Keras model applies softmax after logits.
        layers: Keras layer names in topological order (trainable scopes
            refer to these).
    """

    input_shape: tuple[int, ...]
    nodes: list[GraphNode]
    logits: str
    final_softmax: bool
    layers: list[str]

    @property
    def class_count(self) -> int:
        return int(self.node(self.logits).output_shape[-1])

    def node(self, name: str) -> GraphNode:
        """Return the node with this name."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)
