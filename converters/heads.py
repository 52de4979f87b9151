"""Find the output heads (tasks) of a Keras student in its op graph.

Each Keras output becomes one head. A head ends in its logits, optionally
followed by a softmax (a Dense activation, an ``Activation`` or a ``Softmax``
layer), so the logits node is the softmax's input when there is one.
"""

from __future__ import annotations

import re
from typing import Any

from converters.graph import GraphNode, OutputHead
from dslo_edge.errors import ConversionError
from dslo_edge.manifest import MAX_CLASSES, MIN_CLASSES
from dslo_edge.multihead_protocol import MAX_HEAD_NAME_BYTES, MAX_HEADS


def head_name(layer_name: str) -> str:
    """Return the signature-safe head name of a Keras output layer name."""
    return re.sub(r"\W", "_", layer_name, flags=re.ASCII)


def output_layer_names(model: Any) -> list[str]:
    """Return the names of the Keras layers that produce a model's outputs."""
    return [tensor._keras_history.operation.name for tensor in model.outputs]


def read_heads(
    keras_graph: Any, nodes: list[GraphNode], outputs: dict[str, str]
) -> list[OutputHead]:
    """Return one head per Keras output, in output order.

    Args:
        keras_graph: the functional Keras graph the nodes were read from.
        nodes: the op graph in topological order.
        outputs: the last op node of each Keras layer, by layer name.

    Raises:
        ConversionError: two outputs come from the same layer, two layer
            names give the same head name, an output has fewer than 2 or
            more than 65535 classes, or there are more than ``MAX_HEADS``
            outputs.
    """
    by_name = {node.name: node for node in nodes}
    layer_names = output_layer_names(keras_graph)
    _check_distinct_layers(layer_names)
    heads: list[OutputHead] = []
    for layer_name in layer_names:
        last = by_name[outputs[layer_name]]
        final_softmax = last.op == "activation" and last.params["function"] == "softmax"
        logits = last.inputs[0] if final_softmax else last.name
        _check_logits(layer_name, by_name, logits)
        class_count = int(by_name[logits].output_shape[-1])
        _check_class_count(layer_name, class_count)
        heads.append(
            OutputHead(head_name(layer_name), logits, final_softmax, class_count)
        )
    _check_unique([head.name for head in heads])
    if len(heads) > 1:
        _check_lengths([head.name for head in heads])
    if len(heads) > MAX_HEADS:
        raise ConversionError(
            f"the student has {len(heads)} outputs, but updates carry labels for "
            f"at most {MAX_HEADS} heads; give the student at most {MAX_HEADS} "
            "outputs"
        )
    return heads


def _check_logits(layer_name: str, by_name: dict[str, GraphNode], logits: str) -> None:
    """Reject a head whose logits come out of an activation.

    The runtime applies softmax to the logits, so a sigmoid output, or a
    softmax followed by Dropout, would be squashed a second time. Dropout
    passes its input through at inference, and so does a linear activation,
    so the check looks past both.
    """
    node = by_name[logits]
    while node.op == "dropout" or _is_linear_activation(node):
        node = by_name[node.inputs[0]]
    if node.op == "activation":
        function = node.params["function"]
        raise ConversionError(
            f"the student's output '{layer_name}' gives {function} values "
            f"(layer '{node.layer}'), not logits, and the converter adds its own "
            f"softmax after them; end the output in a layer without activation, "
            "optionally followed by softmax as the very last layer, and put any "
            "Dropout before the last Dense layer"
        )


def _check_class_count(layer_name: str, class_count: int) -> None:
    if MIN_CLASSES <= class_count <= MAX_CLASSES:
        return
    fix = "reduce the number of classes"
    if class_count < MIN_CLASSES:
        fix = (
            "for a yes/no task end the output in Dense(2), optionally with "
            "softmax, in place of one unit"
        )
    classes = "1 class" if class_count == 1 else f"{class_count} classes"
    raise ConversionError(
        f"the student's output '{layer_name}' has {classes}, but "
        f"updates carry labels of {MIN_CLASSES} to {MAX_CLASSES} classes; {fix}"
    )


def _is_linear_activation(node: GraphNode) -> bool:
    return node.op == "activation" and node.params["function"] == "linear"


def _check_lengths(names: list[str]) -> None:
    """Reject head names that format version 3 payloads cannot carry."""
    for name in names:
        size = len(name.encode("utf-8"))
        if size > MAX_HEAD_NAME_BYTES:
            raise ConversionError(
                f"the student's output layer {name[:40]!r}... gives a head name "
                f"of {size} bytes, but updates carry head names of at most "
                f"{MAX_HEAD_NAME_BYTES} bytes; rename the output layer"
            )


def _repeated(names: list[str]) -> list[str]:
    """Return the names that occur more than once, sorted."""
    return sorted({name for name in names if names.count(name) > 1})


def _check_distinct_layers(layer_names: list[str]) -> None:
    repeated = _repeated(layer_names)
    if repeated:
        raise ConversionError(
            f"the student's outputs {layer_names} give the output of layer "
            f"{', '.join(repeated)} more than once; list each output layer once, "
            "or add a layer per head after it"
        )


def _check_unique(names: list[str]) -> None:
    repeated = _repeated(names)
    if repeated:
        raise ConversionError(
            f"the student's output layers give the head names {names}, in "
            f"which {', '.join(repeated)} occurs more than once; rename the "
            "output layers so that their names differ in letters or digits"
        )


# Layers whose output at inference has the values of their input, perhaps in
# another shape, so an output of one of them has the values of the layer
# before it. LiteRT runs Reshape and Flatten as a RESHAPE op, which the hub
# also looks through when it reads a teacher output's kind from its op.
_INFERENCE_IDENTITY_LAYERS = frozenset(
    {
        "ActivityRegularization",
        "AlphaDropout",
        "Dropout",
        "Flatten",
        "GaussianDropout",
        "GaussianNoise",
        "Identity",
        "Reshape",
        "SpatialDropout1D",
        "SpatialDropout2D",
        "SpatialDropout3D",
    }
)
# TensorFlow's functions carry a version in their names: tf.nn.softmax is
# softmax_v2 and tf.nn.log_softmax is log_softmax_v2 (TensorFlow 2.21). They
# compute what Keras's softmax and log_softmax do.
ACTIVATION_ALIASES = {"softmax_v2": "softmax", "log_softmax_v2": "log_softmax"}


def output_kinds(model: Any) -> dict[str, str]:
    """Return "probabilities" or "logits" for each output of a Keras model.

    An output counts as probabilities when it comes from a ``Softmax`` layer
    or a softmax activation, also behind layers such as Dropout that pass
    values through at inference. The keys are head names.
    """
    return {
        head_name(tensor._keras_history.operation.name): _layer_output_kind(
            _output_source(tensor)
        )
        for tensor in model.outputs
    }


def check_output_activations(model: Any, role: str) -> None:
    """Reject outputs that are neither logits nor softmax probabilities.

    The hub sends each output as logits or probabilities, so a sigmoid or
    ReLU output would reach the device as something it is not. A log_softmax
    output passes as logits, because softmax(log_softmax(z)) = softmax(z).
    Layers such as Dropout, which pass values through at inference, are
    looked past. Outputs of other layers without an ``activation``
    attribute, such as ``Softmax``, pass.

    Raises:
        ConversionError: an output comes from another activation.
    """
    for tensor in model.outputs:
        output_layer = tensor._keras_history.operation
        layer = _output_source(tensor)
        name = _activation_name(layer)
        if name in ("linear", "softmax", "log_softmax"):
            continue
        if layer is output_layer:
            problem = f"output layer '{layer.name}' applies {name}"
        else:
            problem = (
                f"output layer '{output_layer.name}' passes on the values of "
                f"layer '{layer.name}', which applies {name}"
            )
        raise ConversionError(
            f"the {role}'s {problem}, so its outputs are neither logits nor "
            "softmax probabilities; end each output in a layer without "
            "activation or with softmax"
        )


def _output_source(tensor: Any) -> Any:
    """Return the layer whose values an output tensor has.

    That is the output's own layer, unless it passes values through at
    inference (Dropout, or an ``Activation`` layer with a linear function).
    Then it is the first layer before it that does not.
    """
    history = tensor._keras_history
    layer = history.operation
    while _passes_values_through(layer):
        inputs = layer._inbound_nodes[history.node_index].input_tensors
        if len(inputs) != 1:
            break
        history = inputs[0]._keras_history
        layer = history.operation
    return layer


def _passes_values_through(layer: Any) -> bool:
    kind = type(layer).__name__
    if kind in _INFERENCE_IDENTITY_LAYERS:
        return True
    return kind == "Activation" and _activation_name(layer) == "linear"


def _activation_name(layer: Any) -> str:
    """Return the name of a layer's activation, "linear" when it has none."""
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", "linear")
    return ACTIVATION_ALIASES.get(name, name)


def _layer_output_kind(layer: Any) -> str:
    softmax = type(layer).__name__ == "Softmax" or _activation_name(layer) == "softmax"
    return "probabilities" if softmax else "logits"


def check_teacher_heads(teacher: Any, heads: list[OutputHead]) -> None:
    """Check that a teacher has one output per student head.

    The teacher must have exactly the student's head names, which come from
    its output layer names sanitised the same way. Each head needs the same
    class count, but the outputs may come in any order.

    Raises:
        ConversionError: two teacher outputs give the same head name, or a
            head is missing, extra or has another class count.
    """
    layer_names = output_layer_names(teacher)
    names = [head_name(layer_name) for layer_name in layer_names]
    repeated = _repeated(names)
    if repeated:
        raise ConversionError(
            f"the teacher's output layers {layer_names} give the head names "
            f"{names}, in which {', '.join(repeated)} occurs more than once; "
            "rename the teacher's output layers to the student's output layer names"
        )
    teacher_classes = {
        name: int(tensor.shape[-1])
        for name, tensor in zip(names, teacher.outputs, strict=True)
    }
    student_classes = {head.name: head.class_count for head in heads}
    if teacher_classes != student_classes:
        raise ConversionError(
            f"teacher outputs (head name: classes) {teacher_classes} differ from "
            f"the student heads {student_classes}; give the teacher one output "
            "per student head, with the same output layer name and class count"
        )


def manifest_heads(
    heads: list[OutputHead], teacher_kinds: dict[str, str]
) -> list[dict[str, Any]]:
    """Describe each head for the bundle manifest, in student output order."""
    return [
        {
            "name": head.name,
            "class_count": head.class_count,
            "output_kind": head.output_kind,
            "teacher_output_kind": teacher_kinds[head.name],
        }
        for head in heads
    ]
