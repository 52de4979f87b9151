"""An exclusive lock on a daemon's state directory.

Two daemons that share a state directory overwrite each other's
checkpoints, and each restores the other's weights after a restart. The
daemon therefore takes an ``flock`` on ``state_dir/.lock`` before it reads or
writes anything there. The kernel releases the lock when the process ends,
even after SIGKILL, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dslo_edge.errors import ConfigError, StateDirInUse

LOCK_FILE = ".lock"
# The end of the owner line of a lock that ``dslo-edge demo`` takes while it
# replaces the bundle and checkpoints in its folder, before its daemon runs.
DEMO_HOLDER = "dslo-edge demo"


class StateLock:
    """The lock of one state directory, held until ``release``."""

    def __init__(self, state_dir: Path, device_id: str, for_demo: bool = False):
        """Create ``state_dir`` if needed and lock it.

        Args:
            state_dir: the folder to lock.
            device_id: the device id, for the owner line in the lock file.
            for_demo: the lock is the demo's, so the owner line ends in
                ``DEMO_HOLDER`` and a daemon that finds it names the demo.

        Raises:
            StateDirInUse: another process holds the lock.
            ConfigError: ``state_dir`` is not a directory that can be created
                and written.
        """
        self.path = state_dir / LOCK_FILE
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as error:
            if not state_dir.is_dir():
                raise _unusable(state_dir, error) from None
            # The folder or an existing lock file, for example one that
            # another user created, denies the daemon's user.
            raise ConfigError(
                f"cannot open the lock file {self.path} in device.state_dir: "
                f"{error.strerror or error}; give the daemon's user write access "
                f"to {state_dir} and the files in it, for example with chown -R"
            ) from None
        except (FileExistsError, NotADirectoryError):
            raise _not_a_directory(state_dir) from None
        except IsADirectoryError:
            raise ConfigError(
                f"{self.path} is a directory, expected the daemon's lock file; "
                "move it out of device.state_dir"
            ) from None
        except OSError as error:
            raise _unusable(state_dir, error) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(descriptor)
            os.close(descriptor)
            raise StateDirInUse(_in_use_message(state_dir, owner), owner) from None
        line = f"pid {os.getpid()}, device {device_id}"
        if for_demo:
            line += f", {DEMO_HOLDER}"
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{line}\n".encode())
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        """Unlock the directory. Later calls do nothing."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def _in_use_message(state_dir: Path, owner: str) -> str:
    """Return the error for a state_dir whose lock ``owner`` holds."""
    if owner.endswith(DEMO_HOLDER):
        return (
            f"device.state_dir {state_dir} is in use by a running dslo-edge demo "
            f"({owner}), which replaces the bundle and checkpoints there and "
            "then starts its own daemon. Start this daemon after the demo ends"
        )
    return (
        f"device.state_dir {state_dir} is in use by another dslo-edge "
        f"daemon ({owner}); give each device its own state_dir"
    )


def _unusable(state_dir: Path, error: OSError) -> ConfigError:
    """Return the error for a state_dir that cannot be created or written."""
    return ConfigError(
        f"cannot use device.state_dir {state_dir}: "
        f"{error.strerror or error}; check that the folder is writable "
        "by the daemon's user"
    )


def _not_a_directory(state_dir: Path) -> ConfigError:
    """Return the error for a state_dir that is, or lies under, a file."""
    blocker = next(
        (path for path in (state_dir, *state_dir.parents) if path.is_file()),
        state_dir,
    )
    where = "is a file" if blocker == state_dir else f"is under the file {blocker}"
    return ConfigError(
        f"device.state_dir {state_dir} {where}, expected a directory; "
        "point state_dir at a folder for this device's checkpoints"
    )


def _read_owner(descriptor: int) -> str:
    """Return the owner line the holder wrote, or a placeholder."""
    try:
        text = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "owner unknown"
