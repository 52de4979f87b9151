"""Over-the-air model updates, applied by the daemon's trainer thread.

Chunks arrive on ``dslo/<device>/ota``, and ``OtaReceiver`` assembles and
verifies them in the state directory. A complete archive is unpacked into
its own release (``BundleStore``). The new student gets every weight whose
name and shape match the adapted one, and a health check on it decides
whether the release becomes a ``ReleaseCandidate``. The daemon then builds
the trainer and health guard for the candidate and activates the release
only once they are ready (``ModelUpdater.activate``). A candidate that the
daemon cannot run is discarded (``ModelUpdater.reject``), so the ``active``
link, the weights and the checkpoints stay as they were.

A release whose input shape, classes or heads differ from the running
model's is rejected (``model_mismatch``), because its updates would not fit
and the adapted weights would be lost. So is a release whose student lacks
a weight of the running one or has it in another shape, such as a wider
hidden layer, because that weight's adapted values would be lost. The
sender may allow either in the release options (``ota-send
--allow-model-change``), and the daemon then keeps the old model's last
checkpoint in ``kept-checkpoints/``. The outcome is
published, retained, on ``dslo/<device>/ota/status``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dslo_edge.bundle import Bundle, load_bundle
from dslo_edge.errors import BundleError, ConfigError, InvalidUpdate
from dslo_edge.models import StudentModel
from dslo_edge.ota import (
    DEFAULT_STALE_AFTER_S,
    REPLACED,
    STATE_DIR_INVALID,
    STATE_DIR_WRITE_FAILED,
    OtaError,
    OtaReceiver,
    ReceivedArchive,
    ReleaseOptions,
    peek_transfer_id,
    read_release_options,
    state_write_error,
    status_payload,
)
from dslo_edge.repeat_log import RepeatLimiter, repeats_note
from dslo_edge.signing import verified_body
from dslo_edge.state_folders import OTA
from dslo_edge.swap import (
    ACTIVE,
    BundleStore,
    check_student_health,
    load_new_student,
    lost_weights,
    model_change,
)

logger = logging.getLogger(__name__)

# A sender that misses the status goes on sending a rejected transfer, and
# each chunk is rejected again. So one line is logged per transfer and reason,
# then at most one per interval with the count of chunks rejected since.
REJECTION_LOG_INTERVAL_S = DEFAULT_STALE_AFTER_S
REJECTION_LOG_MEMORY = 64


@dataclass(frozen=True)
class ReleaseCandidate:
    """A received release whose student loaded and passed the health check.

    The ``active`` link does not name it yet, unless the same release was
    sent again. ``model_changed`` is True when its student takes other
    inputs or labels than the running one, or cannot take every adapted
    weight of it, which the sender allowed.
    """

    transfer_id: str
    release: Path
    bundle: Bundle
    student: StudentModel
    model_changed: bool


@dataclass(frozen=True)
class UpdateOutcome:
    """Result of one OTA chunk: a status to publish, or a release to switch to."""

    status: str | None
    candidate: ReleaseCandidate | None = None


class ModelUpdater:
    """Receives OTA chunks and loads the student of each complete release.

    Args:
        state_dir: the daemon's state directory; releases go to
            ``bundles/`` and partial archives to ``ota/``.
        load_student: builds a student for a bundle (with the daemon's
            interpreter choice).
        hmac_key: the device's key; with it, every chunk must be signed for
            ``topic``, as updates are, before anything is written to disk.
        clock: monotonic seconds, injected in tests.
    """

    def __init__(
        self,
        state_dir: Path,
        load_student: Callable[[Bundle], StudentModel],
        *,
        hmac_key: bytes | None = None,
        topic: str = "",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = BundleStore(state_dir)
        self.receiver = OtaReceiver(state_dir / OTA, clock=clock)
        self.load_student = load_student
        self.hmac_key = hmac_key
        self.topic = topic
        self._rejection_log = RepeatLimiter(
            REJECTION_LOG_INTERVAL_S, REJECTION_LOG_MEMORY, clock
        )

    def active_bundle(self, factory: Path) -> Path:
        """Return the bundle to load at start: the installed release, else factory."""
        return self.store.active_path(factory)

    def handle_chunk(
        self,
        payload: bytes,
        current: StudentModel,
        before_install: Callable[[], None] | None = None,
    ) -> UpdateOutcome:
        """Store a chunk; on the last one install the release and load its student.

        ``before_install`` runs once the archive is verified, before the new
        student copies the weights of ``current``. An ``OtaError`` from it
        rejects the release.

        Returns:
            An outcome with a status for a rejected chunk or release, with a
            candidate for a release ready to switch to, or with neither while
            the transfer is incomplete.
        """
        try:
            body = verified_body(self.hmac_key, self.topic, payload)
            archive = self.receiver.receive(body)
        except (InvalidUpdate, OtaError) as error:
            transfer_id = peek_transfer_id(payload)
            self._log_chunk_rejection(transfer_id, error)
            return _rejected(transfer_id, error)
        if archive is None:
            return UpdateOutcome(None)
        try:
            if before_install is not None:
                before_install()
            return self._install(archive, current)
        except OtaError as error:
            logger.log(
                _log_level(error),
                "Rejected model update %s: %s",
                archive.transfer_id,
                error,
            )
            return _rejected(archive.transfer_id, error)
        finally:
            archive.path.unlink(missing_ok=True)

    def replaced_statuses(self) -> list[str]:
        """Return a ``rejected`` status for each transfer replaced since the last call.

        Call it after every ``handle_chunk``, also one that raised, so each
        replaced transfer gets its outcome once.
        """
        return [
            status_payload(
                "rejected",
                replaced.transfer_id,
                reason=REPLACED,
                detail=replaced.detail(),
            )
            for replaced in self.receiver.take_replaced()
        ]

    def _log_chunk_rejection(
        self, transfer_id: str | None, error: InvalidUpdate | OtaError
    ) -> None:
        """Log the first rejected chunk of a transfer, then count the others."""
        skipped = self._rejection_log.skipped_before((transfer_id, error.reason))
        if skipped is None:
            return
        logger.log(
            _log_level(error),
            "Rejected model transfer %s (%s): %s%s",
            transfer_id or "(no transfer id)",
            error.reason,
            error,
            repeats_note(
                skipped,
                "chunk rejected for this reason",
                "chunks rejected for this reason",
            ),
        )

    def activate(self, candidate: ReleaseCandidate) -> bool:
        """Point the ``active`` link at the candidate's release.

        Returns:
            True when the link changed, so ``roll_back`` must undo it.

        Raises:
            OtaError: ``state_dir_write_failed`` when the link cannot be written.
        """
        try:
            return self.store.activate(candidate.release, pending=True)
        except OSError as error:
            raise state_write_error(
                error,
                f"point {self.store.folder / 'active'} at release "
                f"{candidate.release.name}",
                self.store.folder,
            ) from error

    def accept(self, candidate: ReleaseCandidate) -> None:
        """Mark an activated candidate's release as one the daemon may start.

        Raises:
            OtaError: ``state_dir_write_failed`` when the release's pending
                marker cannot be removed.
        """
        try:
            self.store.accept(candidate.release)
        except OSError as error:
            raise state_write_error(
                error, f"accept release {candidate.release.name}", self.store.folder
            ) from error

    def installed(self, candidate: ReleaseCandidate) -> str:
        """Return the ``installed`` status of an activated candidate."""
        return status_payload(
            "installed", candidate.transfer_id, release=candidate.release.name
        )

    def reject(self, candidate: ReleaseCandidate, error: Exception) -> str:
        """Discard a candidate that the device cannot run; return the status.

        The ``active`` link must not name the candidate yet (or must have
        named it before the transfer, as when the same release is sent again).
        """
        self.store.discard(candidate.release)
        reason, detail = _failure(candidate.release, error)
        logger.log(
            _log_level(error) if isinstance(error, OtaError) else logging.WARNING,
            "Rejected model update %s (release %s, %s): %s",
            candidate.transfer_id,
            candidate.release.name,
            reason,
            detail,
        )
        return status_payload(
            "rejected", candidate.transfer_id, reason=reason, detail=detail
        )

    def roll_back(
        self, candidate: ReleaseCandidate, activated: bool, error: Exception
    ) -> str:
        """Undo ``activate`` after the switch failed; return the status.

        When the ``active`` link cannot be moved back, the release keeps its
        pending marker, so the daemon does not start it at its next start.
        """
        try:
            restored = (
                self.store.rollback() if activated else self.store.active_release()
            )
        except OSError as link_error:
            return self._link_not_restored(candidate, error, link_error)
        self.store.discard(candidate.release)
        reason, detail = _failure(candidate.release, error)
        logger.error(
            "Model update %s (release %s) failed after activation and was rolled "
            "back to %s: %s",
            candidate.transfer_id,
            candidate.release.name,
            restored.name if restored else "the factory bundle",
            detail,
        )
        return status_payload(
            "rolled_back",
            candidate.transfer_id,
            release=restored.name if restored else None,
            reason=reason,
            detail=detail,
        )

    def _link_not_restored(
        self, candidate: ReleaseCandidate, error: Exception, link_error: OSError
    ) -> str:
        """Return the status of a failed switch whose link could not be undone."""
        link = self.store.folder / ACTIVE
        problem = state_write_error(
            link_error, f"point {link} back at the release before", self.store.folder
        )
        reason, detail = _failure(candidate.release, error)
        detail = (
            f"{detail}. The daemon keeps running its previous model, but {problem}. "
            f"Release {candidate.release.name} stays marked as not accepted, so "
            "the daemon does not start it"
        )
        logger.error(
            "Model update %s (release %s) failed after activation: %s",
            candidate.transfer_id,
            candidate.release.name,
            detail,
        )
        return status_payload(
            "rejected", candidate.transfer_id, reason=reason, detail=detail
        )

    def _install(
        self, archive: ReceivedArchive, current: StudentModel
    ) -> UpdateOutcome:
        options = read_release_options(archive.path)
        release = self.store.install_archive(archive.path)
        try:
            return self._load_candidate(archive.transfer_id, release, options, current)
        except Exception:
            self.store.discard(release)
            raise

    def _load_candidate(
        self,
        transfer: str,
        release: Path,
        options: ReleaseOptions,
        current: StudentModel,
    ) -> UpdateOutcome:
        try:
            change = model_change(current.bundle, load_bundle(release))
        except BundleError as error:
            raise OtaError(
                "bad_bundle", f"received bundle is invalid: {error}"
            ) from error
        if change is not None and not options.allow_model_change:
            raise OtaError(
                "model_mismatch",
                f"release {release.name} has {change}; updates for the running "
                "model would not fit it and its adapted weights would be lost. "
                "Send it with 'ota-send --allow-model-change' to switch models",
            )
        try:
            new = load_new_student(release, current, self.load_student)
        except (BundleError, ValueError) as error:
            raise OtaError(
                "bad_bundle", f"release {release.name} cannot be loaded: {error}"
            ) from error
        lost = lost_weights(current.get_weights(), new.student.get_weights())
        if lost is not None and change is None:
            if not options.allow_model_change:
                raise OtaError(
                    "model_mismatch",
                    f"release {release.name} has {lost}, so the adapted values of "
                    "the running model would be lost. Send it with 'ota-send "
                    "--allow-model-change' to switch models and keep the old "
                    "model's last checkpoint",
                )
            change = lost
        try:
            check_student_health(new.student)
        except OtaError as error:
            self.store.discard(release)
            logger.warning(
                "Model update %s failed its health check: %s", release.name, error
            )
            active = self.store.active_release()
            return UpdateOutcome(
                status_payload(
                    "rolled_back",
                    transfer,
                    release=active.name if active else None,
                    reason="health_check",
                    detail=str(error),
                )
            )
        assert isinstance(new.student, StudentModel)
        candidate = ReleaseCandidate(
            transfer, release, new.bundle, new.student, change is not None
        )
        return UpdateOutcome(None, candidate)


def _failure(release: Path, error: Exception) -> tuple[str, str]:
    """Return the status reason and detail for an error raised by a switch."""
    if isinstance(error, OtaError):
        return error.reason, str(error)
    if isinstance(error, BundleError):
        return "bad_bundle", f"release {release.name} is invalid: {error}"
    if isinstance(error, ConfigError):
        return (
            "config_mismatch",
            f"release {release.name} does not fit the device config: {error}. "
            "Change the device config first, restart the daemon, then send "
            "the release again",
        )
    return (
        "install_failed",
        f"switching to release {release.name} failed: {type(error).__name__}: {error}",
    )


def _log_level(error: InvalidUpdate | OtaError) -> int:
    """Return ERROR for a fault in the device's state directory, else WARNING.

    The sender cannot fix such a fault, so the device's operator must see it.
    """
    state_dir_faults = (STATE_DIR_INVALID, STATE_DIR_WRITE_FAILED)
    if isinstance(error, OtaError) and error.reason in state_dir_faults:
        return logging.ERROR
    return logging.WARNING


def _rejected(
    transfer_id: str | None, error: InvalidUpdate | OtaError
) -> UpdateOutcome:
    return UpdateOutcome(
        status_payload("rejected", transfer_id, reason=error.reason, detail=str(error))
    )
