"""Battery state from the kernel's power_supply class.

Units follow the kernel's sysfs ABI for power_supply: energy in µWh, charge
in µAh, power in µW, current in µA, voltage in µV and capacity in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dslo_edge.power.sysfs import class_devices, read_int, read_text

DISCHARGING = "Discharging"
MICRO = 1e-6


@dataclass(frozen=True)
class BatteryState:
    """One system battery as read from ``/sys/class/power_supply/<name>``.

    Attributes:
        name: the power_supply entry name, for example ``BAT0``.
        status: the driver's status string (``Charging``, ``Discharging``,
            ``Full``, ``Not charging`` or ``Unknown``), or None if absent.
        capacity_percent: state of charge in percent, or None.
        capacity_source: the attribute(s) the percentage came from.
        full_wh: energy of a full charge in Wh, or None.
        full_wh_source: the attribute(s) ``full_wh`` came from.
        energy_now_wh: remaining energy in Wh, or None.
        power_w: magnitude of the power flowing in or out of the battery,
            in W, or None.
        power_source: the attribute(s) ``power_w`` came from.
    """

    name: str
    status: str | None
    capacity_percent: float | None
    capacity_source: str | None
    full_wh: float | None
    full_wh_source: str | None
    energy_now_wh: float | None
    power_w: float | None
    power_source: str | None

    @property
    def discharging(self) -> bool:
        return self.status == DISCHARGING

    def label(self, attributes: str | None) -> str:
        """Return ``power_supply/<name>/<attributes>`` for reports."""
        return f"power_supply/{self.name}/{attributes}"


def read_batteries(root: str | Path = "/") -> list[BatteryState]:
    """Read every system battery under ``<root>/sys/class/power_supply``.

    Batteries of peripherals (a wireless mouse reports ``scope`` = ``Device``)
    are skipped because they do not power the board.
    """
    batteries = []
    for folder in class_devices(root, "power_supply"):
        if read_text(folder / "type") != "Battery":
            continue
        if read_text(folder / "scope") == "Device":
            continue
        if read_int(folder / "present") == 0:
            continue
        batteries.append(read_battery(folder))
    return batteries


def read_battery(folder: Path) -> BatteryState:
    """Read one power_supply battery directory."""
    capacity, capacity_source = _capacity_percent(folder)
    full_wh, full_source = _full_wh(folder)
    power_w, power_source = _power_w(folder)
    return BatteryState(
        name=folder.name,
        status=read_text(folder / "status"),
        capacity_percent=capacity,
        capacity_source=capacity_source,
        full_wh=full_wh,
        full_wh_source=full_source,
        energy_now_wh=_scaled(read_int(folder / "energy_now")),
        power_w=power_w,
        power_source=power_source,
    )


def _scaled(micro_value: int | None) -> float | None:
    return None if micro_value is None else micro_value * MICRO


def _capacity_percent(folder: Path) -> tuple[float | None, str | None]:
    capacity = read_int(folder / "capacity")
    if capacity is not None:
        return float(capacity), "capacity"
    for now_name, full_name in (
        ("energy_now", "energy_full"),
        ("charge_now", "charge_full"),
    ):
        now = read_int(folder / now_name)
        full = read_int(folder / full_name)
        if now is not None and full:
            return 100.0 * now / full, f"{now_name}/{full_name}"
    return None, None


def _full_wh(folder: Path) -> tuple[float | None, str | None]:
    energy_full = read_int(folder / "energy_full")
    if energy_full:
        return energy_full * MICRO, "energy_full"
    charge_full = read_int(folder / "charge_full")
    if not charge_full:
        return None, None
    # Charge times the minimum design voltage underestimates the energy a
    # little, which errs on the side of a larger battery impact.
    for voltage_name in ("voltage_min_design", "voltage_now"):
        voltage = read_int(folder / voltage_name)
        if voltage:
            return charge_full * MICRO * voltage * MICRO, f"charge_full*{voltage_name}"
    return None, None


def _power_w(folder: Path) -> tuple[float | None, str | None]:
    power = read_int(folder / "power_now")
    if power is not None:
        return abs(power) * MICRO, "power_now"
    current = read_int(folder / "current_now")
    voltage = read_int(folder / "voltage_now")
    if current is not None and voltage is not None:
        # Some drivers report a negative current while discharging.
        return abs(current) * MICRO * voltage * MICRO, "current_now*voltage_now"
    return None, None


def external_power_online(root: str | Path = "/") -> bool | None:
    """Return whether a mains or USB supply reports ``online``, None if none exist."""
    found = False
    for folder in class_devices(root, "power_supply"):
        if read_text(folder / "type") in ("Mains", "USB", "USB_C", "USB_PD"):
            online = read_int(folder / "online")
            if online is None:
                continue
            found = True
            if online:
                return True
    return False if found else None
