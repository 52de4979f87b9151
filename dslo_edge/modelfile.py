"""Read op lists, op counts and tensor sizes from a ``.tflite`` flatbuffer.

Uses the flatbuffer schema bindings that ship with ``ai-edge-litert``; the
older ``tflite-runtime`` wheels do not include them, so on such devices the op
lists come from the bundle manifest instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dslo_edge.errors import BundleError

FLEX_PREFIX = "Flex"


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as error:
        raise BundleError(
            "reading op lists needs the ai-edge-litert package; "
            "install it with: pip install ai-edge-litert"
        ) from error
    return schema_py_generated


def signature_ops(model: bytes) -> dict[str, list[str]]:
    """Return the sorted op names used by each signature of a model.

    Custom ops are listed by their custom code, so a Flex op appears as, for
    example, ``FlexReluGrad``.

    Raises:
        BundleError: the bytes are not a readable ``.tflite`` model.
    """
    schema = _schema()
    parsed = _parse(schema, model)
    op_name = _op_namer(schema, parsed)

    ops: dict[str, list[str]] = {}
    for signature in parsed.signatureDefs or []:
        subgraph = parsed.subgraphs[signature.subgraphIndex]
        names = {op_name(op.opcodeIndex) for op in subgraph.operators or []}
        ops[signature.signatureKey.decode()] = sorted(names)
    return ops


def flex_ops(ops: dict[str, list[str]]) -> list[str]:
    """Return the Flex (TensorFlow Select) ops among signature op lists."""
    return sorted(
        {
            name
            for names in ops.values()
            for name in names
            if name.startswith(FLEX_PREFIX)
        }
    )


# Ops that pass a tensor on with its meaning unchanged: an int8 model wraps
# its float output in DEQUANTIZE, and a reshape keeps the values.
_PASS_THROUGH_OPS = ("DEQUANTIZE", "QUANTIZE", "RESHAPE", "SQUEEZE", "CAST")


def output_producers(model: bytes, signature: str) -> dict[str, str]:
    """Return the op that computes each output of a signature.

    Pass-through ops such as DEQUANTIZE are skipped, so the int8 and float
    conversions of one Keras model give the same op. An output that no op
    computes, such as a constant, maps to "".

    Raises:
        BundleError: the bytes are not a readable ``.tflite`` model, the
            signature is missing, or ai-edge-litert is not installed.
    """
    schema = _schema()
    parsed = _parse(schema, model)
    # A damaged file can parse and still hold an index out of range, a
    # missing table or a name that is not UTF-8.
    try:
        return _signature_producers(parsed, _op_namer(schema, parsed), signature)
    except (IndexError, AttributeError, TypeError, ValueError) as error:
        raise BundleError(f"not a valid .tflite flatbuffer: {error}") from error


def _signature_producers(parsed: Any, op_name: Any, signature: str) -> dict[str, str]:
    found = [
        entry
        for entry in parsed.signatureDefs or []
        if entry.signatureKey.decode() == signature
    ]
    if not found:
        raise BundleError(f"the model has no '{signature}' signature")
    subgraph = parsed.subgraphs[found[0].subgraphIndex]
    producers = {
        int(tensor): op for op in subgraph.operators or [] for tensor in op.outputs
    }
    result = {}
    for output in found[0].outputs or []:
        op = producers.get(int(output.tensorIndex))
        name = op_name(op.opcodeIndex) if op is not None else ""
        # At most one step per operator, so a malformed cycle cannot loop.
        for _ in range(len(subgraph.operators or [])):
            if name not in _PASS_THROUGH_OPS or op is None or not len(op.inputs):
                break
            op = producers.get(int(op.inputs[0]))
            name = op_name(op.opcodeIndex) if op is not None else ""
        result[output.name.decode()] = name
    return result


_ITEM_SIZES = {
    "FLOAT32": 4,
    "FLOAT16": 2,
    "BFLOAT16": 2,
    "FLOAT64": 8,
    "INT64": 8,
    "UINT64": 8,
    "INT32": 4,
    "UINT32": 4,
    "INT16": 2,
    "UINT16": 2,
    "INT8": 1,
    "UINT8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class ModelSummary:
    """Op and tensor statistics of a ``.tflite`` model.

    Attributes:
        op_counts: per signature, how many operators of each type it runs.
        constant_bytes: bytes of constant data (weights, initial variable
            values, masks) by tensor type, e.g. ``{"FLOAT32": 1024}``.
        activation_bytes: per signature, the summed size of every
            non-constant tensor at the given batch size. LiteRT's arena
            planner reuses memory between tensors whose lifetimes do not
            overlap, so this is an upper bound on the arena.
        batch_size: the batch size used for ``activation_bytes``.
    """

    op_counts: dict[str, dict[str, int]]
    constant_bytes: dict[str, int]
    activation_bytes: dict[str, int]
    batch_size: int


def summarize_model(model: bytes, batch_size: int = 1) -> ModelSummary:
    """Count ops per signature and tensor bytes of a ``.tflite`` model.

    Args:
        model: the flatbuffer bytes.
        batch_size: value substituted for dynamic (-1) dimensions.

    Raises:
        BundleError: the bytes are not a readable ``.tflite`` model.
    """
    schema = _schema()
    parsed = _parse(schema, model)
    type_names = {
        value: name
        for name, value in vars(schema.TensorType).items()
        if not name.startswith("_")
    }
    op_name = _op_namer(schema, parsed)
    op_counts: dict[str, dict[str, int]] = {}
    activations: dict[str, int] = {}
    for signature in parsed.signatureDefs or []:
        key = signature.signatureKey.decode()
        subgraph = parsed.subgraphs[signature.subgraphIndex]
        counts: dict[str, int] = {}
        for op in subgraph.operators or []:
            name = op_name(op.opcodeIndex)
            counts[name] = counts.get(name, 0) + 1
        op_counts[key] = dict(sorted(counts.items()))
        activations[key] = sum(
            _tensor_bytes(tensor, type_names, batch_size)
            for tensor in subgraph.tensors or []
            if not _has_data(parsed, tensor)
        )
    return ModelSummary(
        op_counts, _constant_bytes(parsed, type_names), activations, batch_size
    )


def _parse(schema: Any, model: bytes) -> Any:
    try:
        return schema.ModelT.InitFromPackedBuf(model, 0)
    except Exception as error:  # the generated parser raises bare errors
        raise BundleError(f"not a valid .tflite flatbuffer: {error}") from error


def _op_namer(schema: Any, parsed: Any) -> Any:
    code_names = {
        value: name
        for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_")
    }

    def op_name(index: int) -> str:
        code = parsed.operatorCodes[index]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if code_names.get(builtin) == "CUSTOM":
            return str(code.customCode.decode())
        return code_names.get(builtin, f"BUILTIN_{builtin}")

    return op_name


def _has_data(parsed: Any, tensor: Any) -> bool:
    if not tensor.buffer:
        return False
    buffer = parsed.buffers[tensor.buffer]
    return buffer.data is not None and len(buffer.data) > 0


def _tensor_bytes(tensor: Any, type_names: dict[int, str], batch_size: int) -> int:
    shape = tensor.shapeSignature if tensor.shapeSignature is not None else tensor.shape
    count = 1
    for dim in shape if shape is not None else []:
        count *= batch_size if dim < 0 else int(dim)
    return count * _ITEM_SIZES.get(type_names.get(tensor.type, ""), 0)


def _constant_bytes(parsed: Any, type_names: dict[int, str]) -> dict[str, int]:
    seen: set[int] = set()
    totals: dict[str, int] = {}
    for subgraph in parsed.subgraphs or []:
        for tensor in subgraph.tensors or []:
            if tensor.buffer in seen or not _has_data(parsed, tensor):
                continue
            seen.add(tensor.buffer)
            kind = type_names.get(tensor.type, str(tensor.type))
            totals[kind] = totals.get(kind, 0) + len(parsed.buffers[tensor.buffer].data)
    return dict(sorted(totals.items()))
