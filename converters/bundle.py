"""Convert a Keras teacher and student into a dslo-edge bundle directory.

A bundle contains ``student.tflite`` (infer, train, get_weights, set_weights),
``teacher.tflite`` (infer), optionally ``student-int8.tflite`` (an
inference-only int8 copy of the student) and ``manifest.json``. Every file is
built from LiteRT builtin ops only, so it runs on the plain pip interpreters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from converters.export import InferenceModule, check_precision, to_tflite
from converters.heads import (
    check_output_activations,
    check_teacher_heads,
    manifest_heads,
    output_kinds,
)
from converters.layers import SUPPORTED_LAYERS, read_student
from converters.optimizers import OptimizerConfig
from converters.output_dir import (
    STUDENT_FILE,
    STUDENT_INT8_FILE,
    TEACHER_FILE,
    make_staging_dir,
    move_into_place,
    prepare_output_dir,
)
from converters.student_graph import StudentModule
from converters.trainable import TrainableScope
from dslo_edge import __version__
from dslo_edge.bundle import FORMAT_VERSION, MANIFEST_NAME, sha256_file
from dslo_edge.errors import ConversionError, RepresentativeDataError
from dslo_edge.modelfile import flex_ops, signature_ops, summarize_model

RUNTIMES = ["ai-edge-litert>=2.0", "tflite-runtime>=2.14"]


@dataclass(frozen=True)
class PrecisionOptions:
    """Precision of each bundle file.

    Attributes:
        student: "float32" or "float16" (float16 weight storage, float32
            training); "int8" is rejected because an int8 student cannot train.
        teacher: "float32", "float16" or "int8".
        int8_student_copy: also write an int8 inference-only student.
        representative_data: input samples (N, *input_shape) that calibrate
            int8 activation ranges; required for any int8 file.
    """

    student: str = "float32"
    teacher: str = "float32"
    int8_student_copy: bool = False
    representative_data: np.ndarray | None = None

    def check(self) -> None:
        """Raise ConversionError for an unsupported combination."""
        check_precision(self.student, "student", trainable=True)
        check_precision(self.teacher, "teacher", trainable=False)
        wants_int8 = self.teacher == "int8" or self.int8_student_copy
        if wants_int8 and self.representative_data is None:
            raise ConversionError(
                "int8 export needs a representative dataset to calibrate "
                "activation ranges; pass representative_data "
                "(--representative FILE.npz with an x array)"
            )


def load_keras_model(model: Any) -> Any:
    """Return a Keras model, loading it first when given a path."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    path = Path(model)
    if not path.is_file():
        raise ConversionError(f"model file not found: {path}")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        # Keras reports such a file as not found.
        raise ConversionError(
            f"cannot load Keras model {path}: the file is not a zip archive; "
            "expected a .keras file written by model.save()"
        )
    try:
        return tf.keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many unrelated types here
        if "safe_mode" in str(error):
            raise ConversionError(_unsafe_layer_message(path, error)) from error
        custom = _CUSTOM_CLASS_PATTERN.search(str(error))
        if custom:
            raise ConversionError(
                _custom_class_message(path, custom.group(1))
            ) from error
        raise ConversionError(
            f"cannot load Keras model {path}: {error}; "
            "expected a .keras file written by model.save()"
        ) from error


_CUSTOM_CLASS_PATTERN = re.compile(r"Could not locate class '([^']+)'")


def _custom_class_message(path: Path, class_name: str) -> str:
    # Keras's own message ends with the layer's whole config on one line,
    # so only the class name is kept.
    return (
        f"cannot load Keras model {path}: it uses the custom class "
        f"'{class_name}', which is not registered in this Python process. "
        "A trainable student supports only these layers: "
        f"{', '.join(SUPPORTED_LAYERS)}. For a teacher, import the module "
        "that defines the class and pass the loaded model to convert_bundle "
        "from Python"
    )


def _unsafe_layer_message(path: Path, error: Exception) -> str:
    # Keras's text suggests safe_mode=False, which convert does not offer,
    # because loading such a file runs the Python code stored in it.
    first_sentence = str(error).split(". ")[0]
    return (
        f"cannot load Keras model {path}: {first_sentence}. convert loads "
        "models in Keras's safe mode, which runs no Python code stored in "
        "the file; replace the Lambda layer with built-in layers or, for a "
        "teacher file you trust, load it with safe_mode=False and pass the "
        "model to convert_bundle from Python"
    )


def _check_io_counts(model: Any, role: str, outputs: int = 1) -> None:
    if len(model.inputs) != 1 or len(model.outputs) != outputs:
        expected = "1 output" if outputs == 1 else f"{outputs} outputs"
        raise ConversionError(
            f"the {role} has {len(model.inputs)} inputs and {len(model.outputs)} "
            f"outputs; expected 1 input and {expected}"
        )


def _output_kind(model: Any) -> str:
    # A single-output model; output_kinds also counts a Softmax layer.
    (kind,) = output_kinds(model).values()
    return kind


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


def _file_entry(path: Path, model: bytes, role: str, precision: str) -> dict[str, Any]:
    ops = signature_ops(model)
    flex = flex_ops(ops)
    if flex:
        raise ConversionError(
            f"the {role} model still contains Flex ops {', '.join(flex)}; "
            "it would not run on device interpreters"
        )
    summary = summarize_model(model)
    _verify_precision(summary.constant_bytes, precision, role)
    signatures = _signature_details(model)
    for key, names in ops.items():
        signatures[key]["ops"] = names
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "precision": precision,
        "constant_bytes": summary.constant_bytes,
        "signatures": signatures,
    }


def _verify_precision(
    constant_bytes: dict[str, int], precision: str, role: str
) -> None:
    # The converter falls back to float32 silently when it cannot quantize,
    # so the manifest states a precision only after finding it in the file.
    expected = {"float16": "FLOAT16", "int8": "INT8"}.get(precision)
    if expected and not constant_bytes.get(expected):
        raise ConversionError(
            f"the {role} was requested as {precision} but the converted file "
            f"has no {expected} constants ({constant_bytes}); convert it as float32"
        )


def convert_bundle(
    teacher: Any,
    student: Any,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    optimizer: OptimizerConfig | None = None,
    trainable: TrainableScope | None = None,
    precision: PrecisionOptions | None = None,
    overwrite_hint: str = "overwrite=True",
) -> dict[str, Any]:
    """Convert a Keras teacher and student into a bundle directory.

    Args:
        teacher: Keras model or path to a ``.keras`` file; any layers that
            LiteRT can run for inference.
        student: Keras model or path; layers from
            ``converters.layers.SUPPORTED_LAYERS``, as a Sequential model or
            a functional graph. A functional student may have several
            outputs (heads). The teacher then needs one output per head with
            the same output layer name and class count, and the manifest
            lists the heads under "heads" instead of one "class_count".
        out_dir: directory to create, with any missing parents. It must be
            missing or empty unless ``overwrite``.
        overwrite: replace an existing bundle directory. A directory that
            contains anything besides bundle files is never replaced.
        optimizer: the optimizer the ``train`` signature runs (default SGD).
        trainable: which weights ``train`` updates (default all).
        precision: precision of each file (default float32 everywhere).
        overwrite_hint: how the caller spells ``overwrite`` in error
            messages, such as ``--overwrite`` on the command line.

    Returns:
        The manifest written to ``out_dir/manifest.json``.

    Raises:
        ConversionError: unsupported layers or precision, mismatched shapes,
            Flex ops, an output directory that exists and is not empty (or,
            with ``overwrite``, is not a bundle), or a failed write or move
            of the bundle files. An earlier bundle in ``out_dir`` stays
            unchanged when any of these is raised. The one exception is a
            failed move back after a failed swap, and its message names the
            directory that then contains the earlier bundle.
        OutputPathError: ``out_dir`` is a file, or its parent cannot be
            created or written to.
    """
    out = Path(out_dir)
    prepare_output_dir(out, overwrite=overwrite, overwrite_hint=overwrite_hint)
    options = precision or PrecisionOptions()
    options.check()
    teacher_model = load_keras_model(teacher)
    student_model = load_keras_model(student)
    input_shape = _check_pair(teacher_model, student_model)
    data = options.representative_data
    if data is not None and (options.teacher == "int8" or options.int8_student_copy):
        check_representative(data, input_shape)
    module = StudentModule(
        read_student(student_model), optimizer=optimizer, scope=trainable
    )
    _check_classes(teacher_model, module)

    # The staging directory is made before the slow conversion, so an
    # unwritable output path fails first.
    staging = make_staging_dir(out)
    try:
        files = _convert_files(
            teacher_model, student_model, module, input_shape, options, staging
        )
        _write_files(
            staging, files, module, input_shape, options, teacher_model, student_model
        )
        # Read before the move: a relative ``out`` such as "." may name the
        # replaced directory afterwards.
        manifest = json.loads((staging / MANIFEST_NAME).read_text())
        move_into_place(staging, out, overwrite, overwrite_hint)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def _check_pair(teacher: Any, student: Any) -> tuple[int, ...]:
    # With several student heads, _check_classes matches the teacher's
    # outputs to them once the heads are read.
    single_head = len(student.outputs) == 1
    teacher_outputs = 1 if single_head else len(teacher.outputs)
    _check_io_counts(teacher, "teacher", outputs=teacher_outputs)
    _check_io_counts(student, "student", outputs=len(student.outputs))
    input_shape = tuple(int(d) for d in student.input_shape[1:])
    teacher_shape = tuple(int(d) for d in teacher.input_shape[1:])
    if teacher_shape != input_shape:
        raise ConversionError(
            f"teacher input shape {teacher_shape} differs from student input "
            f"shape {input_shape}; both must read the same samples"
        )
    return input_shape


def _check_classes(teacher: Any, module: StudentModule) -> None:
    check_output_activations(teacher, "teacher")
    if module.graph.multi_head:
        check_teacher_heads(teacher, module.graph.heads)
        return
    teacher_classes = int(teacher.output_shape[-1])
    if teacher_classes != module.class_count:
        raise ConversionError(
            f"teacher has {teacher_classes} classes but the student has "
            f"{module.class_count}; they must match"
        )


def _convert_files(
    teacher: Any,
    student: Any,
    module: StudentModule,
    input_shape: tuple[int, ...],
    options: PrecisionOptions,
    work_dir: Path,
) -> dict[str, bytes]:
    data = options.representative_data
    files = {
        STUDENT_FILE: to_tflite(
            module,
            module.signatures(),
            "student",
            options.student,
            work_dir=work_dir,
        )
    }
    teacher_module = InferenceModule(teacher, "teacher")
    files[TEACHER_FILE] = to_tflite(
        teacher_module,
        teacher_module.signatures(input_shape),
        "teacher",
        options.teacher,
        data,
        work_dir=work_dir,
    )
    if options.int8_student_copy:
        copy = InferenceModule(student, "student_int8")
        files[STUDENT_INT8_FILE] = to_tflite(
            copy,
            copy.signatures(input_shape),
            "int8 student copy",
            "int8",
            data,
            work_dir=work_dir,
        )
    return files


def check_representative(data: np.ndarray, input_shape: tuple[int, ...]) -> None:
    """Raise RepresentativeDataError unless ``data`` fits ``input_shape``.

    ``data`` must contain at least one sample of that shape, all finite. The
    converter would otherwise fail inside the TFLite calibration with a
    message that does not name the representative data.
    """
    expected = f"(N, {', '.join(str(size) for size in input_shape)})"
    if data.ndim != len(input_shape) + 1 or tuple(data.shape[1:]) != input_shape:
        raise RepresentativeDataError(
            f"the representative data has shape {tuple(data.shape)}, but the "
            f"models take inputs of shape {input_shape}; save an x array of "
            f"shape {expected}"
        )
    if data.shape[0] == 0:
        raise RepresentativeDataError(
            f"the representative data has no samples; save an x array of shape "
            f"{expected} with a few hundred samples"
        )
    if not np.isfinite(data).all():
        raise RepresentativeDataError(
            "the representative data contains NaN or infinite values; "
            "calibration needs finite inputs"
        )


def _write_files(
    staging: Path,
    files: dict[str, bytes],
    module: StudentModule,
    input_shape: tuple[int, ...],
    options: PrecisionOptions,
    teacher: Any,
    student: Any,
) -> None:
    for name, data in files.items():
        _write(staging / name, data)
    manifest = _manifest(staging, files, module, input_shape, options)
    _add_output_kinds(manifest, module, teacher, student)
    _write(staging / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as error:
        raise ConversionError(
            f"cannot write {path}: {error.strerror or error}; "
            "free some space or choose another output path"
        ) from error


def _add_output_kinds(
    manifest: dict[str, Any], module: StudentModule, teacher: Any, student: Any
) -> None:
    if not module.graph.multi_head:
        manifest["teacher"]["output_kind"] = _output_kind(teacher)
        if "student_int8" in manifest:
            manifest["student_int8"]["output_kind"] = _output_kind(student)
        return
    # Several heads: one kind per head name instead of one output_kind.
    teacher_kinds = output_kinds(teacher)
    manifest["heads"] = manifest_heads(module.graph.heads, teacher_kinds)
    manifest["teacher"]["output_kinds"] = teacher_kinds
    if "student_int8" in manifest:
        manifest["student_int8"]["output_kinds"] = output_kinds(student)


def _manifest(
    folder: Path,
    files: dict[str, bytes],
    module: StudentModule,
    input_shape: tuple[int, ...],
    options: PrecisionOptions,
) -> dict[str, Any]:
    student = _file_entry(
        folder / STUDENT_FILE, files[STUDENT_FILE], "student", options.student
    )
    student.update(_student_state(module))
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created_by": f"dslo-edge {__version__}",
        "runtime": {"interpreters": RUNTIMES, "flex": False},
        "input": {"shape": [None, *input_shape], "dtype": "float32"},
        "class_count": module.class_count,
        "student": student,
        "teacher": _file_entry(
            folder / TEACHER_FILE, files[TEACHER_FILE], "teacher", options.teacher
        ),
    }
    if module.graph.multi_head:
        # Each head has its own class count, listed under "heads".
        del manifest["class_count"]
    if STUDENT_INT8_FILE in files:
        manifest["student_int8"] = _file_entry(
            folder / STUDENT_INT8_FILE,
            files[STUDENT_INT8_FILE],
            "int8 student copy",
            "int8",
        )
    return manifest


def _student_state(module: StudentModule) -> dict[str, Any]:
    """Describe every tensor that get_weights exports, and how training runs."""
    variables = {
        name: {
            "shape": list(variable.shape),
            "kind": module.kinds[name],
            "bytes": int(np.prod(variable.shape)) * 4,
        }
        for name, variable in zip(
            module.weight_names, module.variables_list, strict=True
        )
    }
    return {
        "weights": {name: entry["shape"] for name, entry in variables.items()},
        "variables": variables,
        "optimizer": module.optimizer_config.manifest_entry(),
        "trainable": {
            "scope": module.scope.describe(),
            "layers": [n for n in module.graph.layers if n in module.trained_layers],
        },
    }


def convert_teacher(
    teacher: Any,
    path: str | os.PathLike[str],
    precision: str = "float32",
    representative_data: np.ndarray | None = None,
) -> Path:
    """Write an inference-only ``.tflite`` of a teacher snapshot (one hub round).

    A teacher with several outputs, for a student with several heads, gets
    an ``output_<head>`` per output, named as in ``convert_bundle``.
    """
    check_precision(precision, "teacher", trainable=False)
    model = load_keras_model(teacher)
    _check_io_counts(model, "teacher", outputs=max(1, len(model.outputs)))
    check_output_activations(model, "teacher")
    input_shape = tuple(int(d) for d in model.input_shape[1:])
    module = InferenceModule(model, "teacher")
    data = to_tflite(
        module,
        module.signatures(input_shape),
        "teacher",
        precision,
        representative_data,
    )
    target = Path(path)
    target.write_bytes(data)
    return target
