"""Temporary files of ``write_report`` and the removal of stale ones.

``write_report`` writes into a staging folder in ``out/evaluation`` and a
temporary page in ``out`` and renames them into place. A process killed in
between (SIGKILL, a power cut) leaves them behind, so each name contains the
host name, the process id and the PID namespace of its writer. A later report
removes those of processes that no longer run on this host and leaves any
other alone. The namespace distinguishes the process ids of containers, which
can have the host's name (``docker run --uts=host``) but ids of their own.
``converters.output_dir`` names and removes the staging folders of
``dslo-edge convert`` the same way, with ``owned_prefix``, ``owned_entries``
and ``remove_dead_writers``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

STAGING_PREFIX = ".staging-"
PAGE_PREFIX = ".evaluation-"
PAGE_SUFFIX = ".md"
# Linux's PID_MAX_LIMIT (include/linux/threads.h) on 64-bit systems.
MAX_PID = 4_194_304

logger = logging.getLogger(__name__)

# The host name, process id and PID namespace in a temporary file's name.
Owner = tuple[str, int, int]


def make_staging_dir(folder: Path) -> Path:
    """Create a staging folder in ``folder`` whose name contains this process."""
    return Path(tempfile.mkdtemp(prefix=owned_prefix(STAGING_PREFIX), dir=folder))


def make_page_file(out: Path) -> Path:
    """Create an empty temporary page in ``out`` whose name contains this process.

    The page gets the mode of any new file under the umask, like the plots,
    and not mkstemp's 0600, because it becomes evaluation.md.
    """
    handle, name = tempfile.mkstemp(
        prefix=owned_prefix(PAGE_PREFIX), suffix=PAGE_SUFFIX, dir=out
    )
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)
    finally:
        os.close(handle)
    return Path(name)


def remove_stale(out: Path) -> None:
    """Delete the temporary files that killed report writers left in ``out``.

    A file whose writer still runs on this host is kept, because that run
    may be writing its own report. A file of another host or PID namespace,
    or one whose name does not contain its writer, is kept and named in a
    warning.
    """
    leftovers = owned_entries(out / "evaluation", STAGING_PREFIX, "")
    leftovers += owned_entries(out, PAGE_PREFIX, PAGE_SUFFIX)
    remove_dead_writers(leftovers, "dslo-edge evaluate", out)


def remove_dead_writers(
    leftovers: list[tuple[Path, Owner | None]],
    command: str,
    folder: Path,
    reject: Callable[[Path], str | None] | None = None,
) -> None:
    """Delete each of ``leftovers`` whose writer no longer runs on this host.

    Args:
        leftovers: entries with their owners, as ``owned_entries`` returns.
        command: the command that writes them, named in the warnings.
        folder: the folder that the command writes into, named in the
            warnings.
        reject: returns why an entry of a dead writer must stay, or None to
            delete it. A rejected entry is kept and named in a warning.
    """
    # NOTE: two machines with one host name that share ``folder`` (NFS) still
    # look like one host, so one can delete the other's running staging.
    this_writer = (socket.gethostname(), _pid_namespace())
    for path, owner in leftovers:
        if owner is None or (owner[0], owner[2]) != this_writer:
            logger.warning(
                "%s may be left by a killed %s; delete it when no %s run "
                "writes into %s",
                path,
                command,
                command,
                folder,
            )
        elif _process_running(owner[1]):
            logger.info(
                "Kept %s: process %d, which may be writing it, is running",
                path,
                owner[1],
            )
        elif reject is not None and (reason := reject(path)) is not None:
            logger.warning(
                "Kept %s, although process %d, whose name it has, no longer "
                "runs: %s; delete it by hand if it is not needed",
                path,
                owner[1],
                reason,
            )
        else:
            _remove(path, owner[1])


def foreign_entry_reason(
    path: Path, accepts: Callable[[Path], bool], command: str
) -> str | None:
    """Return why ``path`` is not a staging folder that ``command`` wrote, or None.

    It must be a directory whose entries ``accepts`` all take.
    """
    if path.is_symlink() or not path.is_dir():
        return "it is not a directory"
    try:
        entries = list(path.iterdir())
    except OSError as error:
        return f"it cannot be listed: {error.strerror or error}"
    for entry in entries:
        if not accepts(entry):
            return f"it contains {entry.name}, which {command} does not write"
    return None


def owned_prefix(prefix: str) -> str:
    """Return ``prefix`` followed by this process's host name, id and namespace."""
    return f"{prefix}{socket.gethostname()}-{os.getpid()}-{_pid_namespace()}-"


def _pid_namespace() -> int:
    """Return the inode number of this process's PID namespace, 0 if unknown."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owned_entries(
    folder: Path, prefix: str, suffix: str
) -> list[tuple[Path, Owner | None]]:
    """Return each entry of ``folder`` whose name has ``prefix`` and ``suffix``.

    Each comes with the (host, pid, namespace) that ``owned_prefix`` put in
    its name, or None when the name does not contain them.
    """
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob(f"{prefix}*{suffix}")):
        middle = path.name[len(prefix) : len(path.name) - len(suffix)]
        # mkstemp's random part has no "-", but a host name may.
        parts = middle.rsplit("-", 3)
        owner = None
        if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
            pid = int(parts[1])
            if 1 <= pid <= MAX_PID:
                owner = (parts[0], pid, int(parts[2]))
        found.append((path, owner))
    return found


def _process_running(pid: int) -> bool:
    # NOTE: a new process can reuse the id of a killed writer, and then the
    # writer's files stay until that process ends.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs as another user
    return True


def _remove(path: Path, pid: int) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as error:
        logger.warning(
            "Could not delete %s, left by process %d, which no longer runs: %s",
            path,
            pid,
            error,
        )
        return
    logger.info("Deleted %s, left by process %d, which no longer runs", path, pid)
