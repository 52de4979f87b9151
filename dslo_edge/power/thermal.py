"""Thermal zone temperatures and trip points from ``/sys/class/thermal``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dslo_edge.power.sysfs import class_devices, read_int, read_text

# Trip types at which the kernel starts throttling. A "critical" trip shuts the
# system down instead.
THROTTLE_TRIP_TYPES = ("passive", "hot")


@dataclass(frozen=True)
class ThermalZone:
    """One thermal zone reading.

    Attributes:
        name: the zone directory name, for example ``thermal_zone0``.
        kind: the zone's ``type`` (``cpu-thermal``, ``x86_pkg_temp``, ...).
        celsius: the temperature in degrees Celsius.
        throttle_c: the lowest passive or hot trip point in degrees Celsius,
            or None if the zone has none.
    """

    name: str
    kind: str
    celsius: float
    throttle_c: float | None


def read_thermal_zones(root: str | Path = "/") -> list[ThermalZone]:
    """Read every thermal zone whose ``temp`` (millidegrees Celsius) is readable.

    Zones whose sensor is absent or returns an error on read are left out.
    """
    zones = []
    for folder in class_devices(root, "thermal"):
        if not folder.name.startswith("thermal_zone"):
            continue
        millidegrees = read_int(folder / "temp")
        if millidegrees is None:
            continue
        zones.append(
            ThermalZone(
                name=folder.name,
                kind=read_text(folder / "type") or "unknown",
                celsius=millidegrees / 1000,
                throttle_c=_throttle_trip(folder),
            )
        )
    return zones


def _throttle_trip(folder: Path) -> float | None:
    trips = []
    for type_file in folder.glob("trip_point_*_type"):
        if read_text(type_file) not in THROTTLE_TRIP_TYPES:
            continue
        temp = read_int(type_file.with_name(type_file.name[: -len("type")] + "temp"))
        if temp is not None:
            trips.append(temp / 1000)
    return min(trips) if trips else None
