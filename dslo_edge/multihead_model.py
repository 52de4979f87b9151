"""The student of a multi-head bundle: per-head inference and one joint step.

The converter exports such a student with ``infer`` outputs
``logits_<head>`` and ``probabilities_<head>``, and ``train`` inputs
``soft_<head>``, ``hard_<head>``, ``alpha_<head>``, ``temperature_<head>``
and ``weight_<head>`` per head (``docs/multi-head.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dslo_edge.bundle import Bundle
from dslo_edge.dynamic import Targets
from dslo_edge.models import StudentModel
from dslo_edge.runtime import as_float32

HeadTargets = Mapping[str, Targets]


class MultiHeadStudentModel(StudentModel):
    """A student with several heads: per-head inference and one joint step.

    ``get_weights`` and ``set_weights`` are those of ``StudentModel``.
    """

    def __init__(self, bundle: Bundle, runtime: str = "auto"):
        super().__init__(bundle, runtime)
        self.head_names = list(bundle.multi_head_spec().heads)

    def logits(self, x: np.ndarray) -> dict[str, np.ndarray]:  # type: ignore[override]
        """Return the logits (N, K_t) of every head for inputs (N, *input_shape)."""
        outputs = self._infer(x=as_float32(x))
        return {name: np.array(outputs[f"logits_{name}"]) for name in self.head_names}

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:  # type: ignore[override]
        """Return the class probabilities (N, K_t) of every head."""
        outputs = self._infer(x=as_float32(x))
        return {
            name: np.array(outputs[f"probabilities_{name}"]) for name in self.head_names
        }

    def train_step(  # type: ignore[override]
        self,
        x: np.ndarray,
        targets: HeadTargets,
        weights: Mapping[str, float],
        learning_rate: float,
    ) -> tuple[float, dict[str, float]]:
        """Run one SGD step on ``sum_t weight_t * L_t`` over all heads.

        Args:
            x: inputs (N, *input_shape), shared by the heads.
            targets: per head, the soft targets, hard labels (-1 for none),
                per-sample alpha and temperature of the step.
            weights: per head, the weight of its loss; 0 leaves the head's
                own layers unchanged.
            learning_rate: SGD step size.

        Returns:
            The weighted loss and each head's unweighted loss, both computed
            before the step.
        """
        inputs: dict[str, Any] = {"x": as_float32(x)}
        for name in self.head_names:
            target = targets[name]
            inputs[f"soft_{name}"] = as_float32(target.soft)
            inputs[f"hard_{name}"] = np.ascontiguousarray(target.hard, dtype=np.int32)
            inputs[f"alpha_{name}"] = as_float32(target.alpha)
            inputs[f"temperature_{name}"] = np.float32(target.temperature)
            inputs[f"weight_{name}"] = np.float32(weights[name])
        inputs["learning_rate"] = np.float32(learning_rate)
        result = self._train(**inputs)
        head_losses = {name: float(result[f"loss_{name}"]) for name in self.head_names}
        return float(result["loss"]), head_losses


def load_student(bundle: Bundle, runtime: str = "auto") -> StudentModel:
    """Return the student of a bundle, with per-head methods when it has heads."""
    if bundle.is_multi_head:
        return MultiHeadStudentModel(bundle, runtime)
    return StudentModel(bundle, runtime)
