"""Health checks, rollback, checkpoint saves and acknowledgements of the daemon.

``CheckpointsMixin`` contains the ``EdgeDaemon`` methods for these steps. A
student that got worse is rolled back to its last checkpoint, and the ids of
the updates that the rollback dropped are recorded. Updates are left for the
broker to deliver again. Checkpoints are written, and the PUBACKs that two
checkpoint generations allow are sent.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dslo_edge.admission import AckLedger
from dslo_edge.applied_ids import AppliedIds
from dslo_edge.bundle import Bundle
from dslo_edge.checkpoint import Checkpoint, load_latest_checkpoint, save_checkpoint
from dslo_edge.config import DeviceConfig
from dslo_edge.connection import MqttConnection
from dslo_edge.costs import AdaptationCosts
from dslo_edge.daemon_restore import APPLIED_IDS
from dslo_edge.dropped_ids import DroppedIds
from dslo_edge.errors import ConfigError
from dslo_edge.health import HealthGuard
from dslo_edge.metrics import DaemonMetrics
from dslo_edge.models import StudentModel
from dslo_edge.multihead import MultiHeadTrainer
from dslo_edge.push_progress import counted
from dslo_edge.trainer import Trainer

# The daemon's logger name, because tests capture these records by that name.
logger = logging.getLogger("dslo_edge.daemon")


class CheckpointsMixin:
    """Methods of ``EdgeDaemon`` that roll back, save checkpoints and send PUBACKs."""

    # Attributes that EdgeDaemon.__init__ sets, declared for type checking.
    config: DeviceConfig
    device_id: str
    bundle: Bundle
    student: StudentModel
    trainer: Trainer | MultiHeadTrainer
    health: HealthGuard
    metrics: DaemonMetrics
    costs: AdaptationCosts
    connection: MqttConnection
    applied_ids: AppliedIds
    dropped_ids: DroppedIds
    storage_error: str | None
    _storage_failure: OSError | None
    checkpoints_written: int
    rollbacks: int
    last_rollback: str | None
    _pending_rollback: str | None
    _deferred_since_reconnect: bool
    _session_epoch: int
    _acks: AckLedger
    _restored_unconfirmed: bool
    _newest_saved: str | None
    _unsaved: int
    _unsaved_ids: list[bytes]
    _dropped_ids_failed: bool
    _reserve_failed: bool
    _changed_since_save: bool
    _since_probe: int

    if TYPE_CHECKING:
        # Defined by EdgeDaemon and RestoreMixin.
        @property
        def checkpoint_dir(self) -> Path: ...

        @property
        def unacknowledged(self) -> int: ...

        def _new_trainer(
            self, student: StudentModel | None = None
        ) -> Trainer | MultiHeadTrainer: ...

        def publish_metrics(self, busy: bool = False) -> None: ...

        def _check_checkpoints_readable(self) -> None: ...

        def _restore_checkpoint(self, checkpoint: Checkpoint) -> Checkpoint | None: ...

    def _check_health(self) -> bool:
        """Roll back to the last checkpoint if the student got worse.

        Returns:
            True when the student is healthy and may be saved.
        """
        self._since_probe = 0
        problem = self._pending_rollback or self.health.problem(
            self.student, self.student.get_weights()
        )
        if problem is None:
            return True
        try:
            checkpoint = self._latest_for_rollback()
        except (ConfigError, OSError) as error:
            self._postpone_rollback(problem, error)
            return False
        if self._pending_rollback is not None:
            logger.info(
                "Device %s can read its checkpoints again and rolls back",
                self.device_id,
            )
            self._pending_rollback = None
            self.storage_error = None
        self.rollbacks += 1
        self.last_rollback = problem
        # The last loss is the dropped update's, and the restored weights have
        # none of their own until the next update trains them.
        self.metrics.forget_loss()
        restored = None
        if checkpoint is None:
            self._reset_to_bundle_weights()
        else:
            # The generation before the newest contains every acknowledged
            # update, so it is tried before the bundle's own weights.
            restored = self._restore_checkpoint(checkpoint)
        if restored is None:
            # No update is in the bundle's weights, so none may be rejected
            # as a duplicate when the broker delivers it again.
            self.applied_ids = AppliedIds(self.config.training.applied_id_capacity)
        self._record_dropped()
        target = "the factory weights" if restored is None else restored.path.name
        logger.error(
            "Device %s rolled back to %s: %s; dropped %s applied since the "
            "last checkpoint",
            self.device_id,
            target,
            problem,
            counted(self._unsaved, "update"),
        )
        # The restored weights, not the rejected ones, are the baseline of
        # the next check.
        self.health.accuracy(self.student)
        self.health.accept(self.student.get_weights())
        # The dropped updates are acknowledged: sending them again would
        # repeat the harm. The others waiting for acknowledgement may be in
        # the restored generation only, so it is saved once more first.
        self._unsaved = 0
        if self._newest_saved is not None and target != self._newest_saved:
            self._redeliver_saved_once(target)
        if restored is None or self.save_checkpoint():
            self._send_acks(self._acks.release_all())
        self.publish_metrics()
        return False

    def _record_dropped(self) -> None:
        """Write the ids of the dropped updates durably, before any acknowledgement.

        Their acknowledgements wait for the save after the rollback. If the
        daemon stops before then, the broker delivers them again, and the
        restored checkpoint lacks their ids, so the record rejects them.
        """
        dropped, self._unsaved_ids = self._unsaved_ids, []
        if dropped:
            self._write_dropped_ids(dropped)

    def _write_dropped_ids(self, dropped: list[bytes]) -> None:
        """Add ids to the record of dropped updates and write it; log a failure."""
        try:
            released = self.dropped_ids.record(dropped)
        except OSError as error:
            # NOTE: this fails on a full disk when the reserve file is missing
            # or too small. Until a later save writes the record, a crash lets
            # the broker deliver the dropped updates again, and they are
            # applied and rolled back once more.
            if not self._dropped_ids_failed:
                logger.error(
                    "Device %s cannot write its record of dropped updates %s: "
                    "%s; each later checkpoint tries again, and until then a "
                    "restart may apply the dropped updates again",
                    self.device_id,
                    self.dropped_ids.path,
                    error,
                )
            self._dropped_ids_failed = True
            return
        if released:
            logger.warning(
                "Device %s found the disk full and wrote its record of dropped "
                "updates %s into the space reserved for it; the next checkpoint "
                "saved reserves the space again",
                self.device_id,
                self.dropped_ids.path,
            )
        if self._dropped_ids_failed:
            logger.info(
                "Device %s wrote its record of dropped updates again", self.device_id
            )
        self._dropped_ids_failed = False

    def _reserve_for_dropped_ids(self) -> None:
        """Keep free blocks for the record of dropped updates; log a failure once."""
        try:
            self.dropped_ids.reserve()
        except OSError as error:
            if not self._reserve_failed:
                logger.warning(
                    "Device %s cannot reserve %d bytes for its record of dropped "
                    "updates in %s: %s; on a full disk a rollback may then fail "
                    "to write the record. It tries again after each checkpoint",
                    self.device_id,
                    self.dropped_ids.reserved_bytes(),
                    self.dropped_ids.reserve_path,
                    error,
                )
            self._reserve_failed = True
            return
        if self._reserve_failed:
            logger.info(
                "Device %s reserved the space for its record of dropped updates",
                self.device_id,
            )
        self._reserve_failed = False

    def _redeliver_saved_once(self, target: str) -> None:
        """Leave the updates that ``target`` may lack for the broker to send again.

        The rollback restored ``target``, a generation older than the last one
        saved or the factory weights, because the last one saved could not
        be read or restored. The updates saved
        once are in that newest generation only, and so may be the first
        copies of updates rejected since as duplicates. Acknowledging either
        would lose those updates. The idle loop reconnects, and the broker
        then delivers them again.
        """
        forgotten = self._acks.forget_for_older_generation()
        if not forgotten:
            return
        self._deferred_since_reconnect = True
        logger.warning(
            "Device %s restored %s, which may lack %s saved only in %s or "
            "rejected as duplicates since; they stay unacknowledged and it "
            "reconnects to receive them again",
            self.device_id,
            target,
            counted(forgotten, "update"),
            self._newest_saved,
        )

    def _latest_for_rollback(self) -> Checkpoint | None:
        """Return the newest checkpoint that reads back intact, or None.

        Raises:
            ConfigError: the daemon's user may not list the checkpoints or
                read one of them. Such a checkpoint is not damaged, so the
                rollback must not skip it for an older one or the factory
                weights.
            OSError: listing the checkpoints failed for another reason.
        """
        self._check_checkpoints_readable()
        # Unreadable generations are renamed, as at start, because the save
        # after the rollback would otherwise count one as a generation and
        # prune the one it restores.
        return load_latest_checkpoint(self.checkpoint_dir, quarantine=True)

    def _postpone_rollback(self, problem: str, error: Exception) -> None:
        """Keep the unhealthy student unsaved until its checkpoints can be read.

        Training waits and the updates since the last checkpoint stay
        unacknowledged, so the broker keeps them while the train loop retries.
        """
        if isinstance(error, OSError):
            cause = f"{type(error).__name__}: {error.strerror or error}"
        else:
            # Drop the config file name that starts a ConfigError's message.
            cause = str(error).removeprefix(f"{self.config.source}: ")
        if self._pending_rollback is None:
            logger.error(
                "Device %s cannot roll back (%s): %s; training waits and the "
                "updates since the last checkpoint stay unacknowledged until "
                "the checkpoints can be read",
                self.device_id,
                problem,
                cause,
            )
            self._pending_rollback = problem
            self.storage_error = f"rollback waits: {cause}"
            self.publish_metrics()

    def _reset_to_bundle_weights(self) -> None:
        """Give the student the bundle's weights and a new trainer."""
        self.student.set_weights(self._factory_weights())
        self.trainer = self._new_trainer()

    def _factory_weights(self) -> dict[str, Any]:
        return StudentModel(self.bundle, self.config.runtime).get_weights()

    def _checkpoint_and_ack(self) -> None:
        """Write a checkpoint, then acknowledge what two generations now hold."""
        if not self.unacknowledged and not self._unsaved:
            return
        if self._unsaved and not self._check_health():
            return
        if self.save_checkpoint():
            self._send_acks(self._acks.saved())

    def _send_acks(self, acks: list[tuple[int, int, int]]) -> None:
        for mid, qos, epoch in acks:
            # Packet ids of an earlier broker session may now name other messages.
            if epoch == self._session_epoch:
                self.connection.ack(mid, qos)

    def save_checkpoint(self) -> bool:
        """Write a checkpoint of weights, adaptation state and applied ids."""
        tensors, state = self.trainer.checkpoint_content()
        tensors[APPLIED_IDS] = self.applied_ids.to_array()
        # Rejections since this checkpoint are redelivered and counted again
        # after a crash, so restored counters count each update once.
        state["rejected"] = self.metrics.rejected_counts()
        state["device_id"] = self.device_id
        state["energy_spent"] = {
            "saved_at": time.time(),
            "minutes": self.costs.policy.saved_spending(),
        }
        try:
            path = save_checkpoint(self.checkpoint_dir, tensors, state)
        except OSError as error:
            self._storage_failure = error
            if self.storage_error is None:
                logger.error(
                    "Device %s cannot write checkpoints to %s: %s; updates stay "
                    "unacknowledged and the next save tries again",
                    self.device_id,
                    self.checkpoint_dir,
                    error,
                )
            self.storage_error = f"{type(error).__name__}: {error.strerror or error}"
            return False
        if self.storage_error is not None:
            logger.info("Device %s can write checkpoints again", self.device_id)
        self.storage_error = None
        self._unsaved = 0
        self._unsaved_ids.clear()
        self._changed_since_save = False
        self._restored_unconfirmed = False
        self._newest_saved = path.name
        self.checkpoints_written += 1
        self.health.accept()
        if self.dropped_ids.unwritten:
            # Before the callers acknowledge the dropped updates.
            self._write_dropped_ids([])
        self._reserve_for_dropped_ids()
        logger.debug("Device %s saved %s", self.device_id, path.name)
        return True
