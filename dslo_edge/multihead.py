"""Train students with several heads (tasks) on multi-head soft-label updates.

``MultiHeadStudentModel`` runs the per-head ``infer`` and ``train``
signatures that the converter exports for a student with several outputs.
``MultiHeadTrainer`` turns format version 3 updates into one train step for
all heads: each head's labels go through its own ``SoftLabelEngine`` (in a
``MultiTaskEngine``), and the step minimises ``sum_t weight_t * L_t``.
``make_trainer`` and ``multihead_model.load_student`` pick the single- or
multi-head classes from the bundle, so the daemon drives both the same way.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dslo_edge.batching import batch_slices
from dslo_edge.checkpoint import Checkpoint
from dslo_edge.config import TrainingSettings
from dslo_edge.dynamic import Targets, TaskSettings
from dslo_edge.errors import ConfigError, InvalidUpdate
from dslo_edge.models import StudentModel
from dslo_edge.multihead_decode import decode_multi_head_update
from dslo_edge.multihead_model import MultiHeadStudentModel
from dslo_edge.multihead_protocol import (
    MultiHeadSpec,
    MultiHeadUpdate,
    head_update,
    payload_message_id,
    validate_multi_head_update,
)
from dslo_edge.multitask import MultiTaskEngine
from dslo_edge.protocol import (
    MAGIC,
    SUPPORTED_VERSIONS,
    PayloadLimits,
    SoftLabelUpdate,
    label_probabilities,
)
from dslo_edge.trainer import (
    AppliedUpdate,
    Trainer,
    checkpoint_weights,
    weight_tensors,
)

# An update of either kind. Each trainer accepts only the kind it decodes.
AnyUpdate = SoftLabelUpdate | MultiHeadUpdate


def make_trainer(
    student: StudentModel,
    settings: TrainingSettings,
    limits: PayloadLimits | None = None,
    sum_tolerance: float = 1e-3,
) -> Trainer | MultiHeadTrainer:
    """Return the trainer for the student's bundle: single- or multi-head.

    Raises:
        ConfigError: ``settings.tasks`` names heads the student does not have.
        BundleError: a multi-head bundle was loaded as a plain ``StudentModel``.
    """
    if isinstance(student, MultiHeadStudentModel):
        return MultiHeadTrainer(student, settings, limits, sum_tolerance)
    if settings.tasks:
        head_tasks(settings, {}, student.bundle.path)
    return Trainer(student, settings, limits, sum_tolerance)


def head_tasks(
    settings: TrainingSettings, heads: Mapping[str, int], bundle_path: Any
) -> dict[str, TaskSettings]:
    """Return each head's task settings; heads without a table get defaults.

    Raises:
        ConfigError: a ``[training.tasks.<head>]`` table names a head that the
            student does not have, or every head has weight 0.
    """
    for name in settings.tasks:
        if name not in heads:
            expected = ", ".join(heads) or "none, because it has one output"
            raise ConfigError(
                f"[training.tasks.{name}] names head {name!r}, but the student in "
                f"{bundle_path} has no such head; its heads are: {expected}. "
                "Rename or remove the table"
            )
    tasks = {name: settings.head_task(name) for name in heads}
    if tasks and all(task.weight == 0 for task in tasks.values()):
        raise ConfigError(
            f"every head of the student in {bundle_path} has weight 0 in its "
            "[training.tasks.<head>] table, so no head's loss would train the "
            "student; give at least one head a weight above 0"
        )
    return tasks


class MultiHeadTrainer:
    """Applies multi-head updates to a student with one engine per head."""

    def __init__(
        self,
        student: MultiHeadStudentModel,
        settings: TrainingSettings,
        limits: PayloadLimits | None = None,
        sum_tolerance: float = 1e-3,
    ):
        self.student = student
        self.settings = settings
        self.limits = limits or PayloadLimits()
        self.sum_tolerance = sum_tolerance
        self.spec: MultiHeadSpec = student.bundle.multi_head_spec()
        self.tasks = head_tasks(settings, self.spec.heads, student.bundle.path)
        self.engine = MultiTaskEngine(self.tasks, settings.progress_settings())

    @property
    def head_names(self) -> list[str]:
        return list(self.spec.heads)

    @property
    def applied_updates(self) -> int:
        """Updates trained on, including those before the last restore."""
        return self._first_engine.applied_updates

    @applied_updates.setter
    def applied_updates(self, count: int) -> None:
        for engine in self.engine.engines.values():
            engine.applied_updates = count

    @property
    def progress(self) -> float:
        """Training progress t in [0, 1] for the next update, shared by the heads."""
        return self._first_engine.progress

    @property
    def _first_engine(self) -> Any:
        return next(iter(self.engine.engines.values()))

    def reset_dynamic_state(self) -> None:
        """Forget progress, smoothing targets and monitor history of every head."""
        self.engine = MultiTaskEngine(self.tasks, self.settings.progress_settings())

    def decode(self, payload: bytes) -> MultiHeadUpdate:
        """Decode and validate a payload, raising InvalidUpdate on any fault.

        A single-head payload (format version 1 or 2) is rejected with reason
        ``shape_mismatch``, because it has labels for one head only.
        """
        version = single_head_version(payload)
        if version is not None:
            raise InvalidUpdate(
                "shape_mismatch",
                f"payload is a single-head update (format version {version}), but "
                f"this student has the heads {', '.join(self.spec.heads)}; the hub "
                "must send format version 3 with one label set per head",
                payload_message_id(payload),
            )
        update = decode_multi_head_update(payload, self.limits)
        validate_multi_head_update(update, self.spec, sum_tolerance=self.sum_tolerance)
        return update

    def prepare(self, update: MultiHeadUpdate) -> dict[str, Targets]:
        """Compute every head's smoothed targets, hard labels and alpha."""
        probabilities = {}
        hard_labels = {}
        temperatures = {}
        for name, task in self.tasks.items():
            view = head_update(update, name)
            probabilities[name] = label_probabilities(view, task.temperature)
            hard_labels[name] = view.hard_labels
            temperatures[name] = view.temperature
        return self.engine.prepare(
            update.sample_ids,
            probabilities,
            update.teacher_round,
            hard_labels,
            temperatures,
        )

    def apply(self, update: MultiHeadUpdate) -> AppliedUpdate:
        """Train one step of all heads on a validated update."""
        started = time.perf_counter()
        targets = self.prepare(update)
        prepared = time.perf_counter()
        loss, _ = self.student.train_step(
            update.inputs, targets, self.engine.weights, self.settings.learning_rate
        )
        finished = time.perf_counter()
        self.engine.finish_update()
        prepare_ms = (prepared - started) * 1000
        train_ms = (finished - prepared) * 1000
        return _applied(update, targets, prepare_ms, loss, train_ms)

    def apply_many(
        self, updates: Sequence[MultiHeadUpdate], batch_size: int
    ) -> list[AppliedUpdate]:
        """Train on the samples of validated updates in steps of ``batch_size``.

        As ``Trainer.apply_many``: each update goes through the dynamic part
        in order and counts as applied right after, then the rows are trained
        in steps. Rows of updates whose head temperatures differ never share
        a step.
        """
        prepared = []
        for update in updates:
            started = time.perf_counter()
            targets = self.prepare(update)
            self.engine.finish_update()
            prepared.append((targets, (time.perf_counter() - started) * 1000))
        all_targets = [targets for targets, _ in prepared]
        losses, train_ms = self._train_rows(updates, all_targets, batch_size)
        return [
            _applied(update, targets, prepare_ms, losses[index], train_ms[index])
            for index, (update, (targets, prepare_ms)) in enumerate(
                zip(updates, prepared, strict=True)
            )
        ]

    def _train_rows(
        self,
        updates: Sequence[MultiHeadUpdate],
        targets: list[dict[str, Targets]],
        batch_size: int,
    ) -> tuple[list[float], list[float]]:
        """Run the steps of ``apply_many``; return loss and ms per update."""
        counts = [update.sample_count for update in updates]
        owner = np.repeat(np.arange(len(updates)), counts)
        x = np.concatenate([update.inputs for update in updates])
        joined = {name: _join([t[name] for t in targets]) for name in self.head_names}
        loss_sums = np.zeros(len(updates))
        train_ms = np.zeros(len(updates))
        for rows, temperatures in _step_rows(counts, targets, batch_size):
            step_targets = {
                name: _rows_of(joined[name], rows, temperatures[name])
                for name in self.head_names
            }
            started = time.perf_counter()
            loss, _ = self.student.train_step(
                x[rows], step_targets, self.engine.weights, self.settings.learning_rate
            )
            step_ms = (time.perf_counter() - started) * 1000
            rows_per_update = np.bincount(owner[rows], minlength=len(updates))
            loss_sums += rows_per_update * loss
            train_ms += rows_per_update * (step_ms / (rows.stop - rows.start))
        return (loss_sums / counts).tolist(), train_ms.tolist()

    def dynamic_metrics(self) -> dict[str, Any]:
        """Return shared progress and each head's ``SoftLabelEngine.snapshot``."""
        return {
            "progress": self.progress,
            "applied_updates": self.applied_updates,
            "heads": self.engine.snapshot(),
        }

    def teacher_snapshot(self) -> dict[str, Any]:
        """Return each head's teacher-monitor figures by head name."""
        return {
            name: engine.monitor.snapshot()
            for name, engine in self.engine.engines.items()
        }

    def checkpoint_content(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Return the weights and every head's smoothing store and monitor."""
        tensors = weight_tensors(self.student.get_weights())
        engine_tensors, state = self.engine.checkpoint_content()
        tensors.update(engine_tensors)
        state["applied_updates"] = self.applied_updates
        return tensors, state

    def restore(self, checkpoint: Checkpoint) -> None:
        """Load weights and each head's dynamic state from a checkpoint.

        Heads missing from the checkpoint keep fresh state.

        Raises:
            ValueError: the checkpoint's weights do not fit this student.
        """
        self.student.set_weights(checkpoint_weights(checkpoint))
        self.engine.restore(checkpoint.tensors, checkpoint.state)
        self.applied_updates = int(checkpoint.state.get("applied_updates", 0))


def single_head_version(payload: bytes) -> int | None:
    """Return 1 or 2 for a payload that starts like a single-head update."""
    if payload[: len(MAGIC)] != MAGIC or len(payload) <= len(MAGIC):
        return None
    version = payload[len(MAGIC)]
    return version if version in SUPPORTED_VERSIONS else None


def _applied(
    update: MultiHeadUpdate,
    targets: Mapping[str, Targets],
    prepare_ms: float,
    loss: float,
    train_ms: float,
) -> AppliedUpdate:
    """Summarise an update for metrics; alpha figures cover all heads."""
    alphas = np.concatenate([t.alpha for t in targets.values()])
    drifts = [t.batch_drift for t in targets.values() if t.batch_drift is not None]
    first = next(iter(targets.values()))
    return AppliedUpdate(
        message_id=update.message_id_hex,
        samples=update.sample_count,
        loss=loss,
        mean_alpha=float(alphas.mean()),
        prepare_ms=prepare_ms,
        train_ms=train_ms,
        dynamic_ms=sum(t.dynamic_ms for t in targets.values()),
        min_alpha=float(alphas.min()),
        max_alpha=float(alphas.max()),
        smoothing_lambda=max(t.smoothing_lambda for t in targets.values()),
        progress=first.progress,
        teacher_round=update.teacher_round,
        batch_drift=max(drifts) if drifts else None,
    )


def _join(targets: list[Targets]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate the soft, hard and alpha arrays of one head over updates."""
    return (
        np.concatenate([t.soft for t in targets]),
        np.concatenate([t.hard for t in targets]),
        np.concatenate([t.alpha for t in targets]),
    )


def _rows_of(
    joined: tuple[np.ndarray, np.ndarray, np.ndarray], rows: slice, temperature: float
) -> Targets:
    soft, hard, alpha = joined
    return Targets(
        soft=soft[rows],
        hard=hard[rows],
        alpha=alpha[rows],
        temperature=temperature,
        smoothing_lambda=0.0,
        progress=0.0,
        batch_drift=None,
        dynamic_ms=0.0,
    )


def _step_rows(
    counts: list[int], targets: list[dict[str, Targets]], batch_size: int
) -> list[tuple[slice, dict[str, float]]]:
    """Return (rows, temperature per head) of each step over joined updates."""
    steps = []
    start = 0
    index = 0
    while index < len(counts):
        # A run of consecutive updates whose heads share their temperatures.
        temperatures = {name: t.temperature for name, t in targets[index].items()}
        end = start
        while index < len(counts) and all(
            targets[index][name].temperature == value
            for name, value in temperatures.items()
        ):
            end += counts[index]
            index += 1
        for rows in batch_slices(end - start, batch_size):
            steps.append((slice(start + rows.start, start + rows.stop), temperatures))
        start = end
    return steps
