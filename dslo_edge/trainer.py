"""Turn validated soft-label updates into train steps on the student.

This is the daemon's hot path after the network thread: decode, validate,
convert logits, smooth per sample id, weigh each sample with the dynamic
alpha, then one step of the ``train`` signature.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dslo_edge.batching import batch_slices
from dslo_edge.checkpoint import Checkpoint
from dslo_edge.config import TrainingSettings
from dslo_edge.dynamic import SoftLabelEngine, Targets
from dslo_edge.errors import InvalidUpdate
from dslo_edge.models import StudentModel
from dslo_edge.multihead_protocol import is_multi_head_payload, payload_message_id
from dslo_edge.protocol import (
    ModelSpec,
    PayloadLimits,
    SoftLabelUpdate,
    decode_checked,
    label_probabilities,
)
from dslo_edge.softlabels import SmoothingStore, TeacherMonitor

WEIGHT_PREFIX = "weights/"
# Engine tensors of the single head have no prefix, so checkpoints written
# before the monitor was saved still restore their smoothing rows.
ENGINE_PREFIX = ""


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
    """Figures of one applied update, for metrics.

    ``prepare_ms`` covers label conversion and the dynamic part, and
    ``dynamic_ms`` the dynamic part alone (entropy, monitor, smoothing and
    alpha). ``batch_drift`` is None when no sample was seen in an earlier
    round.
    """

    message_id: str
    samples: int
    loss: float
    mean_alpha: float
    prepare_ms: float
    train_ms: float
    dynamic_ms: float = 0.0
    min_alpha: float = 0.0
    max_alpha: float = 0.0
    smoothing_lambda: float = 0.0
    progress: float = 0.0
    teacher_round: int = 0
    batch_drift: float | None = None


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
        self.engine = SoftLabelEngine(settings.task(), settings.progress_settings())

    @property
    def store(self) -> SmoothingStore:
        """The smoothing store of the student's head."""
        return self.engine.store

    @property
    def monitor(self) -> TeacherMonitor:
        """The teacher monitor of the student's head."""
        return self.engine.monitor

    @property
    def applied_updates(self) -> int:
        """Updates trained on, including those before the last restore."""
        return self.engine.applied_updates

    @applied_updates.setter
    def applied_updates(self, count: int) -> None:
        # The daemon resets the count when it rolls back to factory weights.
        self.engine.applied_updates = count

    def reset_dynamic_state(self) -> None:
        """Forget progress, smoothing targets, monitor history and drift boost.

        For a rollback to factory weights: the stored targets and statistics
        describe updates whose effect on the weights was discarded.
        """
        self.engine = SoftLabelEngine(
            self.settings.task(), self.settings.progress_settings()
        )

    @property
    def progress(self) -> float:
        """Training progress t in [0, 1] for the next update.

        Applied updates over planned updates, or the highest teacher round
        seen over planned rounds, as ``settings.progress`` selects.
        """
        return self.engine.progress

    def decode(self, payload: bytes) -> SoftLabelUpdate:
        """Decode and validate a payload; raises InvalidUpdate on any fault."""
        try:
            return decode_checked(
                payload, self.spec, self.limits, sum_tolerance=self.sum_tolerance
            )
        except InvalidUpdate as error:
            # A version 3 payload fails as an unknown version: name the cause.
            if error.reason == "unsupported_version":
                _reject_multi_head_payload(payload)
            raise

    def prepare(self, update: SoftLabelUpdate) -> TrainBatch:
        """Compute smoothed targets, hard labels and per-sample alpha."""
        return self._batch(update, self._targets(update))

    def _targets(self, update: SoftLabelUpdate) -> Targets:
        probabilities = label_probabilities(update, self.settings.temperature)
        return self.engine.prepare(
            update.sample_ids,
            probabilities,
            update.teacher_round,
            update.hard_labels,
            update.temperature,
        )

    @staticmethod
    def _batch(update: SoftLabelUpdate, targets: Targets) -> TrainBatch:
        return TrainBatch(
            update.inputs,
            targets.soft,
            targets.hard,
            targets.alpha,
            targets.temperature,
        )

    def apply(self, update: SoftLabelUpdate) -> AppliedUpdate:
        """Train one step on a validated update."""
        started = time.perf_counter()
        targets = self._targets(update)
        batch = self._batch(update, targets)
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
        self.engine.finish_update()
        prepare_ms = (prepared - started) * 1000
        train_ms = (finished - prepared) * 1000
        return _applied(update, targets, prepare_ms, loss, train_ms)

    def apply_many(
        self, updates: Sequence[SoftLabelUpdate], batch_size: int
    ) -> list[AppliedUpdate]:
        """Train on the samples of validated updates in steps of ``batch_size``.

        Each update goes through the dynamic part in order, as ``apply``
        would take it, and counts as applied right after, so progress and
        alpha match one ``apply`` per update. The rows are then trained in
        steps of ``batch_size``. Rows of updates with different temperatures
        never share a step, because the ``train`` signature takes one
        temperature; such a run ends with a shorter step.

        Returns:
            One result per update. Its ``loss`` is the mean loss of the steps
            that trained its rows, weighted by its row count in each step,
            and its ``train_ms`` is its row share of those steps' time.
        """
        prepared = []
        for update in updates:
            started = time.perf_counter()
            targets = self._targets(update)
            self.engine.finish_update()
            prepared.append((targets, (time.perf_counter() - started) * 1000))
        losses, train_ms = self._train_rows(
            updates, [targets for targets, _ in prepared], batch_size
        )
        return [
            _applied(update, targets, prepare_ms, losses[index], train_ms[index])
            for index, (update, (targets, prepare_ms)) in enumerate(
                zip(updates, prepared, strict=True)
            )
        ]

    def _train_rows(
        self,
        updates: Sequence[SoftLabelUpdate],
        targets: list[Targets],
        batch_size: int,
    ) -> tuple[list[float], list[float]]:
        """Run the train steps of ``apply_many``; return loss and ms per update."""
        counts = [update.sample_count for update in updates]
        owner = np.repeat(np.arange(len(updates)), counts)
        x = np.concatenate([update.inputs for update in updates])
        soft = np.concatenate([t.soft for t in targets])
        hard = np.concatenate([t.hard for t in targets])
        alpha = np.concatenate([t.alpha for t in targets])
        loss_sums = np.zeros(len(updates))
        train_ms = np.zeros(len(updates))
        for rows, temperature in _step_rows(counts, targets, batch_size):
            started = time.perf_counter()
            loss = self.student.train_step(
                x[rows],
                soft[rows],
                hard[rows],
                alpha[rows],
                temperature,
                self.settings.learning_rate,
            )
            step_ms = (time.perf_counter() - started) * 1000
            rows_per_update = np.bincount(owner[rows], minlength=len(updates))
            loss_sums += rows_per_update * loss
            train_ms += rows_per_update * (step_ms / (rows.stop - rows.start))
        return (loss_sums / counts).tolist(), train_ms.tolist()

    def dynamic_metrics(self) -> dict[str, Any]:
        """Return progress, alpha, smoothing and teacher-monitor figures.

        The result is JSON-ready; ``SoftLabelEngine.snapshot`` lists its keys.
        """
        return self.engine.snapshot()

    def teacher_snapshot(self) -> dict[str, float]:
        """Return the teacher monitor's figures (``TeacherMonitor.snapshot``)."""
        return self.monitor.snapshot()

    def checkpoint_content(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Return the tensors and JSON state that a checkpoint stores."""
        tensors = weight_tensors(self.student.get_weights())
        engine_tensors, state = self.engine.checkpoint_content(ENGINE_PREFIX)
        tensors.update(engine_tensors)
        return tensors, state

    def restore(self, checkpoint: Checkpoint) -> None:
        """Load weights, smoothing store, monitor and progress from a checkpoint."""
        self.student.set_weights(checkpoint_weights(checkpoint))
        self.engine.restore(checkpoint.tensors, checkpoint.state, ENGINE_PREFIX)


def _reject_multi_head_payload(payload: bytes) -> None:
    """Raise ``shape_mismatch`` for a multi-head payload sent to this student."""
    if is_multi_head_payload(payload):
        raise InvalidUpdate(
            "shape_mismatch",
            "payload is a multi-head update (format version 3), but this student "
            "has one head; the hub must send format version 1 or 2",
            payload_message_id(payload),
        ) from None


def weight_tensors(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return student weights under their checkpoint tensor names."""
    return {WEIGHT_PREFIX + name: value for name, value in weights.items()}


def checkpoint_weights(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    """Return the student weights stored in a checkpoint, by weight name."""
    return {
        name[len(WEIGHT_PREFIX) :]: value
        for name, value in checkpoint.tensors.items()
        if name.startswith(WEIGHT_PREFIX)
    }


def _applied(
    update: SoftLabelUpdate,
    targets: Targets,
    prepare_ms: float,
    loss: float,
    train_ms: float,
) -> AppliedUpdate:
    # A Python list, because three numpy reductions of 32 values cost about
    # 8 us in a hot loop.
    alpha = targets.alpha.tolist()
    return AppliedUpdate(
        message_id=update.message_id_hex,
        samples=update.sample_count,
        loss=loss,
        mean_alpha=sum(alpha) / len(alpha),
        prepare_ms=prepare_ms,
        train_ms=train_ms,
        dynamic_ms=targets.dynamic_ms,
        min_alpha=min(alpha),
        max_alpha=max(alpha),
        smoothing_lambda=targets.smoothing_lambda,
        progress=targets.progress,
        teacher_round=update.teacher_round,
        batch_drift=targets.batch_drift,
    )


def _step_rows(
    counts: list[int], targets: list[Targets], batch_size: int
) -> list[tuple[slice, float]]:
    """Return (rows, temperature) of each train step over concatenated updates."""
    steps = []
    start = 0
    index = 0
    while index < len(counts):
        # A run of consecutive updates that share one temperature.
        temperature = targets[index].temperature
        end = start
        while index < len(counts) and targets[index].temperature == temperature:
            end += counts[index]
            index += 1
        for rows in batch_slices(end - start, batch_size):
            steps.append((slice(start + rows.start, start + rows.stop), temperature))
        start = end
    return steps
