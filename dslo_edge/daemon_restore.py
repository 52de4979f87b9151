"""Restoring the daemon's state from its checkpoints at start-up.

``RestoreMixin`` contains the ``EdgeDaemon`` methods that load the newest
checkpoint generation, fall back to the one before it or to the bundle's own
weights, and move checkpoints that do not restore out of the checkpoints
folder. The rollback in ``dslo_edge.daemon_checkpoints`` reuses them.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dslo_edge.applied_ids import AppliedIds
from dslo_edge.bundle import Bundle
from dslo_edge.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_latest_checkpoint,
    load_older_checkpoint,
    move_file,
    move_generations,
    rename_aside,
)
from dslo_edge.config import DeviceConfig
from dslo_edge.costs import AdaptationCosts
from dslo_edge.dropped_ids import DroppedIds
from dslo_edge.errors import ConfigError
from dslo_edge.health import HealthGuard
from dslo_edge.metrics import DaemonMetrics
from dslo_edge.models import StudentModel
from dslo_edge.multihead import MultiHeadTrainer
from dslo_edge.state_folders import CHECKPOINTS
from dslo_edge.trainer import Trainer

# The daemon's logger name, because tests capture these records by that name.
logger = logging.getLogger("dslo_edge.daemon")

APPLIED_IDS = "applied_ids"
# Folder of state_dir for checkpoints that do not restore at start-up or rollback.
MISMATCHED_CHECKPOINTS = "mismatched-checkpoints"
# Suffix of a checkpoint that does not restore and cannot be moved to that folder.
MISMATCHED_SUFFIX = ".mismatched"


def restore_trainer(
    trainer: Trainer | MultiHeadTrainer, checkpoint: Checkpoint
) -> None:
    """Restore ``checkpoint`` into ``trainer``.

    Raises:
        ValueError: the checkpoint does not fit the bundle or the config, or
            a value in its state has the wrong type.
    """
    try:
        trainer.restore(checkpoint)
    except (TypeError, KeyError, AttributeError) as error:
        # The state's checksum matched, so the writer put a wrong value there.
        # Callers fall back as for any other checkpoint that does not fit.
        raise ValueError(
            f"invalid state in {checkpoint.path.name} ({type(error).__name__}: {error})"
        ) from error


class RestoreMixin:
    """Methods of ``EdgeDaemon`` that restore its checkpoints and ids at start-up."""

    # Attributes that EdgeDaemon.__init__ sets, declared for type checking.
    config: DeviceConfig
    device_id: str
    bundle: Bundle
    student: StudentModel
    trainer: Trainer | MultiHeadTrainer
    health: HealthGuard
    metrics: DaemonMetrics
    costs: AdaptationCosts
    applied_ids: AppliedIds
    dropped_ids: DroppedIds
    restored_from: str
    _restored_unconfirmed: bool
    _newest_saved: str | None

    if TYPE_CHECKING:
        # Defined by EdgeDaemon and CheckpointsMixin.
        @property
        def checkpoint_dir(self) -> Path: ...

        def _check_state_folders(self, *names: str) -> None: ...

        def _reset_to_bundle_weights(self) -> None: ...

        def _reserve_for_dropped_ids(self) -> None: ...

    def _restore(self) -> None:
        self._check_state_folders(CHECKPOINTS)
        folder = self.checkpoint_dir
        self._check_checkpoints_readable()
        generations = len(list_checkpoints(folder))
        checkpoint = load_latest_checkpoint(self.checkpoint_dir, quarantine=True)
        if checkpoint is None and generations:
            logger.warning(
                "Device %s could read none of its %d checkpoints in %s (renamed "
                "to *.corrupt); it starts from the factory weights",
                self.device_id,
                generations,
                self.checkpoint_dir,
            )
        elif checkpoint is None:
            logger.info("Device %s starts from the factory weights", self.device_id)
        else:
            self._check_owner(checkpoint)
            restored = self._restore_checkpoint(checkpoint)
            if restored is not None:
                self.metrics.restore_rejected(restored.state.get("rejected", {}))
                self._restore_energy_spent(restored.state.get("energy_spent"))
                self.restored_from = restored.path.name
                self._restored_unconfirmed = True
                self._newest_saved = restored.path.name
                logger.info(
                    "Device %s restored %s (%d updates applied before)",
                    self.device_id,
                    restored.path.name,
                    self.trainer.applied_updates,
                )
        self._load_dropped_ids()
        self._reserve_for_dropped_ids()
        self.health.accuracy(self.student)
        self.health.accept(self.student.get_weights())

    def _restore_energy_spent(self, saved: Any) -> None:
        """Count the training energy of the hour before the restart as spent."""
        if not isinstance(saved, dict):
            return
        saved_at = saved.get("saved_at")
        if not isinstance(saved_at, int | float) or not math.isfinite(saved_at):
            return
        since_save = time.time() - saved_at
        self.costs.policy.restore_spending(saved.get("minutes"), since_save)

    def _load_dropped_ids(self) -> None:
        """Read the ids of updates that earlier rollbacks dropped."""
        try:
            self.dropped_ids.load()
        except OSError as error:
            logger.warning(
                "Device %s cannot read its record of dropped updates %s: %s; "
                "copies of updates that a rollback dropped may be applied again",
                self.device_id,
                self.dropped_ids.path,
                error,
            )

    def _check_checkpoints_readable(self) -> None:
        """Raise ConfigError when the daemon's user may not read the checkpoints.

        Such a file is not damaged, so it must not be renamed to ``*.corrupt``
        and given up for the factory weights. One cause is a daemon
        that now runs as another user than the one that wrote the files.
        """
        try:
            generations = list_checkpoints(self.checkpoint_dir)
        except PermissionError:
            raise ConfigError(
                f"{self.config.source}: the daemon's user may not list the "
                f"checkpoints folder {self.checkpoint_dir} (permission denied); "
                "give that user read and write access to device.state_dir "
                f"{self.config.state_dir}, for example with chown -R, or run the "
                "daemon as the user that wrote the checkpoints"
            ) from None
        denied = []
        for _, path in generations:
            # A directory, FIFO or dangling symlink in place of a file is
            # damage, which the restore renames to *.corrupt. Opening a FIFO
            # would block until a writer opens it.
            if not path.is_file():
                continue
            try:
                with open(path, "rb"):
                    pass
            except PermissionError:
                denied.append(path.name)
            except OSError:
                continue
        if denied:
            raise ConfigError(
                f"{self.config.source}: the daemon's user may not read "
                f"{', '.join(denied)} in {self.checkpoint_dir} (permission denied); "
                "give that user read and write access to device.state_dir "
                f"{self.config.state_dir}, for example with chown -R, or run the "
                "daemon as the user that wrote the checkpoints"
            )

    def _check_owner(self, checkpoint: Checkpoint) -> None:
        """Raise ConfigError when another device wrote ``checkpoint``."""
        owner = checkpoint.state.get("device_id")
        # Checkpoints written before the device id was saved have none.
        if owner is not None and owner != self.device_id:
            raise ConfigError(
                f"{self.config.source}: device.state_dir {self.config.state_dir} "
                f"holds checkpoints of device {owner!r}, but this config is for "
                f"{self.device_id!r}; give each device its own state_dir, or "
                f"set device.id = {owner!r} if the device was renamed"
            )

    def _restore_checkpoint(self, checkpoint: Checkpoint) -> Checkpoint | None:
        """Restore ``checkpoint``, else the generation before it.

        Returns:
            The restored checkpoint, or None when neither restores and the
            daemon starts from the bundle's own weights.
        """
        try:
            self._load(checkpoint)
        except ValueError as error:
            return self._restore_older(checkpoint, error)
        return checkpoint

    def _restore_older(
        self, newest: Checkpoint, error: ValueError
    ) -> Checkpoint | None:
        """Restore the generation before ``newest``, which failed with ``error``.

        A newest generation that reads back intact but does not restore,
        while the one before it does, was written wrongly or edited. It is
        moved out of the checkpoints folder. Every update acknowledged to the
        broker is in both, because acknowledgements wait for two generations.
        When the one before does not restore either, the checkpoints do not
        fit the bundle or the config, and ``_start_from_bundle_weights`` handles them.

        Returns:
            The restored checkpoint, or None when the daemon starts from the
            bundle's own weights.
        """
        older = self._older_of_this_device(newest.sequence)
        if older is not None and not self._load_older(older, newest):
            older = None
        if older is None:
            self._start_from_bundle_weights(newest, error)
            return None
        logger.warning(
            "Device %s cannot restore its newest checkpoint %s (%s) and restores "
            "%s instead; %s",
            self.device_id,
            newest.path.name,
            error,
            older.path.name,
            self._set_aside_newest(newest),
        )
        return older

    def _older_of_this_device(self, sequence: int) -> Checkpoint | None:
        """Return the newest readable generation before ``sequence`` of this device.

        A generation that another device wrote is set aside on its own, so it
        is neither restored nor moved along with this device's generations.
        Unreadable generations are quarantined, because pruning counts every
        generation left in the folder and would delete the restored one first.
        """
        while True:
            older = load_older_checkpoint(
                self.checkpoint_dir, sequence, quarantine=True
            )
            if older is None:
                return None
            owner = older.state.get("device_id")
            # Checkpoints written before the device id was saved have none.
            if owner is None or owner == self.device_id:
                return older
            logger.warning(
                "Device %s does not restore %s, which device %r wrote; %s",
                self.device_id,
                older.path.name,
                owner,
                self._set_aside(older, "it", ""),
            )
            sequence = older.sequence

    def _load_older(self, older: Checkpoint, newest: Checkpoint) -> bool:
        """Load ``older`` in place of ``newest``, or log why it cannot be used."""
        # The failed load may have set some of the newest's weights.
        self._reset_to_bundle_weights()
        try:
            self._load(older)
        except ValueError as error:
            logger.warning(
                "Device %s cannot restore %s, the generation before %s, either (%s)",
                self.device_id,
                older.path.name,
                newest.path.name,
                error,
            )
            return False
        return True

    def _set_aside_newest(self, newest: Checkpoint) -> str:
        """Move ``newest`` out of the generations and describe where it went.

        Pruning counts every generation in the checkpoints folder, so a newest
        left there would make the next save delete the restored one.
        """
        return self._set_aside(
            newest, "the newest", " and the next save deletes the restored one"
        )

    def _set_aside(self, checkpoint: Checkpoint, noun: str, if_left: str) -> str:
        """Move one checkpoint out of the checkpoints folder; describe where it went.

        ``noun`` names the generation in the description, and ``if_left``
        ends it when the generation stays in the checkpoints folder.
        """
        destination = self.config.state_dir / MISMATCHED_CHECKPOINTS
        try:
            return f"moved {noun} to {move_file(checkpoint.path, destination)}"
        except OSError as error:
            move_error = error
        # Renaming in the same folder needs no new directory, so it still
        # works when, for example, the disk is too full to create one.
        try:
            renamed = rename_aside(checkpoint.path, MISMATCHED_SUFFIX)
        except OSError as rename_error:
            return (
                f"moving {noun} to {destination} failed ({move_error}) and "
                f"renaming it failed ({rename_error}), so it stays in "
                f"{self.checkpoint_dir}{if_left}"
            )
        return (
            f"renamed {noun} to {renamed.name} because moving it to "
            f"{destination} failed ({move_error})"
        )

    def _start_from_bundle_weights(
        self, checkpoint: Checkpoint, error: ValueError
    ) -> None:
        """Start from the bundle's weights after ``checkpoint`` failed to load."""
        # A model update switched the bundle before its first checkpoint,
        # device.bundle now names another model, or a capacity was lowered.
        logger.warning(
            "Device %s cannot use %s with bundle %s (%s); starting from the "
            "bundle's own weights",
            self.device_id,
            checkpoint.path.name,
            self.bundle.path.name,
            error,
        )
        # The weights may have loaded before a later part of the
        # checkpoint failed, so the student and trainer start over.
        self._reset_to_bundle_weights()
        self._set_aside_checkpoints()

    def _set_aside_checkpoints(self) -> None:
        """Move checkpoints that do not load where pruning cannot delete them.

        They may belong to another model, or to this one under a config that
        lowered a capacity below what they contain.
        """
        destination = self.config.state_dir / MISMATCHED_CHECKPOINTS
        try:
            moved = move_generations(self.checkpoint_dir, destination)
        except OSError as error:
            logger.warning(
                "Device %s cannot move the checkpoints it cannot load out of "
                "%s (%s); the next checkpoints will replace them",
                self.device_id,
                self.checkpoint_dir,
                error,
            )
            return
        logger.warning(
            "Device %s moved the checkpoints it cannot load to %s; to use them "
            "again, stop the daemon, undo the cause logged above (another "
            "device.bundle or a lower capacity) and swap those files with the "
            "ones in %s",
            self.device_id,
            moved,
            self.checkpoint_dir,
        )

    def _load(self, checkpoint: Checkpoint) -> None:
        """Restore ``checkpoint`` into the trainer and the applied ids.

        Raises:
            ValueError: the checkpoint does not fit the bundle or the config,
                or a value in its state has the wrong type.
        """
        restore_trainer(self.trainer, checkpoint)
        if APPLIED_IDS in checkpoint.tensors:
            self.applied_ids = AppliedIds.from_array(
                checkpoint.tensors[APPLIED_IDS],
                self.config.training.applied_id_capacity,
            )
