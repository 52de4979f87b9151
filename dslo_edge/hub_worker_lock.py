"""An exclusive lock on a hub worker id, next to the worker's state file.

Two workers started with the same worker id connect with the same MQTT
client id, so each connect takes the broker session from the other. They
also publish one status topic, and the first to stop marks it ``stopped``
while the other still runs. A worker therefore takes an ``flock`` on
``<state_file>.worker-<id>.lock`` before it loads its teacher. The kernel
releases the lock when the process ends, even after SIGKILL, so a worker
restarted after a crash, by hand or by systemd, finds it free.

Workers on other machines, or with another ``state_file``, lock other files,
so a duplicate id there still shows only as a broker session takeover.

A worker that finds a push run claimed by another worker id takes that id's
lock for a moment (``lock_if_stopped``) to learn whether its worker runs. A
worker starting meanwhile waits up to ``LOCK_WAIT_S`` for the lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dslo_edge.errors import ConfigError

# Linux's NAME_MAX: the longest file name, in bytes, on ext4, XFS and btrfs.
MAX_NAME_BYTES = 255
# How long a starting worker waits for its id's lock, which another worker
# holds only while it checks whether the id's worker runs.
LOCK_WAIT_S = 2.0
LOCK_POLL_S = 0.05


def lock_path(state_file: Path, worker_id: str) -> Path:
    """Return the lock file of a worker id, in the directory of ``state_file``.

    A worker id is one MQTT topic level, which may be longer than a file
    name, so a name over ``MAX_NAME_BYTES`` uses a hash of the id instead.
    """
    name = f"{state_file.name}.worker-{worker_id}.lock"
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        digest = hashlib.sha256(worker_id.encode("utf-8", "surrogateescape"))
        name = f"{state_file.name}.worker-sha256-{digest.hexdigest()[:32]}.lock"
    return state_file.with_name(name)


class WorkerLock:
    """The lock of one worker id, held until ``release``."""

    def __init__(self, state_file: Path, worker_id: str):
        """Lock the worker id; the directory of ``state_file`` must exist.

        Raises:
            ConfigError: the lock file cannot be opened, or another process
                holds the lock.
        """
        self._descriptor: int | None = None
        self.path = lock_path(state_file, worker_id)
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise ConfigError(
                f"{self.path} is a directory, expected the lock file of worker "
                f"id {worker_id!r}; move it out of the directory of "
                "hub.state_file"
            ) from None
        except OSError as error:
            raise ConfigError(
                f"cannot open the lock file {self.path} of worker id "
                f"{worker_id!r}: {error.strerror or error}; give this worker's "
                "user write access to the directory of hub.state_file and to "
                "the file"
            ) from None
        if not _lock_within(descriptor, LOCK_WAIT_S):
            owner = _read_owner(descriptor)
            os.close(descriptor)
            raise ConfigError(
                f"worker id {worker_id!r} is in use by another hub worker with "
                f"hub.state_file {state_file} ({owner}, holding {self.path}); "
                "stop that worker, or start this one with its own --worker-id"
            ) from None
        # Only the lock holder writes, so a reader sees one owner's line, or
        # nothing just before the holder writes it.
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()}, worker {worker_id}\n".encode())
        self._descriptor = descriptor

    def release(self) -> None:
        """Unlock the worker id. Later calls do nothing."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __del__(self) -> None:
        # A worker that is built but never stopped, as in tests, must not keep
        # its id locked for the rest of the process.
        self.release()


def _lock_within(descriptor: int, timeout_s: float) -> bool:
    """Take an exclusive flock, retrying until ``timeout_s``; return True if taken."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        time.sleep(LOCK_POLL_S)


@contextmanager
def lock_if_stopped(state_file: Path, worker_id: str) -> Iterator[bool]:
    """Hold the lock of another worker id for the ``with`` block, if it is free.

    Yields True when no worker with that id and ``state_file`` runs, because
    its lock is free or its lock file is missing, and False when one holds
    the lock. A missing lock file is not created. Keep the block short: a
    worker with that id that starts meanwhile waits up to ``LOCK_WAIT_S``.
    """
    try:
        descriptor = os.open(lock_path(state_file, worker_id), os.O_RDWR)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)


def _read_owner(descriptor: int) -> str:
    """Return the owner line that the holder wrote, or a placeholder."""
    try:
        text = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"
