"""Run a bundle's student and teacher through a LiteRT interpreter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.bundle import Bundle
from dslo_edge.errors import BundleError
from dslo_edge.push_checks import teacher_signature_of
from dslo_edge.runtime import as_float32, interpreter_class, load_interpreter

_NUMPY = (np.ndarray, np.generic)


class SignatureCall:
    """Calls one signature, resizing and allocating only when a shape changes.

    The interpreters' ``SignatureRunner`` resizes every input and allocates
    tensors on every call: about 14 of 62 us per train step of a 64-32-10
    student at batch 32 (ai-edge-litert 2.3, one x86-64 core). This wrapper
    feeds inputs of unchanged shapes straight to the runner's interpreter
    wrapper and calls the runner otherwise.
    NOTE: the fast path reads private ``SignatureRunner`` attributes, which
    ai-edge-litert 2.3 and tflite-runtime 2.14 both have. When any is
    missing, every call goes through the runner.
    """

    def __init__(self, runner: Any):
        self._runner = runner
        self._shapes: tuple[tuple[str, tuple[int, ...]], ...] | None = None
        try:
            self._wrapper = runner._interpreter_wrapper
            self._inputs: dict[str, int] = dict(runner._inputs)
            self._outputs: list[tuple[str, int]] = list(runner._outputs)
            self._subgraph: int = runner._subgraph_index
        except (AttributeError, TypeError):
            self._wrapper = None

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        """Run the signature; inputs are keyword arguments, as for the runner."""
        # value.shape where it exists, because np.shape costs about 0.4 us per
        # input in a hot loop.
        shapes = tuple(
            [
                (name, value.shape if isinstance(value, _NUMPY) else np.shape(value))
                for name, value in inputs.items()
            ]
        )
        if self._wrapper is None or shapes != self._shapes:
            # The runner resizes and allocates, and its checks raise on bad names.
            result: dict[str, np.ndarray] = self._runner(**inputs)
            self._shapes = shapes
            return result
        wrapper, subgraph = self._wrapper, self._subgraph
        for name, value in inputs.items():
            wrapper.SetTensor(self._inputs[name], value, subgraph)
        wrapper.Invoke(subgraph)
        return {
            name: wrapper.GetTensor(index, subgraph) for name, index in self._outputs
        }


class StudentModel:
    """The trainable student: infer, one train step, and weights in and out.

    All signatures share one interpreter, so they share the model variables.
    """

    def __init__(self, bundle: Bundle, runtime: str = "auto"):
        self.bundle = bundle
        _, self.runtime_name = interpreter_class(runtime)
        self.interpreter = load_interpreter(bundle.student_path, preference=runtime)
        infer = self.interpreter.get_signature_runner("infer")
        self._infer = SignatureCall(infer)
        self._train = SignatureCall(self.interpreter.get_signature_runner("train"))
        self._get_weights = self.interpreter.get_signature_runner("get_weights")
        self._set_weights = self.interpreter.get_signature_runner("set_weights")
        check_student_shapes(infer, self._get_weights, bundle)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.array(self._infer(x=as_float32(x))["logits"])

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Return class probabilities (N, K) for inputs (N, *input_shape)."""
        return np.array(self._infer(x=as_float32(x))["probabilities"])

    def train_step(
        self,
        x: np.ndarray,
        soft: np.ndarray,
        hard: np.ndarray,
        alpha: np.ndarray,
        temperature: float,
        learning_rate: float,
    ) -> float:
        """Run one SGD step on the distillation loss and return the loss.

        ``hard`` contains class indices, with -1 where a sample has no hard label.
        """
        result = self._train(
            x=as_float32(x),
            soft=as_float32(soft),
            hard=np.ascontiguousarray(hard, dtype=np.int32),
            alpha=as_float32(alpha),
            temperature=np.float32(temperature),
            learning_rate=np.float32(learning_rate),
        )
        return float(result["loss"])

    def get_weights(self) -> dict[str, np.ndarray]:
        """Return every weight by name, in the manifest's layer order."""
        values = self._get_weights()
        return {name: np.array(values[name]) for name in self.bundle.weight_shapes}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Assign every weight; shapes must match the manifest."""
        shapes = self.bundle.weight_shapes
        if set(weights) != set(shapes):
            missing = sorted(set(shapes) - set(weights))
            extra = sorted(set(weights) - set(shapes))
            raise ValueError(
                f"weights do not match the student: missing {missing}, "
                f"unexpected {extra}"
            )
        arrays: dict[str, Any] = {}
        for name, shape in shapes.items():
            value = as_float32(weights[name])
            if value.shape != shape:
                raise ValueError(
                    f"weight {name} has shape {value.shape}, expected {shape}"
                )
            arrays[name] = value
        self._set_weights(**arrays)


def check_student_shapes(infer: Any, get_weights: Any, bundle: Bundle) -> None:
    """Compare the student model's tensor shapes with those its manifest states.

    The sha256 in the manifest covers the model file but not the manifest,
    so a hand-edited input shape or class count passes ``load_bundle``.
    The daemon would then reject every update shaped for the model.

    Args:
        infer: the student's ``infer`` signature runner.
        get_weights: the student's ``get_weights`` signature runner.
        bundle: the bundle whose manifest is checked.

    Raises:
        BundleError: the input shape, a class count or a weight shape
            differs, naming the manifest key and both shapes.
    """
    for key, tensor, expected, found in _stated_shapes(infer, get_weights, bundle):
        kind = "" if tensor.startswith("weight") else "per-sample "
        if found != expected:
            raise BundleError(
                f"{bundle.path / 'manifest.json'}: {key} gives {tensor} the "
                f"{kind}shape {expected}, but {bundle.student_path.name} has "
                f"{found if found is not None else 'no such tensor'}; the "
                "manifest was edited or belongs to another model, so convert the "
                "models again with 'dslo-edge convert'"
            )


def check_student_file(bundle: Bundle, runtime: str = "auto") -> str | None:
    """Load the student with a LiteRT interpreter and check its tensor shapes.

    This is the check that ``StudentModel`` runs at the daemon's start, for
    commands that only read a bundle, such as ``flash`` and ``inspect``.

    Returns:
        None after the check, or why the student could not be loaded on
        this machine: no interpreter package is installed, or the installed
        one cannot load the model file.

    Raises:
        BundleError: the student lacks its ``infer`` or ``get_weights``
            signature, or a shape differs from the manifest.
    """
    try:
        interpreter = load_interpreter(bundle.student_path, preference=runtime)
    except BundleError as error:
        # RuntimeMissing is a BundleError too.
        return str(error)
    try:
        infer = interpreter.get_signature_runner("infer")
        get_weights = interpreter.get_signature_runner("get_weights")
    except ValueError as error:
        manifest = bundle.path / "manifest.json"
        raise BundleError(
            f"{bundle.student_path} lacks a signature that {manifest} names: "
            f"{error}; convert the models again with 'dslo-edge convert'"
        ) from error
    check_student_shapes(infer, get_weights, bundle)
    return None


_StatedShape = tuple[str, str, tuple[int, ...], tuple[int, ...] | None]


def _stated_shapes(infer: Any, get_weights: Any, bundle: Bundle) -> list[_StatedShape]:
    """Return (manifest key and value, tensor, stated shape, model's shape) rows.

    Inputs and outputs are compared without their batch dimension.
    """
    outputs = infer.get_output_details()
    weights = get_weights.get_output_details()
    checks: list[_StatedShape] = [
        (
            f"input.shape {[None, *bundle.input_shape]}",
            "input x",
            bundle.input_shape,
            _sample_shape(infer.get_input_details().get("x")),
        )
    ]
    if bundle.is_multi_head:
        for name, count in bundle.heads.items():
            tensor = f"probabilities_{name}"
            checks.append(
                (
                    f"class_count {count} of head {name!r}",
                    f"output {tensor}",
                    (count,),
                    _sample_shape(outputs.get(tensor)),
                )
            )
    else:
        count = bundle.class_count
        checks.append(
            (
                f"class_count {count}",
                "output probabilities",
                (count,),
                _sample_shape(outputs.get("probabilities")),
            )
        )
    for name, shape in bundle.weight_shapes.items():
        checks.append(
            (
                f"student.weights.{name} {list(shape)}",
                f"weight {name}",
                shape,
                _shape(weights.get(name)),
            )
        )
    return checks


def _shape(detail: dict[str, Any] | None) -> tuple[int, ...] | None:
    if detail is None:
        return None
    return tuple(int(size) for size in detail["shape_signature"])


def _sample_shape(detail: dict[str, Any] | None) -> tuple[int, ...] | None:
    shape = _shape(detail)
    return None if shape is None else shape[1:]


def read_teacher(path: Any) -> bytes:
    """Return the bytes of a teacher file.

    The hub loads teachers from memory rather than mapping the file: it
    reloads teacher files that users replace, and copying a new file over a
    mapped one in place crashes the process that maps it.

    Raises:
        BundleError: the file cannot be read.
    """
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise BundleError(f"cannot read the teacher {path}: {error}") from error


class TeacherModel:
    """The teacher's inference model, used by the hub to make soft labels."""

    def __init__(
        self,
        path: Any,
        output_kind: str,
        runtime: str = "auto",
        *,
        content: bytes | None = None,
        source: str | None = None,
    ):
        """Load the teacher from ``content``, or else from the file at ``path``.

        Args:
            source: how the file was given, for errors; default ``teacher PATH``.

        Raises:
            BundleError: the file cannot be read or is not a LiteRT model.
            ConfigError: the model has no ``infer`` signature with input ``x``
                and output ``output``, such as a student file.
        """
        self.output_kind = output_kind
        if content is None:
            content = read_teacher(path)
        self.interpreter = load_interpreter(model_content=content, preference=runtime)
        signature = teacher_signature_of(
            self.interpreter, source or f"teacher {path}", ["output"]
        )
        self.input_shape = signature.input_shape
        self.class_count = signature.class_counts["output"]
        self._infer = self.interpreter.get_signature_runner("infer")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the teacher output (probabilities or logits per output_kind)."""
        return np.array(self._infer(x=as_float32(x))["output"])
