"""Helpers that build fake sysfs and procfs trees of real files for tests."""

from __future__ import annotations

from pathlib import Path


class FakeClock:
    """A monotonic clock that moves only when a test advances it."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def write_attributes(folder: Path, attributes: dict[str, object]) -> Path:
    """Write each attribute as a file holding its value and a newline."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in attributes.items():
        (folder / name).write_text(f"{value}\n")
    return folder


def power_supply(root: Path, entry: str, /, **attributes: object) -> Path:
    return write_attributes(root / "sys/class/power_supply" / entry, attributes)


def hwmon(root: Path, entry: str, /, **attributes: object) -> Path:
    return write_attributes(root / "sys/class/hwmon" / entry, attributes)


def powercap(root: Path, entry: str, /, **attributes: object) -> Path:
    return write_attributes(root / "sys/class/powercap" / entry, attributes)


def thermal_zone(root: Path, entry: str, /, **attributes: object) -> Path:
    return write_attributes(root / "sys/class/thermal" / entry, attributes)


def proc_stat(root: Path, utime_ticks: int, stime_ticks: int) -> Path:
    """Write ``<root>/proc/self/stat`` with a command name holding ') ('."""
    fields = ["S"] + ["0"] * 10 + [str(utime_ticks), str(stime_ticks)] + ["0"] * 39
    path = root / "proc/self/stat"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("4242 (dslo edge) (x) " + " ".join(fields) + "\n")
    return path
