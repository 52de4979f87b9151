"""Model updates over the air: the daemon's side of a release switch.

``ModelSwitchMixin`` contains the ``EdgeDaemon`` methods that store release
chunks and switch to a complete release. The new model is prepared while
the old one keeps training. The old model's updates are checkpointed and
acknowledged before the switch, and a failed step keeps the old model.
"""

from __future__ import annotations

import json
import logging
import queue
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dslo_edge.bundle import Bundle
from dslo_edge.config import DeviceConfig
from dslo_edge.connection import MqttConnection
from dslo_edge.daemon_restore import restore_trainer
from dslo_edge.errors import BundleError, ConfigError
from dslo_edge.health import HealthGuard
from dslo_edge.inference import InferenceService
from dslo_edge.model_update import ModelUpdater, ReleaseCandidate
from dslo_edge.models import StudentModel, TeacherModel
from dslo_edge.multihead import MultiHeadTrainer
from dslo_edge.ota import OtaError, peek_transfer_id, state_write_error, status_payload
from dslo_edge.swap import KeptCheckpoints
from dslo_edge.trainer import Trainer

if TYPE_CHECKING:
    from dslo_edge.admission import Received

# The daemon's logger name, because tests capture these records by that name.
logger = logging.getLogger("dslo_edge.daemon")


# Transfers whose outcome was counted, kept so that the status of each later
# chunk of a rejected transfer does not count it again.
COUNTED_TRANSFERS = 64


class ModelUpdateOutcomes:
    """Counts of model update transfers by outcome, for the metrics.

    Each transfer counts once, although the device publishes a status for
    every chunk of a rejected one. A chunk without a readable transfer id
    counts on its own.
    """

    def __init__(self) -> None:
        self.installed = 0
        self.rejected: Counter[str] = Counter()
        self.rolled_back: Counter[str] = Counter()
        self._counted: deque[tuple[str, str]] = deque(maxlen=COUNTED_TRANSFERS)

    def record(self, status: str) -> bool:
        """Count the outcome in a status message of ``ota.status_payload``.

        Returns whether a count changed.
        """
        document = json.loads(status)
        state, transfer = document["state"], document["transfer"]
        if state == "receiving":
            return False
        if transfer is not None:
            if (state, transfer) in self._counted:
                return False
            self._counted.append((state, transfer))
        reason = str(document["reason"])
        if state == "installed":
            self.installed += 1
        elif state == "rejected":
            self.rejected[reason] += 1
        else:
            self.rolled_back[reason] += 1
        return True

    def report(self) -> dict[str, object]:
        """Return the counts as the metrics' ``model_updates``."""
        return {
            "installed": self.installed,
            "rejected": dict(self.rejected),
            "rolled_back": dict(self.rolled_back),
        }


@dataclass(frozen=True)
class _ModelState:
    """The model the daemon trains: bundle, student, trainer and health guard.

    ``reference`` is the bundle's teacher that label requests compare the
    student with, or None when the request rule does not use it.
    """

    bundle: Bundle
    student: StudentModel
    trainer: Trainer | MultiHeadTrainer
    health: HealthGuard
    reference: TeacherModel | None


class ModelSwitchMixin:
    """Methods of ``EdgeDaemon`` that install a release sent over the air."""

    # Attributes that EdgeDaemon.__init__ sets, declared for type checking.
    config: DeviceConfig
    device_id: str
    bundle: Bundle
    student: StudentModel
    trainer: Trainer | MultiHeadTrainer
    health: HealthGuard
    connection: MqttConnection
    inference: InferenceService
    updater: ModelUpdater
    ota_chunks: queue.Queue[Received]
    ota_status_topic: str
    model_updates: ModelUpdateOutcomes
    _metrics_pending: bool
    _storage_failure: OSError | None
    _pending_rollback: str | None
    _unsaved: int

    if TYPE_CHECKING:
        # Defined by EdgeDaemon and CheckpointsMixin.
        @property
        def checkpoint_dir(self) -> Path: ...

        def _check_requests_fit(self, bundle: Bundle) -> None: ...

        def _new_trainer(
            self, student: StudentModel | None = None
        ) -> Trainer | MultiHeadTrainer: ...

        def _new_health_guard(self, bundle: Bundle | None = None) -> HealthGuard: ...

        def _new_reference(self, bundle: Bundle) -> TeacherModel | None: ...

        def _check_health(self) -> bool: ...

        def _checkpoint_and_ack(self) -> None: ...

        def save_checkpoint(self) -> bool: ...

    def _apply_model_updates(self) -> None:
        while not self.ota_chunks.empty():
            item = self.ota_chunks.get_nowait()
            try:
                status = self._handle_ota_chunk(item.payload)
            except Exception as error:
                logger.exception(
                    "Device %s failed to handle a model update chunk", self.device_id
                )
                status = status_payload(
                    "rejected",
                    peek_transfer_id(item.payload),
                    reason="install_failed",
                    detail=f"{type(error).__name__}: {error}",
                )
            # Every chunk is acknowledged, whatever the outcome. Its data is on
            # disk or its transfer is finished, and a redelivered copy would
            # only fail the same way again. A chunk from an earlier connection
            # was sent again on this one, whose copy gets the PUBACK. A second
            # PUBACK could confirm a later message that reused the packet id.
            if item.connection == self.connection.connects:
                self.connection.ack(item.mid, item.qos)
            # A transfer that this chunk's transfer replaced gets its outcome
            # first, so the retained status ends with this chunk's.
            statuses = self.updater.replaced_statuses()
            if status is not None:
                statuses.append(status)
            for outcome in statuses:
                self._publish_ota_status(outcome)

    def _publish_ota_status(self, status: str) -> None:
        if self.model_updates.record(status):
            # Published when the trainer is next idle.
            self._metrics_pending = True
        # Retained, so a client that subscribes later still reads the outcome.
        self.connection.publish(self.ota_status_topic, status, retain=True)

    def _handle_ota_chunk(self, payload: bytes) -> str | None:
        """Store one chunk and switch models once a release is complete.

        Returns:
            The OTA status to publish, or None while the transfer goes on.
        """
        outcome = self.updater.handle_chunk(
            payload, self.student, self._check_health_before_switch
        )
        candidate = outcome.candidate
        if candidate is None:
            return outcome.status
        try:
            prepared = self._prepare_model(candidate)
        except Exception as error:
            if not isinstance(error, (ConfigError, BundleError, ValueError)):
                logger.exception(
                    "Device %s cannot prepare release %s",
                    self.device_id,
                    candidate.release.name,
                )
            return self.updater.reject(candidate, error)
        return self._switch_model(candidate, prepared)

    def _check_health_before_switch(self) -> None:
        """Roll back harmful updates before a new release copies the weights.

        Raises:
            OtaError: ``health_check`` while a rollback waits for readable
                checkpoints, because the weights are still the harmful ones.
        """
        if self._unsaved or self._pending_rollback is not None:
            self._check_health()
        if self._pending_rollback is not None:
            raise OtaError(
                "health_check",
                f"the running student failed its health check "
                f"({self._pending_rollback}) and waits to roll back until its "
                "checkpoints can be read; make them readable, then send the "
                "release again",
            )

    def _prepare_model(self, candidate: ReleaseCandidate) -> _ModelState:
        """Build the trainer, health guard and reference of a candidate.

        Nothing of the running model changes.

        Raises:
            ConfigError: the device config does not fit the new model, for
                example a task table names a head that it lacks.
            BundleError: the release's probe set is invalid, or its teacher
                cannot be loaded as the label request reference.
        """
        bundle, student = candidate.bundle, candidate.student
        self._check_requests_fit(bundle)
        old = self.trainer
        trainer = self._new_trainer(student)
        restored = False
        if candidate.model_changed:
            trainer, restored = self._restore_kept_checkpoint(bundle, trainer)
        # A restored engine is the new model's own, and the old engine stays
        # untouched, so a failed switch keeps the old trainer as it was.
        if not restored and _same_labels(trainer, old):
            # Smoothing store, monitor and progress stay valid for the same classes.
            trainer.engine = old.engine  # type: ignore[assignment]
        else:
            trainer.applied_updates = old.applied_updates
        health = self._new_health_guard(bundle)
        health.accuracy(student)
        health.accept(student.get_weights())
        # The old bundle's teacher may take other inputs or give other classes.
        reference = self._new_reference(bundle)
        return _ModelState(bundle, student, trainer, health, reference)

    def _switch_model(self, candidate: ReleaseCandidate, prepared: _ModelState) -> str:
        """Make a prepared model current and return the status to publish.

        The old model's updates are checkpointed and acknowledged first, and
        after a model change its last checkpoint is kept. If a step fails,
        the old model stays current and the ``active`` link is rolled back.
        """
        old = _ModelState(
            self.bundle,
            self.student,
            self.trainer,
            self.health,
            self.inference.reference,
        )
        # None until ``activate`` ran, then whether it changed the link.
        activated: bool | None = None
        try:
            self._checkpoint_and_ack()
            self._checkpoint_and_ack()
            if candidate.model_changed:
                self._keep_old_checkpoint()
            activated = self.updater.activate(candidate)
            self._set_model(prepared)
            # Without a checkpoint of the new model, a restart would load the
            # new bundle with the old weights, so a failed save undoes the switch.
            if not self.save_checkpoint():
                assert self._storage_failure is not None
                raise state_write_error(
                    self._storage_failure,
                    f"write a checkpoint of release {candidate.release.name} to "
                    f"{self.checkpoint_dir}",
                    self.checkpoint_dir,
                )
            self.updater.accept(candidate)
        except Exception as error:
            self._set_model(old)
            if activated is None:
                return self.updater.reject(candidate, error)
            return self.updater.roll_back(candidate, activated, error)
        # Two generations of the new model, so no older one is ever restored.
        self.save_checkpoint()
        logger.info("Device %s now trains %s", self.device_id, candidate.release.name)
        return self.updater.installed(candidate)

    def _set_model(self, state: _ModelState) -> None:
        self.bundle = state.bundle
        self.student = state.student
        self.trainer = state.trainer
        self.health = state.health
        self.inference.reference = state.reference

    def _keep_old_checkpoint(self) -> None:
        kept = KeptCheckpoints(self.config.state_dir)
        try:
            copy = kept.keep(self.bundle, self.checkpoint_dir)
        except OSError as error:
            raise state_write_error(
                error,
                f"keep the last checkpoint of {self.bundle.path.name} in {kept.folder}",
                kept.folder,
            ) from error
        if copy is None:
            logger.info(
                "Device %s has no checkpoint of %s to keep before the model change",
                self.device_id,
                self.bundle.path.name,
            )
        else:
            logger.info(
                "Device %s kept the last checkpoint of %s in %s",
                self.device_id,
                self.bundle.path.name,
                copy,
            )

    def _restore_kept_checkpoint(
        self, bundle: Bundle, trainer: Trainer | MultiHeadTrainer
    ) -> tuple[Trainer | MultiHeadTrainer, bool]:
        """Restore the checkpoint kept for ``bundle`` into a new trainer.

        Returns:
            The trainer to use and whether it restored a kept checkpoint.
        """
        checkpoint = KeptCheckpoints(self.config.state_dir).load(bundle)
        if checkpoint is None:
            return trainer, False
        loaded = trainer.student.get_weights()
        try:
            restore_trainer(trainer, checkpoint)
        except ValueError as error:
            logger.warning(
                "Device %s cannot restore the kept checkpoint %s: %s; starting "
                "from the weights carried over from the old model and the "
                "bundle's own weights for the rest",
                self.device_id,
                checkpoint.path,
                error,
            )
            # The checkpoint's weights may have loaded before a later part
            # failed, so the student gets back the weights it was loaded with.
            trainer.student.set_weights(loaded)
            return self._new_trainer(trainer.student), False
        logger.info(
            "Device %s restored the kept checkpoint %s", self.device_id, checkpoint.path
        )
        return trainer, True


def _same_labels(
    trainer: Trainer | MultiHeadTrainer, other: Trainer | MultiHeadTrainer
) -> bool:
    """Return True when both trainers take labels of the same heads and classes."""
    if isinstance(trainer, MultiHeadTrainer) or isinstance(other, MultiHeadTrainer):
        return (
            isinstance(trainer, MultiHeadTrainer)
            and isinstance(other, MultiHeadTrainer)
            and dict(trainer.spec.heads) == dict(other.spec.heads)
        )
    return trainer.spec.class_count == other.spec.class_count
