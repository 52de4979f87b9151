"""Energy, battery and thermal readings for the device daemon.

Readers take a filesystem ``root`` (default ``/``) so that tests can point
them at a fake sysfs tree. See ``sources`` for the order in which energy
sources are preferred and ``meter`` for the figures reported per update.
"""

from dslo_edge.power.battery import BatteryState, external_power_online, read_batteries
from dslo_edge.power.meter import (
    BatteryCapacity,
    EnergyMeter,
    SpanEnergy,
    describe_energy,
)
from dslo_edge.power.sources import (
    EnergySource,
    PowerModel,
    discover_sources,
    process_cpu_seconds,
)
from dslo_edge.power.thermal import ThermalZone, read_thermal_zones

__all__ = [
    "BatteryCapacity",
    "BatteryState",
    "EnergyMeter",
    "EnergySource",
    "PowerModel",
    "SpanEnergy",
    "ThermalZone",
    "describe_energy",
    "discover_sources",
    "external_power_online",
    "process_cpu_seconds",
    "read_batteries",
    "read_thermal_zones",
]
