"""Read the op list of each signature from a ``.tflite`` flatbuffer.

Uses the flatbuffer schema bindings that ship with ``ai-edge-litert``; the
older ``tflite-runtime`` wheels do not include them, so on such devices the op
lists come from the bundle manifest instead.
"""

from __future__ import annotations

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
    try:
        parsed = schema.ModelT.InitFromPackedBuf(model, 0)
    except Exception as error:  # the generated parser raises bare errors
        raise BundleError(f"not a valid .tflite flatbuffer: {error}") from error
    code_names = {
        value: name
        for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_")
    }

    def op_name(index: int) -> str:
        code = parsed.operatorCodes[index]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if code_names.get(builtin) == "CUSTOM":
            return code.customCode.decode()
        return code_names.get(builtin, f"BUILTIN_{builtin}")

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
