"""Trainable scopes: the weights that the ``train`` signature updates.

Weights outside the scope stay fixed and, because the gradient tape watches
only the trained weights, TensorFlow builds no backward ops for the layers
before the first trained one. BatchNormalization layers outside the scope
run in inference mode (moving statistics, no update), as a Keras layer with
``trainable=False`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from converters.graph import GraphNode, StudentGraph
from dslo_edge.errors import ConversionError, TrainableScopeError

SCOPES = ("all", "from-layer", "last-layers", "biases-and-batchnorm")
_LOW_MEMORY_PARTS = ("bias", "gamma", "beta")


@dataclass(frozen=True)
class TrainableScope:
    """A trainable scope.

    Attributes:
        kind: "all", "from-layer" (the named layer and every layer after it
            in topological order), "last-layers" (the last ``count`` layers
            that have weights) or "biases-and-batchnorm" (biases and
            BatchNorm gamma/beta only, the low-memory mode).
        layer: the first trained layer, for "from-layer".
        count: how many layers, for "last-layers".
    """

    kind: str = "all"
    layer: str | None = None
    count: int | None = None

    @classmethod
    def parse(cls, text: str) -> TrainableScope:
        """Parse "all", "from:LAYER", "last:N" or "biases-and-batchnorm"."""
        if text in ("all", "biases-and-batchnorm"):
            return cls(text)
        if text.startswith("from:") and len(text) > 5:
            return cls("from-layer", layer=text[5:])
        if text.startswith("last:") and text[5:].isdigit() and int(text[5:]) > 0:
            return cls("last-layers", count=int(text[5:]))
        raise ConversionError(
            f"invalid trainable scope '{text}'; expected all, from:LAYER, "
            "last:N (N >= 1) or biases-and-batchnorm"
        )

    def describe(self) -> str:
        """Return the scope in the form ``parse`` reads."""
        if self.kind == "from-layer":
            return f"from:{self.layer}"
        if self.kind == "last-layers":
            return f"last:{self.count}"
        return self.kind


def trained_layers(graph: StudentGraph, scope: TrainableScope) -> set[str]:
    """Return the Keras layer names whose weights (some or all) are trained.

    Raises:
        TrainableScopeError: the named layer does not exist, "last:N" names more
            layers than have weights, or the scope selects no weights.
    """
    weighted = [name for name in graph.layers if _has_weights(graph, name)]
    if scope.kind == "from-layer":
        if scope.layer not in graph.layers:
            raise TrainableScopeError(
                f"trainable scope names layer '{scope.layer}', which the student "
                f"does not have; its layers are: {', '.join(graph.layers)}"
            )
        start = graph.layers.index(scope.layer)
        chosen = set(graph.layers[start:]) & set(weighted)
    elif scope.kind == "last-layers":
        assert scope.count is not None
        _check_count(scope.count, weighted)
        chosen = set(weighted[-scope.count :])
    else:
        chosen = set(weighted)
    if not chosen:
        raise TrainableScopeError(
            f"trainable scope {scope.describe()} selects no layer with weights; "
            "choose an earlier layer"
        )
    return chosen


def _check_count(count: int, weighted: list[str]) -> None:
    if count <= len(weighted) or not weighted:
        return
    raise TrainableScopeError(
        f"trainable scope last:{count} names {count} layers, but the student "
        f"has {len(weighted)} layers with weights; "
        f"expected last:N with N from 1 to {len(weighted)}, from:LAYER, all "
        "or biases-and-batchnorm"
    )


def _has_weights(graph: StudentGraph, layer: str) -> bool:
    return any(node.weights for node in graph.nodes if node.layer == layer)


def is_trained(
    node: GraphNode, part: str, layers: set[str], scope: TrainableScope
) -> bool:
    """Return whether one weight of a node is updated by the train signature."""
    if part in ("moving_mean", "moving_variance") or node.layer not in layers:
        return False
    if node.params.get("frozen"):
        return False
    if scope.kind == "biases-and-batchnorm":
        return part in _LOW_MEMORY_PARTS
    return True
