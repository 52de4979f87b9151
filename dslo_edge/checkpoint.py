"""Atomic checkpoints of the student weights and the adaptation state.

Each checkpoint is one safetensors file: the weights and any state arrays as
tensors, the rest as JSON in the file metadata, plus a sha256 over all tensor
bytes and one over the JSON text, so a torn or corrupt file is detected on
load. A save writes a temporary file, fsyncs it, renames it into place and
fsyncs the directory; the newest ``keep`` generations stay on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d{8})\.safetensors$")


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    sequence: int
    tensors: dict[str, np.ndarray]
    state: dict[str, Any]


def _digest(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensors[name]).tobytes())
    return digest.hexdigest()


def fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or new file.

    The data goes to a temporary file beside it, which is fsynced and
    renamed over ``path``, and then the folder is fsynced.

    Raises:
        OSError: a step failed. Before the rename, ``path`` is unchanged and
            the temporary file is removed.
    """
    temporary = path.with_suffix(".tmp")
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Return (sequence, path) of checkpoint files, newest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def move_generations(folder: Path, destination: Path) -> Path | None:
    """Move every generation in ``folder`` into a new folder under ``destination``.

    The new folder is named after the current UTC time and is unique, so
    generations moved earlier are never replaced. Pruning reads ``folder``
    only, so it never deletes the moved files.

    Returns:
        The new folder, or None when ``folder`` contains no generation.

    Raises:
        OSError: a folder cannot be created or a file cannot be moved.
    """
    generations = list_checkpoints(folder)
    if not generations:
        return None
    return _move_into_new_folder([path for _, path in generations], destination)


def move_file(path: Path, destination: Path) -> Path:
    """Move one generation into a new folder under ``destination``.

    This is ``move_generations`` for a single file. Returns the new path.

    Raises:
        OSError: the folder cannot be created or the file cannot be moved.
    """
    return _move_into_new_folder([path], destination) / path.name


def _move_into_new_folder(paths: list[Path], destination: Path) -> Path:
    """Move files of one folder into a new folder under ``destination``.

    The new folder is named after the current UTC time plus a unique suffix.
    Returns it.
    """
    destination.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime())
    target = Path(tempfile.mkdtemp(prefix=stamp, dir=destination))
    for path in paths:
        path.rename(target / path.name)
    fsync_directory(paths[0].parent)
    fsync_directory(target)
    return target


def save_checkpoint(
    folder: Path, tensors: dict[str, np.ndarray], state: dict[str, Any], keep: int = 2
) -> Path:
    """Write a new checkpoint generation atomically and prune old ones.

    Raises:
        OSError: the write failed (for example a full disk); the previous
            checkpoints are left untouched.
    """
    folder.mkdir(parents=True, exist_ok=True)
    existing = list_checkpoints(folder)
    sequence = existing[0][0] + 1 if existing else 1
    target = folder / f"checkpoint-{sequence:08d}.safetensors"
    state_text = json.dumps(state)
    metadata = {
        "state": state_text,
        "sha256": _digest(tensors),
        "state_sha256": hashlib.sha256(state_text.encode()).hexdigest(),
    }
    write_durably(target, save_tensors(tensors, metadata=metadata))
    for _, old in list_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return target


def _read(path: Path, sequence: int) -> Checkpoint:
    data = _read_regular_file(path)
    tensors = load_tensors(data)
    header_length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
    if metadata.get("sha256") != _digest(tensors):
        raise ValueError("tensor checksum does not match")
    state_text = metadata["state"]
    # Checkpoints of earlier versions have no checksum of their state.
    expected = metadata.get("state_sha256")
    if (
        expected is not None
        and expected != hashlib.sha256(state_text.encode()).hexdigest()
    ):
        raise ValueError("state checksum does not match")
    return Checkpoint(path, sequence, tensors, json.loads(state_text))


def _read_regular_file(path: Path) -> bytes:
    """Read ``path``, raising ValueError when it is not a regular file.

    The file is opened without blocking, so a FIFO in place of a checkpoint
    fails here instead of waiting for a writer.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError("not a regular file")
        return stream.read()


def load_older_checkpoint(
    folder: Path, sequence: int, quarantine: bool = False
) -> Checkpoint | None:
    """Return the newest generation older than ``sequence`` that reads back intact.

    Unreadable generations are logged and skipped, and with ``quarantine``
    renamed as in ``load_latest_checkpoint``.
    """
    generations = [
        (older, path) for older, path in list_checkpoints(folder) if older < sequence
    ]
    return _load_first_readable(generations, quarantine)


def load_latest_checkpoint(folder: Path, quarantine: bool = False) -> Checkpoint | None:
    """Return the newest checkpoint that reads back intact, or None.

    A corrupt or truncated generation is logged and skipped, so a crash in
    the middle of a save falls back to the generation before it. With
    ``quarantine``, skipped files get a ``.corrupt`` suffix, so they are kept
    for inspection but never counted as a generation again.
    """
    return _load_first_readable(list_checkpoints(folder), quarantine)


def _load_first_readable(
    generations: list[tuple[int, Path]], quarantine: bool
) -> Checkpoint | None:
    for sequence, path in generations:
        try:
            return _read(path, sequence)
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            logger.warning("Skipping unreadable checkpoint %s: %s", path, error)
            if quarantine:
                _quarantine(path)
    return None


def rename_aside(path: Path, suffix: str) -> Path:
    """Rename a generation in its folder so it no longer counts as one.

    The new name is the old one plus ``suffix``. The next save reuses the
    generation's number, so when that name is taken by an earlier file the
    new one gets ``<suffix>-2`` and so on, and never replaces it.

    Returns:
        The new path.

    Raises:
        OSError: the rename failed.
    """
    target = path.with_name(path.name + suffix)
    number = 2
    while target.exists():
        target = path.with_name(f"{path.name}{suffix}-{number}")
        number += 1
    path.rename(target)
    return target


def _quarantine(path: Path) -> None:
    """Rename a bad generation so pruning never keeps it over a good one."""
    try:
        target = rename_aside(path, ".corrupt")
    except OSError as error:
        logger.warning("Cannot rename unreadable checkpoint %s: %s", path, error)
        return
    logger.info("Renamed unreadable checkpoint %s to %s", path, target.name)
