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


@dataclass(frozen=True)
class OutputHead:
    """One classification output (task) of the student.

    Attributes:
        name: the Keras output layer name with every non-word character
            replaced by "_". Signature tensor names end in it.
        logits: name of the node whose output is this head's logits.
        final_softmax: whether the Keras model applies softmax after them.
        class_count: number of classes K of this head.
    """

    name: str
    logits: str
    final_softmax: bool
    class_count: int

    @property
    def output_kind(self) -> str:
        """What the Keras output holds: "probabilities" or "logits"."""
        return "probabilities" if self.final_softmax else "logits"


@dataclass
class StudentGraph:
    """The student as nodes in topological order.

    Attributes:
        input_shape: shape of one input sample.
        nodes: the ops; node inputs always come earlier in the list, and the
            name "input" is the model input.
        logits: name of the node whose output is the logits. In a student
            with several heads, these are the first head's logits.
        final_softmax: whether the Keras model applies softmax after logits.
        layers: Keras layer names in topological order (trainable scopes
            refer to these).
        heads: every output head in Keras output order. A single-head
            student has one entry, which matches ``logits`` and
            ``final_softmax``.
    """

    input_shape: tuple[int, ...]
    nodes: list[GraphNode]
    logits: str
    final_softmax: bool
    layers: list[str]
    heads: list[OutputHead]

    @property
    def multi_head(self) -> bool:
        """Whether the student has more than one output head."""
        return len(self.heads) > 1

    @property
    def class_count(self) -> int:
        return int(self.node(self.logits).output_shape[-1])

    def node(self, name: str) -> GraphNode:
        """Return the node with this name."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)
