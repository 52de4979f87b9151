"""Read a Keras student into a graph of ops the converter can lower.

Only layers whose forward pass and gradient can be written with LiteRT
builtin ops are accepted. Any other layer is rejected by name, with the list
of supported layers, before TensorFlow tries to convert it. Sequential models
and functional graphs (residual ``Add``, ``Concatenate``) are both read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from converters.graph import INPUT, GraphNode, StudentGraph
from converters.heads import ACTIVATION_ALIASES, read_heads
from dslo_edge.errors import ConversionError

ACTIVATIONS = (
    "linear",
    "relu",
    "relu6",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "silu",
    "hard_silu",
    "hard_sigmoid",
    "softmax",
)


LayerReader = Callable[[Any, list[str], tuple[int, ...]], list[GraphNode]]


def _weights(layer: Any) -> dict[str, np.ndarray]:
    return {
        variable.name: np.asarray(variable.numpy(), dtype=np.float32)
        for variable in layer.weights
    }


def _activation_nodes(
    layer: Any, main: str, shape: tuple[int, ...], name: str | None = None
) -> list[GraphNode]:
    activation = name or _activation_name(layer)
    if activation == "linear":
        return []
    params = _activation_params(activation)
    return [
        GraphNode(
            f"{layer.name}:activation", "activation", layer.name, [main], shape, params
        )
    ]


def _activation_params(activation: str) -> dict[str, Any]:
    params: dict[str, Any] = {"function": activation}
    if activation == "leaky_relu":
        params["negative_slope"] = 0.2  # keras.activations.leaky_relu default
    return params


def _activation_name(layer: Any) -> str:
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    name = ACTIVATION_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise ConversionError(
            f"layer '{layer.name}' uses activation '{name}', which the converter "
            f"has no builtin-op gradient for; use one of: {', '.join(ACTIVATIONS)}"
        )
    return name


def _check_config(layer: Any, **expected: Any) -> None:
    config = layer.get_config()
    for key, allowed in expected.items():
        value = config.get(key)
        if isinstance(value, list):
            value = tuple(value)
        if value != allowed:
            raise ConversionError(
                f"layer '{layer.name}' has {key}={value!r}; the converter "
                f"supports only {key}={allowed!r}"
            )


def _window_params(layer: Any, kernel: tuple[int, int]) -> dict[str, Any]:
    return {
        "kernel": tuple(int(k) for k in kernel),
        "strides": tuple(int(s) for s in layer.strides),
        "padding": layer.padding,
    }


def _read_dense(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    weights = _weights(layer)
    if len(shape) != 1:
        raise ConversionError(
            f"Dense layer '{layer.name}' outputs shape {shape}; the converter "
            "supports Dense only on (batch, features) inputs, so add a Flatten "
            "or GlobalAveragePooling2D before it"
        )
    node = GraphNode(layer.name, "dense", layer.name, inputs, shape, {}, weights)
    return [node, *_activation_nodes(layer, layer.name, shape)]


def _read_conv(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    _check_config(layer, data_format="channels_last", dilation_rate=(1, 1), groups=1)
    weights = _weights(layer)
    params = _window_params(layer, weights["kernel"].shape[:2])
    node = GraphNode(layer.name, "conv2d", layer.name, inputs, shape, params, weights)
    return [node, *_activation_nodes(layer, layer.name, shape)]


def _read_depthwise(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    _check_config(layer, data_format="channels_last", dilation_rate=(1, 1))
    weights = _weights(layer)
    params = _window_params(layer, weights["kernel"].shape[:2])
    _check_square_strides(layer, params["strides"])
    node = GraphNode(
        layer.name, "depthwise_conv2d", layer.name, inputs, shape, params, weights
    )
    return [node, *_activation_nodes(layer, layer.name, shape)]


def _check_square_strides(layer: Any, strides: tuple[int, int]) -> None:
    # tf.nn.depthwise_conv2d accepts only equal row and column strides.
    if strides[0] != strides[1]:
        raise ConversionError(
            f"layer '{layer.name}' has strides {strides}; depthwise convolutions "
            "support only equal strides along height and width"
        )


def _read_separable(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    _check_config(layer, data_format="channels_last", dilation_rate=(1, 1))
    weights = _weights(layer)
    depthwise = weights["depthwise_kernel"]
    params = _window_params(layer, depthwise.shape[:2])
    _check_square_strides(layer, params["strides"])
    middle = (*shape[:-1], int(depthwise.shape[2] * depthwise.shape[3]))
    depth_name = f"{layer.name}:depthwise"
    pointwise = {"kernel": (1, 1), "strides": (1, 1), "padding": "valid"}
    return [
        GraphNode(
            depth_name,
            "depthwise_conv2d",
            layer.name,
            inputs,
            middle,
            params,
            {"depthwise_kernel": depthwise},
        ),
        GraphNode(
            layer.name,
            "conv2d",
            layer.name,
            [depth_name],
            shape,
            pointwise,
            {"pointwise_kernel": weights["pointwise_kernel"], **_bias(weights)},
        ),
        *_activation_nodes(layer, layer.name, shape),
    ]


def _bias(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"bias": weights["bias"]} if "bias" in weights else {}


def _read_batch_norm(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
    if axis not in (-1, len(shape), (len(shape),), (-1,)):
        raise ConversionError(
            f"BatchNormalization '{layer.name}' normalises axis {axis}; the "
            "converter supports only the last (channels) axis"
        )
    if getattr(layer, "renorm", False):
        raise ConversionError(
            f"BatchNormalization '{layer.name}' uses renorm=True, which the "
            "converter does not support; set renorm=False"
        )
    params = {"epsilon": float(layer.epsilon), "momentum": float(layer.momentum)}
    weights = _weights(layer)
    return [
        GraphNode(layer.name, "batch_norm", layer.name, inputs, shape, params, weights)
    ]


def _read_activation(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    params = _activation_params(_activation_name(layer))
    return [GraphNode(layer.name, "activation", layer.name, inputs, shape, params)]


def _read_relu(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    config = layer.get_config()
    if config.get("threshold", 0.0):
        raise ConversionError(
            f"ReLU layer '{layer.name}' has threshold={config['threshold']}; "
            "only threshold=0 is supported"
        )
    max_value = config.get("max_value")
    params = {
        "function": "relu",
        "negative_slope": float(config.get("negative_slope") or 0.0),
        "max_value": None if max_value is None else float(max_value),
    }
    return [GraphNode(layer.name, "activation", layer.name, inputs, shape, params)]


def _read_leaky_relu(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    params = {
        "function": "leaky_relu",
        "negative_slope": float(layer.get_config()["negative_slope"]),
    }
    return [GraphNode(layer.name, "activation", layer.name, inputs, shape, params)]


def _read_softmax(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    axis = layer.get_config().get("axis", -1)
    if axis not in (-1, len(shape)):
        raise ConversionError(
            f"Softmax layer '{layer.name}' uses axis {axis}; only the last axis "
            "is supported"
        )
    params = {"function": "softmax"}
    return [GraphNode(layer.name, "activation", layer.name, inputs, shape, params)]


def _read_pool(op: str) -> LayerReader:
    def read(layer: Any, inputs: list[str], shape: tuple[int, ...]) -> list[GraphNode]:
        _check_config(layer, data_format="channels_last")
        params = _window_params(layer, layer.pool_size)
        return [GraphNode(layer.name, op, layer.name, inputs, shape, params)]

    return read


def _read_global_pool(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    _check_config(layer, data_format="channels_last")
    params = {"keepdims": bool(layer.keepdims)}
    return [GraphNode(layer.name, "global_avg_pool", layer.name, inputs, shape, params)]


def _read_reshape(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    return [GraphNode(layer.name, "reshape", layer.name, inputs, shape)]


def _read_flatten(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    # Keras moves the channels last before flattening channels_first inputs.
    if layer.data_format != "channels_last" and len(layer.input.shape) > 2:
        raise ConversionError(
            f"Flatten layer '{layer.name}' has data_format='{layer.data_format}'; "
            "the converter supports only data_format='channels_last', so build "
            "the student with channels-last (NHWC) inputs"
        )
    return _read_reshape(layer, inputs, shape)


def _read_add(layer: Any, inputs: list[str], shape: tuple[int, ...]) -> list[GraphNode]:
    return [GraphNode(layer.name, "add", layer.name, inputs, shape)]


def _read_concatenate(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    axis = int(layer.axis)
    axis = axis if axis >= 0 else len(shape) + 1 + axis
    if axis == 0:
        raise ConversionError(
            f"Concatenate layer '{layer.name}' joins along the batch axis; "
            "only feature axes are supported"
        )
    params = {"axis": axis}
    return [GraphNode(layer.name, "concatenate", layer.name, inputs, shape, params)]


def _read_dropout(
    layer: Any, inputs: list[str], shape: tuple[int, ...]
) -> list[GraphNode]:
    if layer.noise_shape is not None:
        raise ConversionError(
            f"Dropout layer '{layer.name}' sets noise_shape; only element-wise "
            "dropout (noise_shape=None) is supported"
        )
    params = {"rate": float(layer.rate)}
    return [GraphNode(layer.name, "dropout", layer.name, inputs, shape, params)]


READERS: dict[str, LayerReader] = {
    "Dense": _read_dense,
    "Conv2D": _read_conv,
    "DepthwiseConv2D": _read_depthwise,
    "SeparableConv2D": _read_separable,
    "BatchNormalization": _read_batch_norm,
    "Activation": _read_activation,
    "ReLU": _read_relu,
    "LeakyReLU": _read_leaky_relu,
    "Softmax": _read_softmax,
    "MaxPooling2D": _read_pool("max_pool"),
    "AveragePooling2D": _read_pool("avg_pool"),
    "GlobalAveragePooling2D": _read_global_pool,
    "Flatten": _read_flatten,
    "Reshape": _read_reshape,
    "Add": _read_add,
    "Concatenate": _read_concatenate,
    "Dropout": _read_dropout,
}
SUPPORTED_LAYERS = ("InputLayer", *READERS)


def _functional_graph(model: Any) -> Any:
    # Keras 3 Sequential models keep their functional graph in _functional.
    graph = getattr(model, "_functional", model)
    if graph is None or not hasattr(graph, "_nodes_by_depth"):
        raise ConversionError(
            f"model '{model.name}' is not built; build it with an Input "
            "(keras.Input(shape)) before converting"
        )
    return graph


def _unsupported(layer: Any) -> ConversionError:
    kind = type(layer).__name__
    return ConversionError(
        f"layer '{layer.name}' of type {kind} is not supported in a trainable "
        f"student; supported layers: {', '.join(SUPPORTED_LAYERS)}"
    )


WEIGHT_PARTS = frozenset(
    {
        "kernel",
        "bias",
        "depthwise_kernel",
        "pointwise_kernel",
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
    }
)
"""Weight names of the supported layers that the forward pass reads."""


def _check_weight_parts(layer: Any, nodes: list[GraphNode]) -> None:
    # LoRA (enable_lora) and Keras quantization (model.quantize) add weights
    # such as lora_kernel_a or kernel_scale, which the forward pass would skip.
    for node in nodes:
        unknown = sorted(set(node.weights) - WEIGHT_PARTS)
        if unknown:
            raise ConversionError(
                f"layer '{layer.name}' has the weights {', '.join(unknown)}, "
                "which the converter cannot train; LoRA (enable_lora) and "
                "quantized layers (model.quantize) are not supported, so save "
                "the student in float32 without them"
            )


def _check_no_penalties(layer: Any) -> None:
    # The train signature minimises the distillation loss alone and applies
    # no constraint after its optimizer step, so both would be lost.
    config = layer.get_config()
    for key in sorted(config):
        if not key.endswith(("_regularizer", "_constraint")) or config[key] is None:
            continue
        value = config[key]
        name = value.get("class_name", value) if isinstance(value, dict) else value
        hint = ""
        if key.endswith("_regularizer"):
            hint = ", and for weight decay on the device use --optimizer adamw"
        raise ConversionError(
            f"layer '{layer.name}' sets {key}={name}, which the train signature "
            f"does not apply; set {key}=None before saving the student{hint}"
        )


def read_student(model: Any) -> StudentGraph:
    """Turn a built Keras student (Sequential or functional) into a graph.

    Args:
        model: a Keras model with one input and one or more outputs; each
            output is a classification head ending in logits or softmax.

    Returns:
        The graph, in topological order.

    Raises:
        ConversionError: a layer or a layer setting is not supported, a layer
            has a regularizer or constraint, a layer is used twice, the
            input's dtype is not float32, or the model is not built.
    """
    graph = _functional_graph(model)
    nodes: list[GraphNode] = []
    outputs: dict[str, str] = {}
    order: list[str] = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for keras_node in graph._nodes_by_depth[depth]:
            layer = keras_node.operation
            kind = type(layer).__name__
            if layer.name in outputs:
                raise ConversionError(
                    f"layer '{layer.name}' is called more than once; shared "
                    "layers are not supported, so give each call its own layer"
                )
            if kind == "InputLayer":
                outputs[layer.name] = INPUT
                continue
            reader = READERS.get(kind)
            if reader is None:
                raise _unsupported(layer)
            _check_no_penalties(layer)
            inputs = [
                outputs[t._keras_history.operation.name]
                for t in keras_node.input_tensors
            ]
            shape = tuple(int(d) for d in keras_node.output_tensors[0].shape[1:])
            produced = reader(layer, inputs, shape)
            _check_weight_parts(layer, produced)
            for node in produced:
                node.params.setdefault("frozen", not layer.trainable)
            nodes.extend(produced)
            outputs[layer.name] = produced[-1].name
            order.append(layer.name)
    return _finish(model, graph, nodes, outputs, order)


def _finish(
    model: Any,
    graph: Any,
    nodes: list[GraphNode],
    outputs: dict[str, str],
    order: list[str],
) -> StudentGraph:
    if len(graph.inputs) != 1:
        raise ConversionError(
            f"the student has {len(graph.inputs)} inputs; expected exactly one"
        )
    _check_input_dtype(graph.inputs[0])
    heads = read_heads(graph, nodes, outputs)
    if not any(node.weights for node in nodes):
        raise ConversionError(
            "the student has no layer with weights, so there is nothing to train"
        )
    input_shape = tuple(int(d) for d in graph.inputs[0].shape[1:])
    first = heads[0]
    return StudentGraph(
        input_shape, nodes, first.logits, first.final_softmax, order, heads
    )


def _check_input_dtype(tensor: Any) -> None:
    # Keras casts each sample to the input's dtype before the first layer, so
    # an int32 input drops fractions that the float32 signatures would keep.
    dtype = str(tensor.dtype)
    if dtype != "float32":
        raise ConversionError(
            f"the student's input '{tensor.name}' has dtype {dtype}, expected "
            f"float32: Keras casts each sample to {dtype} before the first "
            "layer, and the bundle's float32 signatures would not. Build the "
            'student on keras.Input(shape, dtype="float32") and copy the '
            "weights with set_weights(old_student.get_weights())"
        )
