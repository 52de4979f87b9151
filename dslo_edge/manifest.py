"""JSON type checks for the manifest.json keys that dslo-edge reads.

``load_bundle`` runs them once, so the daemon, ``inspect``, ``flash`` and
``ota-send`` can index the manifest later without guarding against a
hand-edited or damaged file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dslo_edge.errors import BundleError

CONVERT_HINT = "convert the models again with 'dslo-edge convert'"
FILE_ROLES = ("student", "teacher", "student_int8")
MAX_SHOWN_VALUE_CHARS = 40
_MISSING = object()


def _is_integer(value: Any) -> bool:
    # JSON true and false load as bool, which is a subclass of int.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class JsonKind:
    """An expected JSON type: its description for messages and its test."""

    description: str
    accepts: Callable[[Any], bool]


OBJECT = JsonKind("an object", lambda value: isinstance(value, dict))
ARRAY = JsonKind("an array", lambda value: isinstance(value, list))
STRING = JsonKind("a string", lambda value: isinstance(value, str))
NON_NEGATIVE = JsonKind(
    "an integer of at least 0", lambda value: _is_integer(value) and value >= 0
)
POSITIVE = JsonKind(
    "an integer of at least 1", lambda value: _is_integer(value) and value >= 1
)

# Update payloads carry 2 to 65535 classes per head (a uint16 count). A
# softmax over one class is always 1, so a head of one class would never train.
MIN_CLASSES = 2
MAX_CLASSES = 0xFFFF
CLASS_COUNT = JsonKind(
    f"an integer from {MIN_CLASSES} to {MAX_CLASSES}",
    lambda value: _is_integer(value) and MIN_CLASSES <= value <= MAX_CLASSES,
)

# An update marks its labels as logits or else as probabilities, so any other
# kind would send a logits teacher's labels marked as probabilities.
OUTPUT_KIND = JsonKind(
    '"probabilities" or "logits"', lambda value: value in ("probabilities", "logits")
)

# A model file must sit in the bundle directory itself, because flash and
# ota-send copy only that directory's files.
FILE_NAME = JsonKind(
    "a file name in the bundle directory, without '/'",
    lambda value: (
        isinstance(value, str)
        and "/" not in value
        and "\0" not in value
        and value not in ("", ".", "..")
    ),
)


def json_type_name(value: Any) -> str:
    """Return the JSON name of a loaded value's type, with an article."""
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    names = {dict: "an object", list: "an array", str: "a string", int: "an integer"}
    return names.get(type(value), "a number")


def describe_value(value: Any) -> str:
    """Return a value as short JSON text followed by its JSON type."""
    text = json.dumps(value)
    if len(text) > MAX_SHOWN_VALUE_CHARS:
        text = text[: MAX_SHOWN_VALUE_CHARS - 3] + "..."
    return f"{text} ({json_type_name(value)})"


def check_top_level(manifest: Any, path: Path) -> dict[str, Any]:
    """Return the manifest if it is a JSON object, else raise BundleError."""
    if not isinstance(manifest, dict):
        raise BundleError(
            f"{path} contains {describe_value(manifest)}; expected an object "
            f"with the keys format_version, input, student and teacher; {CONVERT_HINT}"
        )
    return manifest


def check_manifest_keys(manifest: dict[str, Any], path: Path) -> None:
    """Check the type of every manifest key that dslo-edge reads.

    Raises:
        BundleError: a required key is missing or has the wrong JSON type.
            The message names the file, the key and the expected type.
    """
    _typed(path, manifest, "created_by", STRING, optional=True)
    _check_input(path, manifest)
    _check_classes(path, manifest)
    _check_runtime(path, manifest)
    for role in FILE_ROLES:
        _check_file_entry(path, manifest, role, optional=role == "student_int8")
    _check_weights(path, manifest["student"])
    teacher = manifest["teacher"]
    _typed(
        path, teacher, "output_kind", OUTPUT_KIND, "teacher.output_kind", optional=True
    )
    _typed(path, teacher, "output_kinds", OBJECT, "teacher.output_kinds", optional=True)


def _typed(
    path: Path,
    table: dict[str, Any],
    key: str,
    kind: JsonKind,
    key_path: str | None = None,
    *,
    optional: bool = False,
) -> Any:
    """Return ``table[key]`` after checking its JSON type.

    Args:
        key_path: the dotted key from the manifest's top, for the message;
            ``key`` when the table is the manifest itself.
        optional: return None for a missing key instead of raising.
    """
    name = key_path or key
    value = table.get(key, _MISSING)
    if value is _MISSING:
        if optional:
            return None
        raise BundleError(
            f"{path}: key {name} is missing; expected {kind.description}; "
            f"{CONVERT_HINT}"
        )
    if not kind.accepts(value):
        raise BundleError(
            f"{path}: key {name} is {describe_value(value)}; expected "
            f"{kind.description}; {CONVERT_HINT}"
        )
    return value


def _check_items(
    path: Path, items: list[Any], key_path: str, kind: JsonKind, start: int = 0
) -> None:
    """Check ``items[start:]``, naming a bad item by its index in ``items``."""
    for index, item in enumerate(items[start:], start=start):
        if not kind.accepts(item):
            raise BundleError(
                f"{path}: key {key_path}[{index}] is {describe_value(item)}; "
                f"expected {kind.description}; {CONVERT_HINT}"
            )


def _check_input(path: Path, manifest: dict[str, Any]) -> None:
    table = _typed(path, manifest, "input", OBJECT)
    shape = _typed(path, table, "shape", ARRAY, "input.shape")
    # A shape of only the batch dimension is rejected here, so the error
    # names the key instead of a later check failing on probe.npz.
    if len(shape) < 2:
        raise BundleError(
            f"{path}: key input.shape is {json.dumps(shape)}; expected the batch "
            "dimension followed by at least one sample dimension, such as "
            f"[null, 64]; {CONVERT_HINT}"
        )
    # The first entry is the batch dimension (null in converted bundles),
    # which dslo-edge does not read.
    _check_items(path, shape, "input.shape", POSITIVE, start=1)
    # The daemon decodes the inputs of every update to float32, the only input
    # type the converter writes.
    dtype = _typed(path, table, "dtype", STRING, "input.dtype", optional=True)
    if dtype not in (None, "float32"):
        raise BundleError(
            f"{path}: key input.dtype is {describe_value(dtype)}; expected "
            f'"float32", the input type of dslo-edge updates; {CONVERT_HINT}'
        )


def _check_classes(path: Path, manifest: dict[str, Any]) -> None:
    """Check class_count for a single-head student or heads for several."""
    if "class_count" in manifest or "heads" not in manifest:
        _typed(path, manifest, "class_count", CLASS_COUNT)
        return
    heads = _typed(path, manifest, "heads", ARRAY)
    _check_items(path, heads, "heads", OBJECT)
    for index, head in enumerate(heads):
        prefix = f"heads[{index}]"
        _typed(path, head, "name", STRING, f"{prefix}.name")
        _typed(path, head, "class_count", CLASS_COUNT, f"{prefix}.class_count")
        _typed(
            path,
            head,
            "teacher_output_kind",
            OUTPUT_KIND,
            f"{prefix}.teacher_output_kind",
        )


def _check_runtime(path: Path, manifest: dict[str, Any]) -> None:
    runtime = _typed(path, manifest, "runtime", OBJECT, optional=True)
    if runtime is None:
        return
    names = _typed(
        path, runtime, "interpreters", ARRAY, "runtime.interpreters", optional=True
    )
    if names is not None:
        _check_items(path, names, "runtime.interpreters", STRING)


def _check_file_entry(
    path: Path, manifest: dict[str, Any], role: str, optional: bool
) -> None:
    entry = _typed(path, manifest, role, OBJECT, optional=optional)
    if entry is None:
        return
    _typed(path, entry, "file", FILE_NAME, f"{role}.file")
    _typed(path, entry, "sha256", STRING, f"{role}.sha256")
    _typed(path, entry, "bytes", NON_NEGATIVE, f"{role}.bytes")
    _typed(path, entry, "precision", STRING, f"{role}.precision", optional=True)
    _check_signatures(path, entry, role)
    _check_variables(path, entry, role)
    _typed(path, entry, "trainable", OBJECT, f"{role}.trainable", optional=True)
    optimizer = _typed(
        path, entry, "optimizer", OBJECT, f"{role}.optimizer", optional=True
    )
    if optimizer is not None:
        _typed(path, optimizer, "name", STRING, f"{role}.optimizer.name")


def _check_signatures(path: Path, entry: dict[str, Any], role: str) -> None:
    # A student without signatures gets its own message from the loader.
    signatures = _typed(
        path, entry, "signatures", OBJECT, f"{role}.signatures", optional=True
    )
    for name in signatures or {}:
        key_path = f"{role}.signatures.{name}"
        signature = _typed(path, signatures, name, OBJECT, key_path)
        ops = _typed(path, signature, "ops", ARRAY, f"{key_path}.ops", optional=True)
        _check_items(path, ops or [], f"{key_path}.ops", STRING)


def _check_variables(path: Path, entry: dict[str, Any], role: str) -> None:
    variables = _typed(
        path, entry, "variables", OBJECT, f"{role}.variables", optional=True
    )
    for name in variables or {}:
        key_path = f"{role}.variables.{name}"
        variable = _typed(path, variables, name, OBJECT, key_path)
        _typed(path, variable, "kind", STRING, f"{key_path}.kind")
        _typed(path, variable, "bytes", NON_NEGATIVE, f"{key_path}.bytes")
        shape = _typed(path, variable, "shape", ARRAY, f"{key_path}.shape")
        _check_items(path, shape, f"{key_path}.shape", NON_NEGATIVE)


def _check_weights(path: Path, student: dict[str, Any]) -> None:
    weights = _typed(path, student, "weights", OBJECT, "student.weights")
    for name in weights:
        key_path = f"student.weights.{name}"
        shape = _typed(path, weights, name, ARRAY, key_path)
        _check_items(path, shape, key_path, NON_NEGATIVE)
