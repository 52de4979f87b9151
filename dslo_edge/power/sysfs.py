"""Small readers for sysfs attribute files under a configurable root.

Drivers leave out attributes they cannot measure, and some return an error
such as ENODATA or EINVAL on read instead. Both cases read as None here, so
callers fall back to the next source rather than fail.
"""

from __future__ import annotations

from pathlib import Path


def read_text(path: Path) -> str | None:
    """Return a sysfs attribute's stripped text, or None if it cannot be read."""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def read_int(path: Path) -> int | None:
    """Return a sysfs attribute as an integer, or None if missing or not a number."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def class_devices(root: str | Path, device_class: str) -> list[Path]:
    """Return the entries of ``<root>/sys/class/<device_class>``, sorted by name."""
    folder = Path(root) / "sys" / "class" / device_class
    try:
        return sorted(folder.iterdir(), key=lambda path: path.name)
    except OSError:
        return []
