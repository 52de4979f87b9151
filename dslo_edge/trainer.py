"""Turn validated soft-label updates into train steps on the student.

This is the daemon's hot path after the network thread: decode, validate,
convert logits, smooth per sample id, weigh each sample with the dynamic
alpha, then one step of the ``train`` signature.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dslo_edge.checkpoint import Checkpoint
from dslo_edge.config import TrainingSettings
from dslo_edge.models import StudentModel
from dslo_edge.protocol import (
    ModelSpec,
    PayloadLimits,
    SoftLabelUpdate,
    decode_update,
    label_probabilities,
    validate_update,
)
from dslo_edge.softlabels import SmoothingStore, TeacherMonitor

WEIGHT_PREFIX = "weights/"
SMOOTHING_ROWS = "smoothing/rows"


@dataclass(frozen=True)
class TrainBatch:
    """The tensors fed to the ``train`` signature for one update."""

    x: np.ndarray
    soft: np.ndarray
    hard: np.ndarray
    alpha: np.ndarray
    temperature: float


@dataclass(frozen=True)
class AppliedUpdate:
    """What one applied update did, for metrics."""

    message_id: str
    samples: int
    loss: float
    mean_alpha: float
    prepare_ms: float
    train_ms: float


class Trainer:
    """Applies soft-label updates to a student with smoothing and dynamic alpha."""

    def __init__(
        self,
        student: StudentModel,
        settings: TrainingSettings,
        limits: PayloadLimits | None = None,
        sum_tolerance: float = 1e-3,
    ):
        self.student = student
        self.settings = settings
        self.limits = limits or PayloadLimits()
        self.sum_tolerance = sum_tolerance
        self.spec: ModelSpec = student.bundle.model_spec()
        self.store = SmoothingStore(settings.smoothing_capacity)
        self.monitor = TeacherMonitor(settings.smoothing_capacity)
        self.applied_updates = 0

    @property
    def progress(self) -> float:
        """Training progress t in [0, 1]: applied updates over planned updates."""
        return min(1.0, self.applied_updates / self.settings.planned_updates)

    def decode(self, payload: bytes) -> SoftLabelUpdate:
        """Decode and validate a payload; raises InvalidUpdate on any fault."""
        update = decode_update(payload, self.limits)
        validate_update(update, self.spec, sum_tolerance=self.sum_tolerance)
        return update

    def prepare(self, update: SoftLabelUpdate) -> TrainBatch:
        """Compute smoothed targets, hard labels and per-sample alpha."""
        temperature = float(update.temperature or self.settings.temperature)
        probabilities = label_probabilities(update, self.settings.temperature)
        self.monitor.observe(update.sample_ids, probabilities, update.teacher_round)
        soft = self.store.smooth(
            update.sample_ids, probabilities, self.settings.smoothing_lambda
        )
        alpha = self.settings.alpha.alpha(probabilities, self.progress)
        return TrainBatch(
            update.inputs, soft, self._hard_labels(update, soft), alpha, temperature
        )

    def _hard_labels(self, update: SoftLabelUpdate, soft: np.ndarray) -> np.ndarray:
        if update.hard_labels is None:
            hard = np.full(update.sample_count, -1, dtype=np.int32)
        else:
            hard = update.hard_labels.astype(np.int32, copy=True)
        if self.settings.hard_label_fallback == "argmax":
            missing = hard < 0
            hard[missing] = np.argmax(soft[missing], axis=1)
        return hard

    def apply(self, update: SoftLabelUpdate) -> AppliedUpdate:
        """Train one step on a validated update."""
        started = time.perf_counter()
        batch = self.prepare(update)
        prepared = time.perf_counter()
        loss = self.student.train_step(
            batch.x,
            batch.soft,
            batch.hard,
            batch.alpha,
            batch.temperature,
            self.settings.learning_rate,
        )
        finished = time.perf_counter()
        self.applied_updates += 1
        return AppliedUpdate(
            message_id=update.message_id_hex,
            samples=update.sample_count,
            loss=loss,
            mean_alpha=float(batch.alpha.mean()),
            prepare_ms=(prepared - started) * 1000,
            train_ms=(finished - prepared) * 1000,
        )

    def checkpoint_content(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Return the tensors and JSON state that a checkpoint stores."""
        tensors = {
            WEIGHT_PREFIX + name: value
            for name, value in self.student.get_weights().items()
        }
        ids, rows = self.store.to_arrays()
        if ids:
            tensors[SMOOTHING_ROWS] = rows
        state = {
            "applied_updates": self.applied_updates,
            "smoothing_ids": ids,
            "monitor": self.monitor.snapshot(),
        }
        return tensors, state

    def restore(self, checkpoint: Checkpoint) -> None:
        """Load weights, smoothing store and progress from a checkpoint."""
        weights = {
            name[len(WEIGHT_PREFIX) :]: value
            for name, value in checkpoint.tensors.items()
            if name.startswith(WEIGHT_PREFIX)
        }
        self.student.set_weights(weights)
        ids = list(checkpoint.state.get("smoothing_ids", []))
        if ids:
            self.store = SmoothingStore.from_arrays(
                ids,
                checkpoint.tensors[SMOOTHING_ROWS],
                self.settings.smoothing_capacity,
            )
        self.applied_updates = int(checkpoint.state.get("applied_updates", 0))
