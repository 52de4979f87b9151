"""Checks of a push's teacher files and options against the bundle's student.

``dslo-edge push`` runs them before it connects, so a teacher of another
model or an impossible ``--top-k`` fails with one line instead of an
interpreter error after some updates were sent.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dslo_edge.bundle import Bundle
from dslo_edge.errors import BundleError, ConfigError
from dslo_edge.modelfile import output_producers
from dslo_edge.runtime import load_interpreter

TEACHER_SIGNATURE = "infer"


def expected_teacher_outputs(bundle: Bundle) -> dict[str, int]:
    """Return the teacher output tensor names and their class counts."""
    if bundle.is_multi_head:
        return {f"output_{name}": count for name, count in bundle.heads.items()}
    return {"output": bundle.class_count}


@dataclass(frozen=True)
class TeacherSignature:
    """Input shape of one sample and class count per output of a teacher file."""

    input_shape: tuple[int, ...]
    class_counts: dict[str, int]


def read_teacher_signature(
    path: Path, source: str, output_names: Iterable[str], runtime: str = "auto"
) -> TeacherSignature:
    """Read the input and output shapes of a teacher's ``infer`` signature.

    Args:
        source: how the file was given, such as ``--teacher t1.tflite``.
        output_names: the output tensors the teacher must have.

    Raises:
        ConfigError: the file cannot be loaded or lacks the signature, its
            input ``x`` or one of ``output_names``.
    """
    try:
        interpreter = load_interpreter(path, preference=runtime)
    except BundleError as error:
        raise ConfigError(f"{source}: {error}; {_teacher_file_hint(path)}") from error
    return teacher_signature_of(interpreter, source, output_names)


def _teacher_file_hint(path: Path) -> str:
    """Return what a teacher file must be, naming the Keras file mistake."""
    if _is_keras_file(path):
        return (
            "it is a Keras model file, which the hub cannot run; convert the "
            "teacher with 'dslo-edge convert' and pass the teacher.tflite that it "
            "writes into the bundle"
        )
    return (
        "expected a .tflite teacher that 'dslo-edge convert' wrote, such as "
        "teacher.tflite in a bundle"
    )


def _is_keras_file(path: Path) -> bool:
    """Check for a Keras 3 .keras file: a zip archive with config.json."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "config.json" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def teacher_signature_of(
    interpreter: Any, source: str, output_names: Iterable[str]
) -> TeacherSignature:
    """Read the shapes of a loaded teacher's ``infer`` signature.

    Raises:
        ConfigError: as ``read_teacher_signature``, for a missing signature,
            input ``x`` or output.
    """
    expected = list(output_names)
    signatures = interpreter.get_signature_list()
    signature = signatures.get(TEACHER_SIGNATURE)
    outputs = set(signature["outputs"]) if signature else set()
    if signature is None or "x" not in signature["inputs"] or set(expected) - outputs:
        if signature is None:
            found = f"its signatures: {', '.join(sorted(signatures)) or 'none'}"
        else:
            found = (
                f"its '{TEACHER_SIGNATURE}' signature has inputs "
                f"{', '.join(map(repr, signature['inputs']))} and outputs "
                f"{', '.join(map(repr, sorted(outputs)))}"
            )
        raise ConfigError(
            f"{source} has no matching teacher signature: expected an "
            f"'{TEACHER_SIGNATURE}' signature with input 'x' and outputs "
            f"{', '.join(map(repr, expected))} ({found}); "
            f"{_signature_fix(expected, outputs)}"
        )
    runner = interpreter.get_signature_runner(TEACHER_SIGNATURE)
    input_shape = runner.get_input_details()["x"]["shape"][1:]
    details = runner.get_output_details()
    return TeacherSignature(
        tuple(int(d) for d in input_shape),
        {name: int(details[name]["shape"][-1]) for name in expected},
    )


def _signature_fix(expected: list[str], outputs: set[str]) -> str:
    """Say how to fix a teacher whose outputs differ from ``expected``."""
    heads = sorted(name.removeprefix("output_") for name in outputs)
    several_heads = bool(outputs) and all(n.startswith("output_") for n in outputs)
    if expected == ["output"] and several_heads:
        # Only a bundle's manifest names the heads' output kinds, so such a
        # teacher file needs the bundle of its student.
        return (
            f"this is the teacher of a student with several heads "
            f"({', '.join(heads)}), which works only with the manifest of "
            "that student's bundle: name the bundle directory as the hub's "
            "teacher.path, or as --bundle of 'dslo-edge push'"
        )
    return "pass a teacher file that 'dslo-edge convert' wrote for this model"


def expected_output_kinds(bundle: Bundle) -> dict[str, str]:
    """Return the teacher output kind per output tensor name, from the manifest."""
    if not bundle.is_multi_head:
        return {"output": bundle.teacher_output_kind}
    from dslo_edge.hub_multihead import head_output_kinds

    kinds = head_output_kinds(bundle.manifest)
    return {f"output_{name}": kind for name, kind in kinds.items()}


def check_output_kinds(
    model: bytes,
    kinds: dict[str, str],
    source: str,
    kind_source: str,
    *,
    kind_is_setting: bool = False,
) -> None:
    """Check that a teacher's outputs are of the kinds the labels will be marked.

    The converter records an output as probabilities when its Keras layer
    ends in softmax, which LiteRT runs as a SOFTMAX op, and as logits
    otherwise. A teacher file of the other kind would make the hub send
    probabilities marked as logits, or the reverse, with no error.

    Args:
        model: the teacher's ``.tflite`` bytes.
        kinds: the expected kind per output name, such as
            ``{"output": "logits"}``.
        source: how the file was given, such as ``--teacher t1.tflite``.
        kind_source: where the expected kinds come from, such as
            ``teacher.output_kind``.
        kind_is_setting: ``kind_source`` is a setting the user may change,
            so the error suggests setting it to the kind the file outputs.

    Raises:
        ConfigError: an output's op contradicts its expected kind.
    """
    try:
        producers = output_producers(model, TEACHER_SIGNATURE)
    except BundleError:
        # NOTE: without ai-edge-litert's schema bindings (tflite-runtime
        # only), or for a file the signature check rejects, nothing is checked.
        return
    for name, expected in kinds.items():
        op = producers.get(name)
        if op is None:
            continue
        found = "probabilities" if op == "SOFTMAX" else "logits"
        if found == expected:
            continue
        fix = f"use a teacher whose last Keras layer {_last_layer(expected)}"
        if kind_is_setting:
            fix = f"set {kind_source} = {found!r} if this file is the teacher, or {fix}"
        raise ConfigError(
            f"{source} computes its '{name}' output with a {op or 'constant'} op, "
            f"so it outputs {found}, but {kind_source} is {expected!r}, so the "
            f"hub would mark its {found} as {expected}; {fix}"
        )


def _last_layer(kind: str) -> str:
    """Describe the last Keras layer of a teacher that outputs ``kind``."""
    if kind == "probabilities":
        return "ends in softmax"
    return "has no softmax"


def check_teacher(path: Path, bundle: Bundle, source: str) -> None:
    """Check that a teacher file takes the student's inputs and gives its classes.

    Args:
        source: how the file was given, such as ``--teacher t1.tflite``.

    Raises:
        ConfigError: the file has no matching teacher signature, its input
            shape or class counts differ from the student's, or an output
            is not of the kind in the bundle's manifest.
    """
    expected = expected_teacher_outputs(bundle)
    teacher = read_teacher_signature(path, source, expected)
    kinds = expected_output_kinds(bundle)
    check_output_kinds(path.read_bytes(), kinds, source, "the bundle's teacher kind")
    if teacher.input_shape != bundle.input_shape:
        raise ConfigError(
            f"{source} takes inputs of shape {teacher.input_shape}, but the "
            f"bundle's student takes {bundle.input_shape}; pass a teacher of this "
            "student"
        )
    for name, class_count in expected.items():
        if teacher.class_counts[name] != class_count:
            raise ConfigError(
                f"{source} gives {teacher.class_counts[name]} classes in '{name}', "
                f"but the bundle's student has {class_count}; pass a teacher of "
                "this student"
            )


def check_top_k(top_k: int | None, bundle: Bundle) -> None:
    """Check ``--top-k`` against the student's class counts.

    A multi-head student sends full labels for heads of k classes or fewer,
    so k must be below the class count of at least one head.

    Raises:
        ConfigError: k is not below the class count of a single-head student,
            or of any head of a multi-head student.
    """
    if top_k is None:
        return
    if bundle.is_multi_head:
        _check_head_top_k(top_k, bundle.heads)
        return
    if top_k >= bundle.class_count:
        raise ConfigError(
            f"--top-k is {top_k}, but the bundle's student has "
            f"{bundle.class_count} classes; expected 1 to {bundle.class_count - 1}, "
            "or no --top-k to send every probability"
        )


def _check_head_top_k(top_k: int, heads: Mapping[str, int]) -> None:
    largest = max(heads.values())
    if top_k < largest:
        return
    counts = ", ".join(f"{name} {count}" for name, count in heads.items())
    raise ConfigError(
        f"--top-k is {top_k}, but no head of the bundle's student has more than "
        f"{top_k} classes ({counts}), so every head would get full labels; "
        f"expected 1 to {largest - 1}, or no --top-k to send every probability"
    )
