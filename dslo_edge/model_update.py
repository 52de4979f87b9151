"""Over-the-air model updates, applied by the daemon's trainer thread.

Chunks arrive on ``dslo/<device>/ota``, and ``OtaReceiver`` assembles and
verifies them in the state directory. A complete archive is unpacked into
its own release (``BundleStore``). The new student gets every weight whose
name and shape match the adapted one. A health check on the new student then
decides between keeping it and rolling the ``active`` link back.

A release whose input shape, classes or heads differ from the running
model's is rejected (``model_mismatch``), because its updates would not fit
and the adapted weights would be lost. The sender may allow it in the
release options (``ota-send --allow-model-change``); the daemon then keeps
the old model's last checkpoint in ``kept-checkpoints/``. The outcome is
published, retained, on ``dslo/<device>/ota/status``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dslo_edge.bundle import Bundle, load_bundle
from dslo_edge.errors import BundleError, InvalidUpdate
from dslo_edge.models import StudentModel
from dslo_edge.ota import (
    OtaError,
    OtaReceiver,
    ReceivedArchive,
    peek_transfer_id,
    read_release_options,
    status_payload,
)
from dslo_edge.signing import verify
from dslo_edge.swap import BundleStore, model_change, swap_student

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateOutcome:
    """Result of one OTA chunk: a status to publish and maybe a new student.

    ``model_changed`` is True when the new student takes other inputs or
    labels than the old one, which the sender allowed.
    """

    status: str | None
    student: StudentModel | None = None
    bundle: Bundle | None = None
    model_changed: bool = False


class ModelUpdater:
    """Receives OTA chunks and swaps the student when a bundle is complete.

    Args:
        state_dir: the daemon's state directory; releases go to
            ``bundles/`` and partial archives to ``ota/``.
        load_student: builds a student for a bundle (with the daemon's
            interpreter choice).
        hmac_key: the device's key; with it, every chunk must be signed for
            ``topic``, as updates are, before anything is written to disk.
    """

    def __init__(
        self,
        state_dir: Path,
        load_student: Callable[[Bundle], StudentModel],
        *,
        hmac_key: bytes | None = None,
        topic: str = "",
    ):
        self.store = BundleStore(state_dir)
        self.receiver = OtaReceiver(state_dir / "ota")
        self.load_student = load_student
        self.hmac_key = hmac_key
        self.topic = topic

    def active_bundle(self, factory: Path) -> Path:
        """Return the bundle to load at start: the installed release, else factory."""
        return self.store.active_path(factory)

    def handle_chunk(self, payload: bytes, current: StudentModel) -> UpdateOutcome:
        """Store a chunk; on the last one install, swap and health-check."""
        try:
            if self.hmac_key is not None:
                body = verify(self.hmac_key, self.topic, payload)
            else:
                body = payload
            archive = self.receiver.receive(body)
        except (InvalidUpdate, OtaError) as error:
            logger.warning("Rejected model update chunk: %s", error)
            return _rejected(peek_transfer_id(payload), error)
        if archive is None:
            return UpdateOutcome(None)
        try:
            return self._install(archive, current)
        except OtaError as error:
            logger.warning("Rejected model update %s: %s", archive.transfer_id, error)
            return _rejected(archive.transfer_id, error)
        finally:
            archive.path.unlink(missing_ok=True)

    def _install(
        self, archive: ReceivedArchive, current: StudentModel
    ) -> UpdateOutcome:
        options = read_release_options(archive.path)
        release = self.store.install_archive(archive.path)
        try:
            change = model_change(current.bundle, load_bundle(release))
        except BundleError as error:
            self.store.discard(release)
            raise OtaError(
                "bad_bundle", f"received bundle is invalid: {error}"
            ) from error
        if change is not None and not options.allow_model_change:
            self.store.discard(release)
            raise OtaError(
                "model_mismatch",
                f"release {release.name} has {change}; updates for the running "
                "model would not fit it and its adapted weights would be lost. "
                "Send it with 'ota-send --allow-model-change' to switch models",
            )
        result = swap_student(self.store, release, current, self.load_student)
        transfer = archive.transfer_id
        if not result.swapped:
            return UpdateOutcome(
                status_payload(
                    "rolled_back",
                    transfer,
                    release=result.release.name if result.release else None,
                    reason="health_check",
                    detail=result.reason,
                )
            )
        try:
            bundle = load_bundle(release)
        except BundleError as error:  # the store checked it, so this is rare
            self.store.rollback()
            return UpdateOutcome(
                status_payload("rolled_back", transfer, detail=str(error))
            )
        assert isinstance(result.student, StudentModel)
        return UpdateOutcome(
            status_payload("installed", transfer, release=release.name),
            result.student,
            bundle,
            model_changed=change is not None,
        )


def _rejected(
    transfer_id: str | None, error: InvalidUpdate | OtaError
) -> UpdateOutcome:
    return UpdateOutcome(
        status_payload("rejected", transfer_id, reason=error.reason, detail=str(error))
    )
