"""Model updates over the air: chunked bundle transfer, verification and swap.

The hub packs a bundle directory into a tar archive and publishes it in
chunks on ``<prefix>/<device>/ota``. Every chunk repeats the transfer id, the
archive size and its sha256, so the device can check each chunk on its own
and detect a chunk from another transfer. Chunk layout (format version 1,
little-endian)::

    offset size  field
    0      4     magic b"DSLB"
    4      1     format version, 1
    5      16    transfer id
    21     8     archive size in bytes (u64)
    29     4     chunk size in bytes, the size of every chunk but the last (u32)
    33     4     chunk index (u32)
    37     4     chunk count (u32)
    41     32    sha256 of the whole archive
    73     ...   chunk data

The archive contains the files the bundle manifest lists, ``probe.npz`` when the
bundle has one, and ``ota-release.json`` with the sender's options for this
release (``allow_model_change``). The release file is inside the archive, so
the sha256 in every chunk and, on devices with a key, the HMAC of every chunk
cover it.

On the device, ``OtaReceiver`` writes chunks into a preallocated file in the
state directory, ignores repeats (QoS 1 may deliver twice) and verifies the
sha256 once every chunk arrived. It drops chunks of the last 16 complete and
the last 16 failed transfers, also after a restart (``FinishedTransfers``).
``BundleStore`` unpacks a verified archive
into its own release directory and switches an ``active`` link to it,
keeping the previous release behind a ``previous`` link for rollback.
``swap_student`` loads the new student, carries over adapted weights whose
name and shape match, runs a health check and activates the release only if
it passes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import pwd
import struct
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dslo_edge.bundle import sha256_file
from dslo_edge.checkpoint import fsync_directory
from dslo_edge.errors import BundleError
from dslo_edge.finished_transfers import (
    COMPLETE,
    DEFAULT_CAPACITY,
    FAILED,
    FINISHED_TRANSFERS_FILE,
    FinishedTransfers,
)
from dslo_edge.json_input import parse_json
from dslo_edge.protocol import Topics
from dslo_edge.signing import HEADER_BYTES as SIGNED_HEADER_BYTES
from dslo_edge.signing import SIGNED_MAGIC
from dslo_edge.state_folders import OTA, STATE_FOLDERS, state_folder_problem

logger = logging.getLogger(__name__)

MAGIC = b"DSLB"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sB16sQIII32s")
# Transfer id, archive bytes, chunk bytes, chunk count and sha256, as the
# list of stored chunks starts (see _archive_identity).
_IDENTITY = struct.Struct("<16sQII32s")
HEADER_BYTES = _HEADER.size
DEFAULT_CHUNK_BYTES = 64 * 1024
DEFAULT_MAX_ARCHIVE_BYTES = 64 * 1024 * 1024
# The smallest --chunk-size of ota-send. It bounds the chunk count, and so
# the set of received chunk indices, to 65,536 for a 64 MiB archive.
MIN_CHUNK_BYTES = 1024
# The largest --chunk-size of ota-send (in cli_device.py, which does not
# import this module, to start faster).
MAX_CHUNK_BYTES = 1024 * 1024
DEFAULT_STALE_AFTER_S = 300.0
MAX_ARCHIVE_MEMBERS = 16
RELEASE_FILE = "ota-release.json"


class OtaError(BundleError):
    """A model update was rejected.

    Attributes:
        reason: short machine-readable kind, for the status message and
            metrics (for example ``checksum_mismatch``).
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# OtaError.reason when a folder in the state directory is not a directory.
STATE_DIR_INVALID = "state_dir_invalid"

# The status reason of a transfer that a newer transfer replaced before all
# its chunks arrived.
REPLACED = "replaced"


def make_state_folder(folder: Path, role: str) -> None:
    """Create ``folder`` in the daemon's state directory unless it exists.

    Raises:
        OtaError: ``state_dir_invalid`` when a file or a broken symlink is
            at ``folder``. The message names the path and the fix.
    """
    problem = state_folder_problem(folder, role)
    if problem is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return
        except (FileExistsError, NotADirectoryError) as error:
            # A parent folder is a file, or ``folder`` changed since the check.
            problem = f"cannot create {role} {folder}: {error.strerror}"
    raise OtaError(STATE_DIR_INVALID, f"{problem}, then send the release again")


# OtaError.reason when writing to the state directory failed, for example
# with permission denied or no space left on the device.
STATE_DIR_WRITE_FAILED = "state_dir_write_failed"


def state_write_error(
    error: OSError, action: str, folder: Path, needed_bytes: int | None = None
) -> OtaError:
    """Turn an OSError from a write to ``folder`` into a rejection with the fix.

    Args:
        error: the error from the write.
        action: what failed, completing "cannot ...", for example
            "store the transfer in /var/lib/dslo/ota".
        folder: the state directory's folder that the write went to.
        needed_bytes: the size of the release, named when space ran out.

    Returns:
        An ``OtaError`` with reason ``state_dir_write_failed`` whose message
        names the path, the OS error and what to do.
    """
    cause = error.strerror or str(error)
    if error.errno is not None and error.errno in errno.errorcode:
        cause += f" ({errno.errorcode[error.errno]})"
    # A failed write() or close() names no file, unlike a failed open().
    if error.filename:
        cause += f" on {error.filename}"
    return OtaError(
        STATE_DIR_WRITE_FAILED,
        f"cannot {action}: {cause}; "
        f"{_write_fix(error.errno, folder, needed_bytes)}, then send the "
        "release again",
    )


def _write_fix(code: int | None, folder: Path, needed_bytes: int | None) -> str:
    """Return what the device's operator can do about a failed write."""
    if code in (errno.EACCES, errno.EPERM):
        user = _user_name()
        return (
            f"give the user {user}, which runs the daemon, write access to "
            f"{folder}, for example with 'chown -R {user} {folder} && "
            f"chmod -R u+rwX {folder}'"
        )
    if code == errno.EROFS:
        return (
            f"{folder} is on a read-only file system: remount it read-write or "
            "set device.state_dir to a writable directory and restart the daemon"
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        needed = ""
        if needed_bytes is not None:
            needed = f" (the release archive is {_size_text(needed_bytes)})"
        return f"free space on the file system of {folder}{needed}"
    if code in (errno.ENOTDIR, errno.EEXIST):
        # mkdir on a file raises EEXIST, a path through a file ENOTDIR.
        return f"a file is where {folder} or a folder in it belongs: move the file away"
    return f"check {folder} and the file system it is on"


def _size_text(size: int) -> str:
    if size < 2**20:
        return f"{math.ceil(size / 1024)} KiB"
    return f"{size / 2**20:.1f} MiB"


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        # A user id without an entry in the password database.
        return str(os.geteuid())


def ota_topics(topics: Topics) -> tuple[str, str]:
    """Return the (chunk topic, status topic) next to a device's other topics."""
    base = topics.status.rsplit("/", 1)[0]
    return f"{base}/ota", f"{base}/ota/status"


OTA_STATES = ("receiving", "rejected", "installed", "rolled_back")


def status_payload(
    state: str,
    transfer_id: str | None,
    *,
    release: str | None = None,
    reason: str | None = None,
    detail: str | None = None,
) -> str:
    """Return the JSON the device publishes on its OTA status topic.

    Args:
        state: one of ``OTA_STATES``.
        transfer_id: hex id of the transfer concerned, if known.
        release: the release directory name now active, if any.
        reason: ``OtaError.reason`` for a rejection or rollback.
        detail: the error message for a rejection or rollback.
    """
    if state not in OTA_STATES:
        raise ValueError(
            f"OTA state {state!r} is invalid; expected one of {OTA_STATES}"
        )
    document = {
        "state": state,
        "transfer": transfer_id,
        "release": release,
        "reason": reason,
        "detail": detail,
        "timestamp": time.time(),
    }
    return json.dumps(document)


# Release options and chunks


@dataclass(frozen=True)
class ReleaseOptions:
    """Options the sender attaches to one release, read by the device.

    Attributes:
        allow_model_change: install the release even when its input shape,
            classes or heads differ from the running model's, which resets
            the adapted weights (the device keeps a copy of them).
    """

    allow_model_change: bool = False

    def to_json(self) -> bytes:
        document = {"format_version": 1, "allow_model_change": self.allow_model_change}
        return json.dumps(document, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ReleaseOptions:
        """Parse ``ota-release.json``.

        Raises:
            OtaError: ``bad_bundle`` when the file is not the expected JSON.
        """
        try:
            document = parse_json(data)
        except ValueError as error:
            raise OtaError(
                "bad_bundle", f"{RELEASE_FILE} in the archive is not JSON: {error}"
            ) from error
        valid = (
            isinstance(document, dict)
            and document.get("format_version") == 1
            and isinstance(document.get("allow_model_change"), bool)
        )
        if not valid:
            raise OtaError(
                "bad_bundle",
                f"{RELEASE_FILE} in the archive is {document!r}; expected "
                '{"format_version": 1, "allow_model_change": true or false}',
            )
        return cls(allow_model_change=document["allow_model_change"])


def read_release_options(archive: Path) -> ReleaseOptions:
    """Read ``ota-release.json`` from a received archive.

    An archive without it comes from an older sender: no model change.

    Raises:
        OtaError: ``bad_bundle`` when the archive or the file is unreadable.
    """
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = {member.name: member for member in read_members(tar)}
            member = members.get(RELEASE_FILE)
            if member is None:
                return ReleaseOptions()
            stream = tar.extractfile(member) if member.isfile() else None
            if stream is None:
                raise OtaError("bad_bundle", f"{RELEASE_FILE} is not a plain file")
            with stream:
                return ReleaseOptions.from_json(stream.read(64 * 1024))
    except tarfile.TarError as error:
        raise OtaError("bad_bundle", f"cannot read the archive: {error}") from error


def read_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Read the member headers of a received archive, one header at a time.

    ``TarFile.getmembers`` reads every header first. For a 64 MiB archive of
    131,068 empty members that took 57 MiB more peak RSS under CPython 3.11
    before any count check. This reads at most ``MAX_ARCHIVE_MEMBERS`` + 1.

    Raises:
        OtaError: ``bad_bundle`` when the archive has more members than that.
        tarfile.TarError: when a header is unreadable.
    """
    members: list[tarfile.TarInfo] = []
    member = tar.next()
    while member is not None:
        if len(members) == MAX_ARCHIVE_MEMBERS:
            raise OtaError(
                "bad_bundle",
                f"archive has more than {MAX_ARCHIVE_MEMBERS} members, at most "
                f"{MAX_ARCHIVE_MEMBERS} are allowed; send a bundle folder with "
                "only the files its manifest names",
            )
        members.append(member)
        member = tar.next()
    return members


def peek_transfer_id(payload: bytes) -> str | None:
    """Return the transfer id of a chunk, signed or not, without checking it.

    Only for labelling a rejection in the status message: the id of a chunk
    that failed its signature check is not authenticated.
    """
    if payload.startswith(SIGNED_MAGIC):
        payload = payload[SIGNED_HEADER_BYTES:]
    if len(payload) < HEADER_BYTES or not payload.startswith(MAGIC):
        return None
    return payload[5:21].hex()


def chunk_count(archive_bytes: int, chunk_bytes: int) -> int:
    """Return how many chunks ``split_archive`` makes of an archive's bytes."""
    return max(1, math.ceil(archive_bytes / chunk_bytes))


def split_archive(
    archive: bytes,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    transfer_id: bytes | None = None,
    digest: bytes | None = None,
) -> list[bytes]:
    """Split an archive into chunk payloads.

    Args:
        archive: the bytes from ``pack_bundle``.
        chunk_bytes: data bytes per chunk; keep header plus chunk below the
            broker's and the device's maximum payload size.
        transfer_id: 16 bytes; a random UUID by default.
        digest: the sha256 to announce; tests pass a wrong one.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    transfer = transfer_id or uuid.uuid4().bytes
    checksum = digest or hashlib.sha256(archive).digest()
    count = chunk_count(len(archive), chunk_bytes)
    chunks = []
    for index in range(count):
        data = archive[index * chunk_bytes : (index + 1) * chunk_bytes]
        header = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            transfer,
            len(archive),
            chunk_bytes,
            index,
            count,
            checksum,
        )
        chunks.append(header + data)
    return chunks


# Device side: assembling chunks


@dataclass(frozen=True)
class ChunkHeader:
    """The fields in front of every chunk's data."""

    transfer_id: bytes
    total_bytes: int
    chunk_bytes: int
    index: int
    count: int
    sha256: bytes


def parse_chunk(payload: bytes, max_archive_bytes: int) -> tuple[ChunkHeader, bytes]:
    """Split a chunk payload into its header and data, checking every field.

    Raises:
        OtaError: ``malformed`` for a bad header or data length or for a
            chunk size below ``MIN_CHUNK_BYTES`` in an archive of several
            chunks, ``too_large`` for an archive above ``max_archive_bytes``.
    """
    if len(payload) < HEADER_BYTES:
        raise OtaError(
            "malformed", f"chunk of {len(payload)} bytes is shorter than its header"
        )
    magic, version, transfer, total, size, index, count, digest = _HEADER.unpack_from(
        payload
    )
    if magic != MAGIC or version != FORMAT_VERSION:
        raise OtaError(
            "malformed",
            f"chunk starts with {magic!r} version {version}, expected {MAGIC!r} "
            f"version {FORMAT_VERSION}",
        )
    if total > max_archive_bytes:
        raise OtaError(
            "too_large",
            f"bundle archive of {total} bytes exceeds the limit of "
            f"{max_archive_bytes} bytes",
        )
    expected_count = max(1, math.ceil(total / size)) if size else 0
    if size == 0 or count != expected_count or index >= count:
        raise OtaError(
            "malformed",
            f"chunk {index} of {count} with chunk size {size} does not fit an "
            f"archive of {total} bytes",
        )
    if count > 1 and size < MIN_CHUNK_BYTES:
        raise OtaError(
            "malformed",
            f"chunk size {size} is below {MIN_CHUNK_BYTES} bytes for an archive "
            f"of {total} bytes in {count} chunks; send it with 'dslo-edge "
            f"ota-send', whose --chunk-size is at least {MIN_CHUNK_BYTES}",
        )
    data = payload[HEADER_BYTES:]
    expected_length = min(size, total - index * size)
    if len(data) != expected_length:
        raise OtaError(
            "malformed",
            f"chunk {index} carries {len(data)} bytes, expected {expected_length}",
        )
    return ChunkHeader(transfer, total, size, index, count, digest), data


@dataclass
class _Transfer:
    header: ChunkHeader
    path: Path
    received: set[int] = field(default_factory=set)
    last_chunk_at: float = 0.0


@dataclass(frozen=True)
class ReplacedTransfer:
    """A transfer that a newer one replaced before it completed, ids in hex."""

    transfer_id: str
    replaced_by: str

    def detail(self) -> str:
        """Return the status detail, which names the new transfer and the fix."""
        return (
            f"model transfer {self.transfer_id} was replaced by transfer "
            f"{self.replaced_by}, which started before all chunks of "
            f"{self.transfer_id} arrived, so its chunks are discarded; send one "
            "release at a time, waiting until ota-send reports the outcome of "
            "one before sending the next, then send this release again if the "
            "device should install it"
        )


@dataclass(frozen=True)
class ReceivedArchive:
    """A complete archive whose sha256 matched the announced one."""

    transfer_id: str
    path: Path
    size: int


class OtaReceiver:
    """Assembles chunks of one transfer at a time into a verified archive file.

    Args:
        folder: directory for partial and complete archives (in the state
            directory, so it survives a restart of the daemon).
        max_archive_bytes: reject larger archives before writing anything.
        stale_after_s: a transfer that received no chunk for this long is
            logged as paused when its next chunk arrives, or as idle when
            another transfer replaces it.
        finished_capacity: the number of complete transfers, and of failed
            or replaced ones, whose late chunks are dropped. Their ids are stored in
            ``finished-transfers.json`` in ``folder``.
        clock: monotonic seconds, injected in tests.
    """

    def __init__(
        self,
        folder: Path,
        *,
        max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        finished_capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.folder = folder
        self.max_archive_bytes = max_archive_bytes
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._transfer: _Transfer | None = None
        # Transfers whose chunks all arrived, and transfers that found no
        # usable folder, failed to write their file or were replaced. A copy
        # of one of their chunks would start it again, so it is dropped.
        self.finished = FinishedTransfers(
            folder / FINISHED_TRANSFERS_FILE, finished_capacity
        )
        self.finished.load()
        # Finished transfers with a dropped chunk, so each is logged once.
        self._drops_logged: dict[bytes, None] = {}
        # Replaced transfers that take_replaced has not returned yet.
        self._replaced: list[ReplacedTransfer] = []

    @property
    def progress(self) -> tuple[int, int] | None:
        """(chunks received, chunk count) of the transfer in progress, or None."""
        if self._transfer is None:
            return None
        return len(self._transfer.received), self._transfer.header.count

    def take_replaced(self) -> list[ReplacedTransfer]:
        """Return the transfers replaced since the last call, oldest first.

        A chunk that starts a transfer replaces the incomplete one before
        it, also one that a daemon restart cut off. ``receive`` records the
        replaced transfer here even when it then raises, so the caller can
        report each replaced transfer once.
        """
        replaced, self._replaced = self._replaced, []
        return replaced

    def receive(self, payload: bytes) -> ReceivedArchive | None:
        """Store one chunk; return the archive once the last chunk arrived.

        Raises:
            OtaError: the chunk is malformed or too large, or the complete
                archive's sha256 differs from the announced one. The partial
                file is deleted in the last case. ``state_dir_invalid`` when
                ``folder`` is not a directory and ``state_dir_write_failed``
                when a write to it fails. After either, the partial file is
                deleted and the transfer's later chunks return None.

        Chunks of the last 16 (``finished_capacity``) complete transfers
        return None too. The exception is a complete transfer whose verified
        archive is still in ``folder`` because a restart cut off its
        install. Its chunk returns that archive again.
        """
        header, data = parse_chunk(payload, self.max_archive_bytes)
        outcome = self.finished.outcome(header.transfer_id)
        if outcome == COMPLETE:
            left = self._verified_archive_left(header)
            if left is not None:
                return left
        if outcome is not None:
            self._log_drop(header, outcome)
            return None
        try:
            return self._store(header, data)
        except OSError as error:
            self._abandon(header.transfer_id)
            raise state_write_error(
                error,
                f"store the transfer in {self.folder}",
                self.folder,
                header.total_bytes,
            ) from error

    def _store(self, header: ChunkHeader, data: bytes) -> ReceivedArchive | None:
        left = self._verified_archive_left(header)
        if left is not None:
            return left
        transfer = self._transfer_for(header)
        if header.index not in transfer.received:
            self._write_chunk(transfer, header, data)
        # Else a QoS 1 repeat. After a restart it may also be the last chunk,
        # stored before the archive was checked, so a complete transfer is
        # checked here too.
        transfer.last_chunk_at = self._clock()
        if len(transfer.received) < header.count:
            return None
        self._transfer = None
        # Recorded after the check, so a restart during it resumes the
        # transfer and checks it again.
        try:
            archive = self._verify(transfer)
        except OtaError:
            self._remember(header.transfer_id, COMPLETE)
            raise
        self._remember(header.transfer_id, COMPLETE)
        return archive

    def _remember(self, transfer_id: bytes, outcome: str) -> None:
        """Record a finished transfer, logging a failed write instead of raising."""
        try:
            self.finished.add(transfer_id, outcome)
        except OSError as error:
            # The rejection of a failed transfer is logged as an error that
            # names the folder, and this write most likely failed the same way.
            level = logging.WARNING if outcome == COMPLETE else logging.DEBUG
            logger.log(
                level,
                "Cannot record model transfer %s as %s in %s: %s; a copy of its "
                "chunks that arrives after a daemon restart starts it again",
                transfer_id.hex(),
                outcome,
                self.finished.path,
                error,
            )

    def _log_drop(self, header: ChunkHeader, outcome: str) -> None:
        """Log the first dropped chunk of a finished transfer."""
        if header.transfer_id in self._drops_logged:
            return
        self._drops_logged[header.transfer_id] = None
        # Enough for every transfer that ``finished`` keeps.
        while len(self._drops_logged) > 2 * self.finished.capacity:
            del self._drops_logged[next(iter(self._drops_logged))]
        logger.info(
            "Dropping chunk %d of model transfer %s, which already %s; later "
            "copies of its chunks are dropped without a log line",
            header.index,
            header.transfer_id.hex(),
            "completed" if outcome == COMPLETE else "failed or was replaced",
        )

    def _verified_archive_left(self, header: ChunkHeader) -> ReceivedArchive | None:
        """Return this transfer's verified archive if a restart cut off its install.

        The daemon acknowledges the last chunk only after the install, so
        after a kill during the install the broker delivers that chunk
        again. The archive is checked once more, because a kill during the
        rename or a power cut may have left it incomplete.
        """
        if self._transfer is not None:
            return None
        final = self.folder / f"{header.transfer_id.hex()}.tar"
        try:
            if final.stat().st_size != header.total_bytes:
                return None
        except (FileNotFoundError, NotADirectoryError):
            # _start reports a missing or invalid folder.
            return None
        if sha256_file(final) != header.sha256.hex():
            return None
        logger.info(
            "Installing the verified archive of model transfer %s again, because "
            "the daemon stopped during its install",
            header.transfer_id.hex(),
        )
        return ReceivedArchive(header.transfer_id.hex(), final, header.total_bytes)

    def _write_chunk(
        self, transfer: _Transfer, header: ChunkHeader, data: bytes
    ) -> None:
        # Each write is synced, because the daemon acknowledges the chunk
        # once receive returns, and the broker never sends it again. The data
        # comes first, so after a power cut the list names no chunk that is
        # not on disk.
        with open(transfer.path, "r+b") as stream:
            stream.seek(header.index * header.chunk_bytes)
            stream.write(data)
            _sync(stream)
        with open(_received_path(transfer.path), "ab") as stream:
            stream.write(header.index.to_bytes(4, "little"))
            _sync(stream)
        transfer.received.add(header.index)

    def _transfer_for(self, header: ChunkHeader) -> _Transfer:
        current = self._transfer
        now = self._clock()
        if current is not None and current.header.transfer_id == header.transfer_id:
            if not _same_archive(current.header, header):
                raise OtaError(
                    "malformed",
                    f"chunk {header.index} of transfer {header.transfer_id.hex()} "
                    "announces a different archive than earlier chunks",
                )
            # The broker does not send acknowledged chunks again, so a
            # transfer that pauses, for example while the device is offline,
            # goes on with the chunks it stored.
            idle_s = now - current.last_chunk_at
            if idle_s > self.stale_after_s:
                logger.info(
                    "Model transfer %s goes on after %.0f s without a chunk",
                    header.transfer_id.hex(),
                    idle_s,
                )
            return current
        if current is not None:
            replaced = current.header.transfer_id
            idle_s = now - current.last_chunk_at
            logger.warning(
                "Model transfer %s replaced by %s before it completed%s",
                replaced.hex(),
                header.transfer_id.hex(),
                f" (no chunk for {idle_s:.0f} s)"
                if idle_s > self.stale_after_s
                else "",
            )
            self._discard(current)
            # Its partial file is gone, so a late chunk of it must not start
            # it again and delete the new transfer's file.
            self._remember(replaced, FAILED)
            self._replaced.append(
                ReplacedTransfer(replaced.hex(), header.transfer_id.hex())
            )
        return self._start(header, now)

    def _start(self, header: ChunkHeader, now: float) -> _Transfer:
        try:
            make_state_folder(self.folder, STATE_FOLDERS[OTA])
        except OtaError:
            self._remember(header.transfer_id, FAILED)
            raise
        path = self.folder / f"{header.transfer_id.hex()}.part"
        self._remove_abandoned(keep=path)
        received = _stored_chunks(path, header)
        if received:
            # The daemon restarted during this transfer. The broker does not
            # send the chunks it acknowledged again, so they are kept.
            logger.info(
                "Resuming model transfer %s: %d of %d chunks already stored",
                header.transfer_id.hex(),
                len(received),
                header.count,
            )
        else:
            with open(path, "wb") as stream:
                stream.truncate(header.total_bytes)
            _received_path(path).write_bytes(_archive_identity(header))
            # Both names must survive a power cut, or a restart would start
            # the transfer anew without the chunks acknowledged before it.
            fsync_directory(self.folder)
            logger.info(
                "Receiving model transfer %s: %d bytes in %d chunks",
                header.transfer_id.hex(),
                header.total_bytes,
                header.count,
            )
        self._transfer = _Transfer(header, path, received, last_chunk_at=now)
        return self._transfer

    def _remove_abandoned(self, keep: Path) -> None:
        """Delete partial and complete archives of transfers that a restart cut off.

        One transfer runs at a time, so any other ``.part`` file is left
        over from a transfer that stopped with the daemon. A ``.tar`` file
        is left by a kill during its install, and a new transfer replaces it.
        """
        for old in self.folder.glob("*.part"):
            if old != keep:
                logger.info("Deleting %s, left by an interrupted model transfer", old)
                _delete_partial(old)
                transfer_id = _transfer_id_of(old)
                if transfer_id is not None:
                    self._remember(transfer_id, FAILED)
                    self._replaced.append(
                        ReplacedTransfer(transfer_id.hex(), keep.stem)
                    )
        # A kill after _verify renamed the archive leaves its list behind, and
        # so did a kill between the deletions of versions that deleted the
        # archive first.
        for listed in self.folder.glob("*.received"):
            if not listed.with_suffix(".part").exists():
                logger.info("Deleting %s, left by an interrupted transfer", listed)
                listed.unlink(missing_ok=True)
        for old in self.folder.glob("*.tar"):
            logger.info("Deleting %s, left by an interrupted model install", old)
            old.unlink(missing_ok=True)

    def _abandon(self, transfer_id: bytes) -> None:
        """Drop a transfer whose file cannot be written, and its later chunks."""
        if self._transfer is not None and self._transfer.header.transfer_id == (
            transfer_id
        ):
            self._transfer = None
        # Deleting the partial file frees the space that it took.
        path = self.folder / f"{transfer_id.hex()}.part"
        with contextlib.suppress(OSError):
            _received_path(path).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        self._remember(transfer_id, FAILED)

    def _discard(self, transfer: _Transfer) -> None:
        _delete_partial(transfer.path)
        self._transfer = None

    def _verify(self, transfer: _Transfer) -> ReceivedArchive:
        # The list of stored chunks is deleted last, so a restart during the
        # check resumes the complete transfer and checks it again.
        listed = _received_path(transfer.path)
        expected = transfer.header.sha256.hex()
        actual = sha256_file(transfer.path)
        transfer_id = transfer.header.transfer_id.hex()
        if actual != expected:
            _delete_partial(transfer.path)
            raise OtaError(
                "checksum_mismatch",
                f"model transfer {transfer_id}: archive sha256 is {actual}, the hub "
                f"announced {expected}; the update is discarded, so send it again",
            )
        final = transfer.path.with_suffix(".tar")
        os.replace(transfer.path, final)
        listed.unlink(missing_ok=True)
        return ReceivedArchive(transfer_id, final, transfer.header.total_bytes)


def _sync(stream: BinaryIO) -> None:
    """Write ``stream``'s buffer and its file's data to the disk."""
    stream.flush()
    os.fsync(stream.fileno())


def _delete_partial(part: Path) -> None:
    """Delete a partial archive and its list of stored chunks.

    The list goes first, so a kill in between leaves a ``.part`` file,
    which the next transfer deletes, and never a list without its archive.
    """
    _received_path(part).unlink(missing_ok=True)
    part.unlink(missing_ok=True)


def _received_path(part: Path) -> Path:
    """Return the file that lists the stored chunks of ``part``.

    It starts with ``_archive_identity`` of the transfer, then has 4 bytes,
    little-endian, per stored chunk index.
    """
    return part.with_suffix(".received")


def _archive_identity(header: ChunkHeader) -> bytes:
    """Return the header fields that every chunk of one archive repeats, packed.

    64 bytes, a multiple of an index's 4, so the indices after it stay aligned.
    """
    return _IDENTITY.pack(
        header.transfer_id,
        header.total_bytes,
        header.chunk_bytes,
        header.count,
        header.sha256,
    )


def _transfer_id_of(part: Path) -> bytes | None:
    """Return the transfer id that names a partial file, or None for another name."""
    try:
        transfer_id = bytes.fromhex(part.stem)
    except ValueError:
        return None
    return transfer_id if len(transfer_id) == 16 else None


def _stored_chunks(part: Path, header: ChunkHeader) -> set[int]:
    """Return the chunks of ``header`` that an earlier run stored in ``part``.

    Returns an empty set when there is no such file or it does not fit the
    announced archive, for example when a sender reused the transfer id for
    another archive. A wrong chunk would still fail the final sha256 check.
    """
    try:
        if part.stat().st_size != header.total_bytes:
            return set()
        listed = _received_path(part).read_bytes()
    except FileNotFoundError:
        return set()
    identity = _archive_identity(header)
    if not listed.startswith(identity):
        return set()
    whole = len(listed) - len(listed) % 4
    indices = (
        int.from_bytes(listed[at : at + 4], "little")
        for at in range(len(identity), whole, 4)
    )
    return {index for index in indices if index < header.count}


def _same_archive(first: ChunkHeader, second: ChunkHeader) -> bool:
    return (
        first.total_bytes == second.total_bytes
        and first.chunk_bytes == second.chunk_bytes
        and first.count == second.count
        and first.sha256 == second.sha256
    )
