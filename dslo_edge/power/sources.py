"""Energy sources, best first: battery, power sensors, RAPL, then a CPU model.

Every source returns cumulative joules since it was first read, so a caller
brackets a span of work with two reads and takes the difference. Sources that
only report instantaneous power integrate it with the trapezoid rule between
reads, which is exact for a constant draw and an estimate otherwise.

Each source carries a ``label`` naming the files or model behind its figures,
and ``estimated`` is True for the CPU-time model, which measures nothing
electrical.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dslo_edge.power.battery import read_battery
from dslo_edge.power.sysfs import class_devices, read_int, read_text

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

JOULES_PER_MICROWATT_HOUR = 3.6e-3
# hwmon drivers for INA2xx current/power monitors, which boards and power HATs
# put on the supply rail. Other hwmon chips with a power attribute (a GPU, for
# example) measure one component, not the board.
BOARD_POWER_MONITORS = frozenset(
    {"ina209", "ina219", "ina220", "ina226", "ina230", "ina231", "ina238", "ina260"}
)
POWER_FILE_UNITS = {"uW": 1e-6, "mW": 1e-3, "W": 1.0}


class EnergySource(ABC):
    """A cumulative energy reading in joules, labelled with where it comes from."""

    label: str
    estimated: bool = False

    @abstractmethod
    def read_joules(self) -> float | None:
        """Return joules used since the first read, or None if unreadable now."""


class _PowerIntegrator(EnergySource):
    """Integrates instantaneous power readings between successive reads."""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._last: tuple[float, float] | None = None
        self._total = 0.0

    @abstractmethod
    def read_watts(self) -> float | None:
        """Return the present power draw in W, or None if unreadable now."""

    def read_joules(self) -> float | None:
        watts = self.read_watts()
        if watts is None:
            self._last = None
            return None
        now = self._clock()
        if self._last is not None:
            then, previous = self._last
            self._total += (previous + watts) / 2 * (now - then)
        self._last = (now, watts)
        return self._total


class BatteryPowerSource(_PowerIntegrator):
    """Battery discharge power (``power_now`` or ``current_now`` x ``voltage_now``).

    Readable only while the battery discharges: on external power the battery
    current says nothing about what the board draws.
    """

    def __init__(self, folder: Path, clock: Clock = time.monotonic):
        super().__init__(clock)
        self.folder = folder
        state = read_battery(folder)
        self.label = state.label(state.power_source)

    def read_watts(self) -> float | None:
        state = read_battery(self.folder)
        if not state.discharging:
            return None
        return state.power_w


class BatteryEnergySource(EnergySource):
    """Decrease of the battery's ``energy_now`` while it discharges.

    Fuel gauges update ``energy_now`` every few seconds at best, so short spans
    read as zero. It is used only when the driver reports no power or current.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.label = f"power_supply/{folder.name}/energy_now"
        self._last: float | None = None
        self._total = 0.0

    def read_joules(self) -> float | None:
        state = read_battery(self.folder)
        if not state.discharging or state.energy_now_wh is None:
            self._last = None
            return None
        now = state.energy_now_wh * 1e6
        if self._last is not None and now < self._last:
            self._total += (self._last - now) * JOULES_PER_MICROWATT_HOUR
        self._last = now
        return self._total


class HwmonPowerSource(_PowerIntegrator):
    """An INA2xx-style hwmon monitor: ``power1_input`` (µW), else current x voltage.

    ``curr1_input`` is in mA and ``in1_input`` (the bus voltage on INA219 and
    INA226) in mV, so their product is in µW.
    """

    def __init__(self, folder: Path, clock: Clock = time.monotonic):
        super().__init__(clock)
        self.folder = folder
        chip = read_text(folder / "name") or "unknown"
        attribute = (
            "power1_input"
            if read_int(folder / "power1_input") is not None
            else "curr1_input*in1_input"
        )
        self.label = f"hwmon/{chip} ({folder.name})/{attribute}"

    def read_watts(self) -> float | None:
        power = read_int(self.folder / "power1_input")
        if power is not None:
            return power * 1e-6
        current = read_int(self.folder / "curr1_input")
        voltage = read_int(self.folder / "in1_input")
        if current is None or voltage is None:
            return None
        return abs(current) * voltage * 1e-6


class PowerFileSource(_PowerIntegrator):
    """A board-specific power attribute named by a firmware profile."""

    def __init__(self, path: Path, unit: str, clock: Clock = time.monotonic):
        super().__init__(clock)
        if unit not in POWER_FILE_UNITS:
            raise ValueError(
                f"power file unit {unit!r} is invalid; expected one of "
                f"{', '.join(POWER_FILE_UNITS)}"
            )
        self.path = path
        self.scale = POWER_FILE_UNITS[unit]
        self.label = f"sensor file {path} ({unit})"

    def read_watts(self) -> float | None:
        value = read_int(self.path)
        return None if value is None else abs(value) * self.scale


@dataclass
class _RaplZone:
    energy_path: Path
    max_range_uj: int
    last_uj: int | None = None


class RaplSource(EnergySource):
    """Intel RAPL package energy counters from the powercap class.

    ``energy_uj`` wraps to 0 after ``max_energy_range_uj``. A wrap between two
    reads is corrected, but two wraps are not detectable, so reads must come
    more often than one counter range (about an hour at 70 W for the common
    262 kJ range). RAPL covers the CPU package (and DRAM on some parts), not
    the whole board. Kernels since 5.10 make ``energy_uj`` readable by root
    only, so an unprivileged daemon falls back to the next source.
    """

    def __init__(self, zones: Sequence[tuple[Path, int]]):
        self._zones = [_RaplZone(path, max_range) for path, max_range in zones]
        names = "+".join(zone.energy_path.parent.name for zone in self._zones)
        self.label = f"powercap/{names}/energy_uj"
        self._total_uj = 0

    def read_joules(self) -> float | None:
        readings = [read_int(zone.energy_path) for zone in self._zones]
        if any(value is None for value in readings):
            return None
        for zone, value in zip(self._zones, readings, strict=True):
            assert value is not None
            if zone.last_uj is not None:
                delta = value - zone.last_uj
                if delta < 0:
                    delta += zone.max_range_uj
                self._total_uj += delta
            zone.last_uj = value
        return self._total_uj * 1e-6


@dataclass(frozen=True)
class PowerModel:
    """Board power as a linear function of CPU load, from a firmware profile.

    Attributes:
        name: the profile the figures come from.
        idle_watts: board power with every core idle.
        active_watts: board power with every core fully busy.
        cores: CPU cores; one busy core adds ``(active - idle) / cores``.
    """

    name: str
    idle_watts: float
    active_watts: float
    cores: int


def process_cpu_seconds(root: str | Path = "/") -> float:
    """Return user plus system CPU seconds of this process.

    On the real root this is ``time.process_time()``, which counts in
    nanoseconds. ``/proc/self/stat`` counts in clock ticks (10 ms at the
    usual 100 Hz), longer than most train steps, so a step would read as no
    CPU time or as a whole tick. Under another root, such as a fake tree in
    tests, it reads ``<root>/proc/self/stat`` (fields 14 and 15) and falls
    back to ``time.process_time()`` where that file does not exist.
    """
    if Path(root).resolve() != Path("/"):
        stat = read_text(Path(root) / "proc" / "self" / "stat")
        if stat is not None:
            # The command name in field 2 may contain spaces, so split after it.
            fields = stat.rsplit(")", 1)[-1].split()
            ticks = int(fields[11]) + int(fields[12])
            return ticks / os.sysconf("SC_CLK_TCK")
    return time.process_time()


class CpuModelSource(EnergySource):
    """Estimated board energy: idle power over wall time plus load on CPU time."""

    estimated = True

    def __init__(
        self,
        model: PowerModel,
        cpu_seconds: Callable[[], float] = process_cpu_seconds,
        clock: Clock = time.monotonic,
    ):
        self.model = model
        self.label = f"profile {model.name} power model (CPU time)"
        self._cpu_seconds = cpu_seconds
        self._clock = clock
        self._start: tuple[float, float] | None = None

    def read_joules(self) -> float | None:
        now, cpu = self._clock(), self._cpu_seconds()
        if self._start is None:
            self._start = (now, cpu)
        start_time, start_cpu = self._start
        model = self.model
        per_core_watts = (model.active_watts - model.idle_watts) / model.cores
        return model.idle_watts * (now - start_time) + per_core_watts * (
            cpu - start_cpu
        )


def discover_sources(
    root: str | Path = "/",
    *,
    power_model: PowerModel | None = None,
    power_files: Sequence[tuple[str, str]] = (),
    clock: Clock = time.monotonic,
    cpu_seconds: Callable[[], float] | None = None,
) -> list[EnergySource]:
    """Find the energy sources present under ``root``, best first.

    Order: battery power, battery energy, INA2xx hwmon monitors, profile power
    files, RAPL package counters, and the profile's power model last. A battery
    source yields readings only while the battery discharges, so on external
    power the next source is used.

    Args:
        root: filesystem root holding ``sys`` and ``proc``; tests pass a fake tree.
        power_model: the firmware profile's idle and active power, if any.
        power_files: ``(path, unit)`` pairs of board-specific power attributes,
            with paths relative to the real root and resolved under ``root``.
        clock: monotonic seconds, injected in tests.
        cpu_seconds: process CPU seconds for the model; defaults to
            ``process_cpu_seconds(root)``.
    """
    sources: list[EnergySource] = []
    sources.extend(_battery_sources(root, clock))
    sources.extend(_hwmon_sources(root, clock))
    for path, unit in power_files:
        resolved = Path(root) / path.lstrip("/")
        if read_int(resolved) is not None:
            sources.append(PowerFileSource(resolved, unit, clock))
    rapl = _rapl_source(root)
    if rapl is not None:
        sources.append(rapl)
    if power_model is not None:
        cpu = cpu_seconds or (lambda: process_cpu_seconds(root))
        sources.append(CpuModelSource(power_model, cpu, clock))
    logger.debug("Energy sources, best first: %s", [s.label for s in sources])
    return sources


def _battery_sources(root: str | Path, clock: Clock) -> list[EnergySource]:
    sources: list[EnergySource] = []
    for folder in class_devices(root, "power_supply"):
        if read_text(folder / "type") != "Battery":
            continue
        if read_text(folder / "scope") == "Device":
            continue
        state = read_battery(folder)
        if state.power_source is not None:
            sources.append(BatteryPowerSource(folder, clock))
        elif read_int(folder / "energy_now") is not None:
            sources.append(BatteryEnergySource(folder))
    return sources


def _hwmon_sources(root: str | Path, clock: Clock) -> list[EnergySource]:
    sources: list[EnergySource] = []
    for folder in class_devices(root, "hwmon"):
        if read_text(folder / "name") not in BOARD_POWER_MONITORS:
            continue
        has_power = read_int(folder / "power1_input") is not None
        has_product = (
            read_int(folder / "curr1_input") is not None
            and read_int(folder / "in1_input") is not None
        )
        if has_power or has_product:
            sources.append(HwmonPowerSource(folder, clock))
    return sources


def _rapl_source(root: str | Path) -> RaplSource | None:
    zones = []
    for folder in class_devices(root, "powercap"):
        # Top-level zones are intel-rapl:N (one per package); intel-rapl:N:M
        # are their subzones, already included in the package count.
        if not folder.name.startswith("intel-rapl:") or folder.name.count(":") != 1:
            continue
        energy = folder / "energy_uj"
        max_range = read_int(folder / "max_energy_range_uj")
        if read_int(energy) is None or not max_range:
            continue
        zones.append((energy, max_range))
    return RaplSource(zones) if zones else None
