"""Convert a Keras teacher and student into a dslo-edge bundle directory.

A bundle holds ``student.tflite`` (infer, train, get_weights, set_weights),
``teacher.tflite`` (infer) and ``manifest.json``. Every file is built from
LiteRT builtin ops only, so it runs on the plain pip interpreters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from converters.layers import read_student
from converters.optimizers import OptimizerConfig
from converters.student_graph import StudentModule
from converters.trainable import TrainableScope
from dslo_edge import __version__
from dslo_edge.bundle import FORMAT_VERSION, MANIFEST_NAME, sha256_file
from dslo_edge.errors import ConversionError
from dslo_edge.modelfile import flex_ops, signature_ops

_FLEX_OP_PATTERN = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
RUNTIMES = ["ai-edge-litert>=2.0", "tflite-runtime>=2.14"]


def load_keras_model(model: Any) -> Any:
    """Return a Keras model, loading it first when given a path."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    path = Path(model)
    if not path.is_file():
        raise ConversionError(f"model file not found: {path}")
    try:
        return tf.keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many unrelated types here
        raise ConversionError(
            f"cannot load Keras model {path}: {error}; "
            "expected a .keras file written by model.save()"
        ) from error


def _check_single_chain(model: Any, role: str) -> None:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConversionError(
            f"the {role} has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; expected exactly one of each"
        )


def _to_tflite(module: tf.Module, signatures: dict[str, Any], role: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="dslo-convert-") as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=list(signatures)
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        try:
            return bytes(converter.convert())
        except Exception as error:
            ops = sorted(set(_FLEX_OP_PATTERN.findall(str(error))))
            if ops:
                raise ConversionError(
                    f"the {role} needs TensorFlow ops that LiteRT runs only with "
                    f"Flex: {', '.join(ops)}; remove or replace the layers that "
                    "use them, since device interpreters have no Flex support"
                ) from error
            raise ConversionError(
                f"LiteRT conversion of the {role} failed: {error}"
            ) from error


class _TeacherModule(tf.Module):
    def __init__(self, model: Any):
        super().__init__(name="teacher")
        self.model = model
        # Keras 3 variables are invisible to tf.Module tracking; holding the
        # backing tf.Variables makes the saved model (and LiteRT) keep them.
        self.tracked_variables = [variable.value for variable in model.weights]

    def signatures(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        def infer(x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"output": self.model(x, training=False)}

        spec = tf.TensorSpec([None, *input_shape], tf.float32, name="x")
        return {"infer": tf.function(infer).get_concrete_function(spec)}


def _output_kind(model: Any) -> str:
    activation = getattr(model.layers[-1], "activation", None)
    return (
        "probabilities"
        if getattr(activation, "__name__", "") == "softmax"
        else "logits"
    )


def _signature_details(model: bytes) -> dict[str, Any]:
    from dslo_edge.runtime import load_interpreter

    interpreter = load_interpreter(model_content=model)
    details: dict[str, Any] = {}
    for key in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(key)
        details[key] = {
            "inputs": _tensor_specs(runner.get_input_details()),
            "outputs": _tensor_specs(runner.get_output_details()),
        }
    return details


def _tensor_specs(tensors: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "shape": [int(d) for d in detail["shape_signature"]],
            "dtype": np.dtype(detail["dtype"]).name,
        }
        for name, detail in sorted(tensors.items())
    }


def _file_entry(path: Path, model: bytes, role: str) -> dict[str, Any]:
    ops = signature_ops(model)
    flex = flex_ops(ops)
    if flex:
        raise ConversionError(
            f"the {role} model still contains Flex ops {', '.join(flex)}; "
            "it would not run on device interpreters"
        )
    signatures = _signature_details(model)
    for key, names in ops.items():
        signatures[key]["ops"] = names
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "precision": "float32",
        "signatures": signatures,
    }


def convert_bundle(
    teacher: Any,
    student: Any,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    optimizer: OptimizerConfig | None = None,
    trainable: TrainableScope | None = None,
) -> dict[str, Any]:
    """Convert a Keras teacher and student into a bundle directory.

    Args:
        teacher: Keras model or path to a ``.keras`` file; any layers that
            LiteRT can run for inference.
        student: Keras model or path; a chain of Dense and activation layers.
        out_dir: directory to create. It must not exist unless ``overwrite``.
        overwrite: replace an existing bundle directory.

    Returns:
        The manifest written to ``out_dir/manifest.json``.

    Raises:
        ConversionError: unsupported layers, mismatched shapes, Flex ops, or
            an existing output directory.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(
            f"output directory {out} exists and is not empty; "
            "choose another path or pass overwrite=True (--overwrite)"
        )
    teacher_model = load_keras_model(teacher)
    student_model = load_keras_model(student)
    _check_single_chain(teacher_model, "teacher")
    _check_single_chain(student_model, "student")
    input_shape = tuple(int(d) for d in student_model.input_shape[1:])
    teacher_shape = tuple(int(d) for d in teacher_model.input_shape[1:])
    if teacher_shape != input_shape:
        raise ConversionError(
            f"teacher input shape {teacher_shape} differs from student input "
            f"shape {input_shape}; both must read the same samples"
        )
    graph = read_student(student_model)
    student_module = StudentModule(graph, optimizer=optimizer, scope=trainable)
    class_count = student_module.class_count
    teacher_classes = int(teacher_model.output_shape[-1])
    if teacher_classes != class_count:
        raise ConversionError(
            f"teacher has {teacher_classes} classes but the student has "
            f"{class_count}; they must match"
        )

    student_bytes = _to_tflite(student_module, student_module.signatures(), "student")
    teacher_module = _TeacherModule(teacher_model)
    teacher_bytes = _to_tflite(
        teacher_module, teacher_module.signatures(input_shape), "teacher"
    )

    staging = Path(
        tempfile.mkdtemp(
            prefix=".bundle-", dir=out.parent if out.parent.exists() else None
        )
    )
    try:
        (staging / "student.tflite").write_bytes(student_bytes)
        (staging / "teacher.tflite").write_bytes(teacher_bytes)
        manifest = _manifest(
            staging, student_bytes, teacher_bytes, student_module, input_shape
        )
        manifest["teacher"]["output_kind"] = _output_kind(teacher_model)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def _manifest(
    folder: Path,
    student_bytes: bytes,
    teacher_bytes: bytes,
    module: StudentModule,
    input_shape: tuple[int, ...],
) -> dict[str, Any]:
    student = _file_entry(folder / "student.tflite", student_bytes, "student")
    student["weights"] = {
        name: list(variable.shape)
        for name, variable in zip(
            module.weight_names, module.variables_list, strict=True
        )
    }
    student["optimizer"] = "sgd"
    return {
        "format_version": FORMAT_VERSION,
        "created_by": f"dslo-edge {__version__}",
        "runtime": {"interpreters": RUNTIMES, "flex": False},
        "input": {"shape": [None, *input_shape], "dtype": "float32"},
        "class_count": module.class_count,
        "student": student,
        "teacher": _file_entry(folder / "teacher.tflite", teacher_bytes, "teacher"),
    }


def convert_teacher(teacher: Any, path: str | os.PathLike[str]) -> Path:
    """Write an inference-only ``.tflite`` of a teacher snapshot (one hub round)."""
    model = load_keras_model(teacher)
    _check_single_chain(model, "teacher")
    input_shape = tuple(int(d) for d in model.input_shape[1:])
    module = _TeacherModule(model)
    data = _to_tflite(module, module.signatures(input_shape), "teacher")
    target = Path(path)
    target.write_bytes(data)
    return target
