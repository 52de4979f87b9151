"""Folders of the daemon's state directory, and the check that each is a directory.

The daemon creates each folder when it first writes there. A file or a
broken symlink in its place makes every write fail, so the daemon checks
them at start and before an over-the-air update writes to them.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"
BUNDLES = "bundles"
OTA = "ota"
KEPT_CHECKPOINTS = "kept-checkpoints"
# The role that error messages give each folder, by name.
STATE_FOLDERS = {
    CHECKPOINTS: "the checkpoints folder",
    BUNDLES: "the folder of over-the-air releases",
    OTA: "the folder of incoming over-the-air transfers",
    KEPT_CHECKPOINTS: "the folder of checkpoints kept across model changes",
}


def state_folder_problem(folder: Path, role: str) -> str | None:
    """Describe why ``folder`` cannot be used as ``role``, or return None.

    A missing folder is no problem, because the daemon creates it.
    """
    if folder.is_symlink() and not folder.is_dir():
        return (
            f"{folder} in device.state_dir is a symlink that leads to no "
            "directory (a loop, or a missing or non-directory target), "
            f"expected {role}; remove the symlink or point it at a directory"
        )
    if folder.exists() and not folder.is_dir():
        return (
            f"{folder} in device.state_dir is a file, expected {role}; "
            "move the file away"
        )
    return None
