"""Run a bundle's student and teacher through a LiteRT interpreter."""

from __future__ import annotations

from typing import Any

import numpy as np

from dslo_edge.bundle import Bundle
from dslo_edge.runtime import as_float32, interpreter_class, load_interpreter


class StudentModel:
    """The trainable student: infer, one train step, and weights in and out.

    All signatures share one interpreter, so they share the model variables.
    """

    def __init__(self, bundle: Bundle, runtime: str = "auto"):
        self.bundle = bundle
        _, self.runtime_name = interpreter_class(runtime)
        self.interpreter = load_interpreter(bundle.student_path, preference=runtime)
        self._infer = self.interpreter.get_signature_runner("infer")
        self._train = self.interpreter.get_signature_runner("train")
        self._get_weights = self.interpreter.get_signature_runner("get_weights")
        self._set_weights = self.interpreter.get_signature_runner("set_weights")

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

        ``hard`` holds class indices, with -1 where a sample has no hard label.
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


class TeacherModel:
    """The teacher's inference model, used by the hub to make soft labels."""

    def __init__(self, path: Any, output_kind: str, runtime: str = "auto"):
        self.output_kind = output_kind
        self.interpreter = load_interpreter(path, preference=runtime)
        self._infer = self.interpreter.get_signature_runner("infer")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the teacher output (probabilities or logits per output_kind)."""
        return np.array(self._infer(x=as_float32(x))["output"])
