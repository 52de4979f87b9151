"""DSL-O for students with several output heads (tasks).

Each task has its own ``SoftLabelEngine``: schedule, alpha parameters,
temperature, smoothing store, drift boost and teacher monitor. Progress is
shared, because all heads train in the same update. The loss is the sum of
the per-task losses weighted by ``TaskSettings.weight``::

    L = sum_t weight_t * L_t(z_t, s_t, y_t, alpha_t, T_t)

``dslo_edge.multihead.MultiHeadTrainer`` runs this engine on the device and
feeds its targets to the multi-head ``train`` signature. ``loss`` is the
numpy reference that the signature's ``loss`` output reproduces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dslo_edge.dynamic import ProgressSettings, SoftLabelEngine, Targets, TaskSettings
from dslo_edge.losses import distillation_loss


class MultiTaskEngine:
    """One ``SoftLabelEngine`` per task, advanced together."""

    def __init__(
        self,
        tasks: Mapping[str, TaskSettings],
        progress: ProgressSettings | None = None,
    ) -> None:
        """Create one engine per task.

        Raises:
            ValueError: no task is given, or a name is empty or contains '/'
                (names become checkpoint tensor prefixes).
        """
        if not tasks:
            raise ValueError("a multi-task engine needs at least one task")
        for name in tasks:
            if not name or "/" in name:
                raise ValueError(
                    f"task name {name!r} is invalid: expected a non-empty name "
                    "without '/'"
                )
        self.engines = {
            name: SoftLabelEngine(settings, progress)
            for name, settings in tasks.items()
        }

    @property
    def weights(self) -> dict[str, float]:
        """Loss weight of each task."""
        return {name: engine.settings.weight for name, engine in self.engines.items()}

    def prepare(
        self,
        sample_ids: Sequence[str],
        probabilities: Mapping[str, np.ndarray],
        teacher_round: int,
        hard_labels: Mapping[str, np.ndarray | None] | None = None,
        temperatures: Mapping[str, float | None] | None = None,
    ) -> dict[str, Targets]:
        """Compute every task's targets for one batch of shared samples.

        Args:
            sample_ids: one id per sample, shared by all tasks.
            probabilities: teacher probabilities (N, K_t) per task name.
            teacher_round: round of the teacher that labelled the batch.
            hard_labels: per task, int labels (N,) with -1 for none.
            temperatures: per task, the update's temperature or None.

        Raises:
            ValueError: the task names differ from the engine's tasks, or a
                task's rows disagree with ``sample_ids``.
        """
        if set(probabilities) != set(self.engines):
            raise ValueError(
                f"update has labels for tasks {sorted(probabilities)}, expected "
                f"{sorted(self.engines)}"
            )
        hard_labels = hard_labels or {}
        temperatures = temperatures or {}
        return {
            name: engine.prepare(
                sample_ids,
                probabilities[name],
                teacher_round,
                hard_labels.get(name),
                temperatures.get(name),
            )
            for name, engine in self.engines.items()
        }

    def finish_update(self) -> None:
        """Count one applied update in every task."""
        for engine in self.engines.values():
            engine.finish_update()

    def loss(
        self, logits: Mapping[str, np.ndarray], targets: Mapping[str, Targets]
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Return the weighted sum of task losses and each head's logit gradient."""
        total = 0.0
        gradients = {}
        for name, engine in self.engines.items():
            target = targets[name]
            value, gradient = distillation_loss(
                logits[name], target.soft, target.hard, target.alpha, target.temperature
            )
            weight = engine.settings.weight
            total += weight * value
            gradients[name] = weight * gradient
        return total, gradients

    def snapshot(self) -> dict[str, Any]:
        """Return each task's ``SoftLabelEngine.snapshot`` by task name."""
        return {name: engine.snapshot() for name, engine in self.engines.items()}

    def checkpoint_content(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Return tensors under ``tasks/<name>/`` and JSON state per task."""
        tensors: dict[str, np.ndarray] = {}
        states = {}
        for name, engine in self.engines.items():
            task_tensors, states[name] = engine.checkpoint_content(f"tasks/{name}/")
            tensors.update(task_tensors)
        return tensors, {"tasks": states}

    def restore(self, tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        """Load what ``checkpoint_content`` saved; absent tasks keep defaults."""
        saved = state.get("tasks", {})
        for name, engine in self.engines.items():
            if name in saved:
                engine.restore(tensors, saved[name], f"tasks/{name}/")
