"""Energy, battery and thermal readers against fake sysfs trees."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dslo_edge.power import (
    BatteryCapacity,
    EnergyMeter,
    PowerModel,
    describe_energy,
    discover_sources,
    external_power_online,
    process_cpu_seconds,
    read_batteries,
    read_thermal_zones,
)
from dslo_edge.power.sources import (
    BatteryEnergySource,
    BatteryPowerSource,
    CpuModelSource,
    HwmonPowerSource,
    RaplSource,
)
from tests.sysfs_tree import (
    FakeClock,
    hwmon,
    power_supply,
    powercap,
    proc_stat,
    thermal_zone,
)

PI4_MODEL = PowerModel("raspberry-pi-4b", idle_watts=2.7, active_watts=6.4, cores=4)


def battery_with_power(root: Path, status: str = "Discharging", **extra: object):
    attributes: dict[str, object] = {
        "type": "Battery",
        "status": status,
        "capacity": 80,
        "energy_full": 37_000_000,
        "energy_now": 29_600_000,
        "power_now": 5_000_000,
    }
    attributes.update(extra)
    return power_supply(root, "BAT0", **attributes)


# Battery state


def test_battery_power_now_and_energy_full(tmp_path: Path) -> None:
    battery_with_power(tmp_path)
    [battery] = read_batteries(tmp_path)
    assert battery.name == "BAT0"
    assert battery.discharging
    assert battery.capacity_percent == 80.0
    assert battery.full_wh == pytest.approx(37.0)
    assert battery.full_wh_source == "energy_full"
    assert battery.power_w == pytest.approx(5.0)
    assert battery.power_source == "power_now"


def test_battery_power_from_current_and_voltage(tmp_path: Path) -> None:
    power_supply(
        tmp_path,
        "battery",
        type="Battery",
        status="Discharging",
        current_now=-800_000,
        voltage_now=3_900_000,
        charge_full=2_500_000,
        voltage_min_design=3_700_000,
        charge_now=1_250_000,
    )
    [battery] = read_batteries(tmp_path)
    assert battery.power_w == pytest.approx(0.8 * 3.9)
    assert battery.power_source == "current_now*voltage_now"
    assert battery.full_wh == pytest.approx(2.5 * 3.7)
    assert battery.full_wh_source == "charge_full*voltage_min_design"
    assert battery.capacity_percent == pytest.approx(50.0)
    assert battery.capacity_source == "charge_now/charge_full"


def test_battery_without_optional_fields(tmp_path: Path) -> None:
    power_supply(tmp_path, "BAT1", type="Battery")
    [battery] = read_batteries(tmp_path)
    assert battery.status is None
    assert battery.capacity_percent is None
    assert battery.full_wh is None
    assert battery.power_w is None
    assert not battery.discharging


def test_battery_list_skips_other_supplies(tmp_path: Path) -> None:
    battery_with_power(tmp_path)
    power_supply(tmp_path, "hid-mouse", type="Battery", scope="Device", capacity=40)
    power_supply(tmp_path, "BAT9", type="Battery", present=0)
    power_supply(tmp_path, "AC", type="Mains", online=0)
    assert [b.name for b in read_batteries(tmp_path)] == ["BAT0"]
    assert external_power_online(tmp_path) is False


def test_external_power_online_states(tmp_path: Path) -> None:
    assert external_power_online(tmp_path) is None
    power_supply(tmp_path, "AC", type="Mains", online=1)
    assert external_power_online(tmp_path) is True


def test_unreadable_attribute_reads_as_none(tmp_path: Path) -> None:
    folder = battery_with_power(tmp_path)
    # A driver that returns an error on read looks like a directory here.
    (folder / "power_now").unlink()
    (folder / "power_now").mkdir()
    [battery] = read_batteries(tmp_path)
    assert battery.power_w is None


# Energy sources


def test_battery_power_source_integrates_power(tmp_path: Path) -> None:
    folder = battery_with_power(tmp_path)
    clock = FakeClock()
    source = BatteryPowerSource(folder, clock)
    assert source.label == "power_supply/BAT0/power_now"
    assert source.read_joules() == 0.0
    clock.advance(2.0)
    (folder / "power_now").write_text("7000000\n")
    # Trapezoid of 5 W and 7 W over 2 s.
    assert source.read_joules() == pytest.approx(12.0)


def test_battery_power_source_none_while_charging(tmp_path: Path) -> None:
    folder = battery_with_power(tmp_path, status="Charging")
    assert BatteryPowerSource(folder, FakeClock()).read_joules() is None


def test_battery_energy_source_counts_decreases(tmp_path: Path) -> None:
    folder = power_supply(
        tmp_path, "BAT0", type="Battery", status="Discharging", energy_now=10_000_000
    )
    [source] = discover_sources(tmp_path)
    assert isinstance(source, BatteryEnergySource)
    assert source.label == "power_supply/BAT0/energy_now"
    assert source.read_joules() == 0.0
    (folder / "energy_now").write_text("9990000\n")
    assert source.read_joules() == pytest.approx(10_000 * 3.6e-3)
    (folder / "energy_now").write_text("9995000\n")  # gauge correction upwards
    assert source.read_joules() == pytest.approx(36.0)


def test_hwmon_ina226_power_input(tmp_path: Path) -> None:
    hwmon(tmp_path, "hwmon3", name="ina226", power1_input=3_200_000)
    clock = FakeClock()
    [source] = discover_sources(tmp_path, clock=clock)
    assert isinstance(source, HwmonPowerSource)
    assert source.label == "hwmon/ina226 (hwmon3)/power1_input"
    source.read_joules()
    clock.advance(0.5)
    assert source.read_joules() == pytest.approx(1.6)


def test_hwmon_ina219_current_times_voltage(tmp_path: Path) -> None:
    hwmon(tmp_path, "hwmon1", name="ina219", curr1_input=600, in1_input=5_100)
    [source] = discover_sources(tmp_path)
    assert isinstance(source, HwmonPowerSource)
    assert source.label == "hwmon/ina219 (hwmon1)/curr1_input*in1_input"
    assert source.read_watts() == pytest.approx(0.6 * 5.1)


def test_hwmon_ignores_other_chips(tmp_path: Path) -> None:
    hwmon(tmp_path, "hwmon0", name="amdgpu", power1_input=15_000_000)
    hwmon(tmp_path, "hwmon2", name="ina226")  # driver loaded, no readings
    assert discover_sources(tmp_path) == []


def test_rapl_counter_wraps_around(tmp_path: Path) -> None:
    zone = powercap(
        tmp_path,
        "intel-rapl:0",
        name="package-0",
        energy_uj=262_143_000_000,
        max_energy_range_uj=262_143_328_850,
    )
    powercap(
        tmp_path, "intel-rapl:0:0", name="core", energy_uj=5, max_energy_range_uj=9
    )
    [source] = discover_sources(tmp_path)
    assert isinstance(source, RaplSource)
    assert source.label == "powercap/intel-rapl:0/energy_uj"
    assert source.read_joules() == 0.0
    (zone / "energy_uj").write_text("1000000\n")
    # 328,850 uJ up to the end of the range, then 1,000,000 uJ after the wrap.
    assert source.read_joules() == pytest.approx(1.32885)
    (zone / "energy_uj").write_text("3000000\n")
    assert source.read_joules() == pytest.approx(3.32885)


def test_rapl_sums_packages(tmp_path: Path) -> None:
    for index in (0, 1):
        powercap(
            tmp_path,
            f"intel-rapl:{index}",
            energy_uj=1_000_000,
            max_energy_range_uj=10**12,
        )
    [source] = discover_sources(tmp_path)
    source.read_joules()
    for index in (0, 1):
        path = tmp_path / f"sys/class/powercap/intel-rapl:{index}/energy_uj"
        path.write_text("3000000\n")
    assert source.read_joules() == pytest.approx(4.0)
    assert source.label == "powercap/intel-rapl:0+intel-rapl:1/energy_uj"


def test_rapl_without_range_is_skipped(tmp_path: Path) -> None:
    powercap(tmp_path, "intel-rapl:0", energy_uj=100)
    assert discover_sources(tmp_path) == []


def test_rapl_vanished_counter_returns_none(tmp_path: Path) -> None:
    zone = powercap(tmp_path, "intel-rapl:0", energy_uj=1, max_energy_range_uj=100)
    [source] = discover_sources(tmp_path)
    (zone / "energy_uj").unlink()
    assert source.read_joules() is None


def test_cpu_seconds_parse_stat_with_spaces(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    proc_stat(tmp_path, utime_ticks=3 * ticks, stime_ticks=ticks)
    assert process_cpu_seconds(tmp_path) == pytest.approx(4.0)


def test_cpu_seconds_fall_back_to_process_time(tmp_path: Path) -> None:
    before = time.process_time()
    assert process_cpu_seconds(tmp_path) >= before


def test_cpu_model_adds_idle_and_busy() -> None:
    clock = FakeClock()
    cpu = FakeClock(start=50.0)
    source = CpuModelSource(PI4_MODEL, cpu_seconds=cpu, clock=clock)
    assert source.estimated
    assert source.label == "profile raspberry-pi-4b power model (CPU time)"
    assert source.read_joules() == 0.0
    clock.advance(10.0)
    cpu.advance(2.0)
    # 2.7 W idle for 10 s, plus (6.4 - 2.7) / 4 W per busy core for 2 CPU s.
    assert source.read_joules() == pytest.approx(27.0 + 1.85)


def test_cpu_model_resolves_short_spans() -> None:
    # A train step often takes under a millisecond, far less than one clock
    # tick of /proc/self/stat, so each span must see its own CPU time. The
    # fake wall clock does not advance, so only the CPU term adds energy.
    source = discover_sources("/", power_model=PI4_MODEL, clock=FakeClock())[-1]
    per_core_watts = (PI4_MODEL.active_watts - PI4_MODEL.idle_watts) / 4
    spans = []
    for _ in range(10):
        start_joules = source.read_joules()
        busy_until = time.process_time() + 0.003
        while time.process_time() < busy_until:
            pass
        spans.append((source.read_joules() - start_joules) / per_core_watts)
    assert min(spans) >= 0.003
    assert max(spans) < 0.006


def test_discover_sources_best_first(tmp_path: Path) -> None:
    battery_with_power(tmp_path)
    hwmon(tmp_path, "hwmon0", name="ina260", power1_input=1)
    powercap(tmp_path, "intel-rapl:0", energy_uj=1, max_energy_range_uj=100)
    board_file = tmp_path / "sys/bus/i2c/in_power0_input"
    board_file.parent.mkdir(parents=True)
    board_file.write_text("2100\n")
    sources = discover_sources(
        tmp_path,
        power_model=PI4_MODEL,
        power_files=[("/sys/bus/i2c/in_power0_input", "mW")],
    )
    assert [type(s).__name__ for s in sources] == [
        "BatteryPowerSource",
        "HwmonPowerSource",
        "PowerFileSource",
        "RaplSource",
        "CpuModelSource",
    ]
    assert sources[2].read_watts() == pytest.approx(2.1)  # type: ignore[attr-defined]


# Energy meter


def test_meter_joules_per_update_and_power(tmp_path: Path) -> None:
    hwmon(tmp_path, "hwmon0", name="ina226", power1_input=4_000_000)
    clock = FakeClock()
    meter = EnergyMeter(discover_sources(tmp_path, clock=clock), clock=clock)
    for _ in range(3):
        with meter.measure(updates=2):
            clock.advance(0.25)
        clock.advance(0.75)
    report = meter.report()
    assert report["source"] == "hwmon/ina226 (hwmon0)/power1_input"
    assert report["estimated"] is False
    assert report["updates"] == 6
    assert report["joules"] == pytest.approx(3.0)
    assert report["joules_per_update"] == pytest.approx(0.5)
    assert report["average_power_w"] == pytest.approx(4.0)
    # 6 updates from the first span's start to the last span's end (2.25 s).
    assert report["updates_per_hour"] == pytest.approx(6 * 3600 / 2.25)
    assert report["battery"] is None


def test_meter_battery_impact_from_battery(tmp_path: Path) -> None:
    battery_with_power(tmp_path, power_now=3_600_000, energy_full=10_000_000)
    clock = FakeClock()
    meter = EnergyMeter(
        discover_sources(tmp_path, clock=clock),
        battery_reader=lambda: read_batteries(tmp_path),
        clock=clock,
    )
    for _ in range(2):
        with meter.measure(updates=1):
            clock.advance(1.0)
        clock.advance(1.0)
    report = meter.report()
    battery = report["battery"]
    assert report["joules_per_update"] == pytest.approx(3.6)
    # 10 Wh is 36 kJ: 1,000 updates of 3.6 J take 10 % of it.
    assert battery["percent_per_1000_updates"] == pytest.approx(10.0)
    # 2 updates in 3 s is 2,400 updates an hour: 8,640 J, 24 % of a charge.
    assert battery["percent_per_hour"] == pytest.approx(24.0)
    assert battery["capacity_source"] == "power_supply/BAT0/energy_full"
    assert battery["status"] == "Discharging"
    assert battery["percent"] == 80.0


def test_meter_falls_back_while_charging(tmp_path: Path) -> None:
    folder = battery_with_power(tmp_path)
    powercap(tmp_path, "intel-rapl:0", energy_uj=0, max_energy_range_uj=10**9)
    clock = FakeClock()
    meter = EnergyMeter(
        discover_sources(tmp_path, clock=clock),
        battery_reader=lambda: read_batteries(tmp_path),
        fallback_capacity=BatteryCapacity(20.0, "profile"),
        clock=clock,
    )
    with meter.measure():
        clock.advance(1.0)
    assert meter.report()["source"] == "power_supply/BAT0/power_now"
    (folder / "status").write_text("Charging\n")
    meter.begin()
    (tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj").write_text("2000000\n")
    span = meter.end()
    assert span is not None
    assert span.source == "powercap/intel-rapl:0/energy_uj"
    assert span.joules == pytest.approx(2.0)
    report = meter.report()
    assert report["source"] == "powercap/intel-rapl:0/energy_uj"
    assert report["updates"] == 1
    assert report["battery"]["capacity_source"] == "power_supply/BAT0/energy_full"


def test_meter_fallback_capacity() -> None:
    clock = FakeClock()
    cpu = FakeClock(start=0.0)
    model = CpuModelSource(PI4_MODEL, cpu_seconds=cpu, clock=clock)
    meter = EnergyMeter(
        [model],
        fallback_capacity=BatteryCapacity(37.0, "config battery_wh"),
        clock=clock,
    )
    with meter.measure(updates=10):
        clock.advance(1.0)
        cpu.advance(1.0)
    report = meter.report()
    assert report["estimated"] is True
    assert report["joules_per_update"] == pytest.approx((2.7 + 0.925) / 10)
    battery = report["battery"]
    assert battery["capacity_source"] == "config battery_wh"
    assert battery["percent_per_1000_updates"] == pytest.approx(
        100 * 1000 * 0.3625 / (37 * 3600), abs=1e-6
    )
    assert battery["percent_per_hour"] is None
    assert battery["status"] is None


def test_meter_window_forgets_old_spans(tmp_path: Path) -> None:
    hwmon(tmp_path, "hwmon0", name="ina226", power1_input=1_000_000)
    clock = FakeClock()
    sources = discover_sources(tmp_path, clock=clock)
    meter = EnergyMeter(sources, clock=clock, window_s=60)
    with meter.measure():
        clock.advance(1.0)
    clock.advance(120.0)
    report = meter.report()
    assert report["joules_per_update"] is None
    assert report["updates"] == 1
    assert report["joules"] == pytest.approx(1.0)


def test_meter_without_sources() -> None:
    meter = EnergyMeter([])
    with meter.measure():
        pass
    report = meter.report()
    assert report["source"] is None
    assert report["joules_per_update"] is None


# Thermal zones


def test_thermal_zones_with_trip_points(tmp_path: Path) -> None:
    thermal_zone(
        tmp_path,
        "thermal_zone0",
        type="cpu-thermal",
        temp=61_850,
        trip_point_0_type="passive",
        trip_point_0_temp=80_000,
        trip_point_1_type="critical",
        trip_point_1_temp=90_000,
        trip_point_2_type="hot",
        trip_point_2_temp=85_000,
    )
    thermal_zone(tmp_path, "thermal_zone1", type="acpitz", temp=27_800)
    thermal_zone(tmp_path, "thermal_zone2", type="broken")  # no temp attribute
    thermal_zone(tmp_path, "cooling_device0", type="Processor", temp=1)
    zones = read_thermal_zones(tmp_path)
    assert [zone.name for zone in zones] == ["thermal_zone0", "thermal_zone1"]
    assert zones[0].celsius == pytest.approx(61.85)
    assert zones[0].kind == "cpu-thermal"
    assert zones[0].throttle_c == pytest.approx(80.0)
    assert zones[1].throttle_c is None


def test_describe_energy_names_sources() -> None:
    clock = FakeClock()
    cpu = FakeClock(start=0.0)
    meter = EnergyMeter(
        [CpuModelSource(PI4_MODEL, cpu_seconds=cpu, clock=clock)],
        fallback_capacity=BatteryCapacity(37.0, "config battery_wh"),
        clock=clock,
    )
    for _ in range(2):
        with meter.measure(updates=4):
            clock.advance(0.01)
            cpu.advance(0.01)
        clock.advance(1.0)
    lines = describe_energy(meter.report())
    label = "profile raspberry-pi-4b power model (CPU time), an estimate"
    assert lines[0].startswith("energy per update: ")
    assert lines[0].endswith(f"mJ ({label})")
    assert lines[1].startswith("average power while adapting: 3.62 W")
    assert lines[2].startswith("battery impact: ")
    assert "% per 1,000 updates" in lines[2]
    # 8 updates from 0 s to the end of the second span at 1.02 s.
    assert "% per hour if updates kept coming at the recent rate" in lines[2]
    assert "(28,235 per hour)" in lines[2]
    assert "capacity 37 Wh from config battery_wh" in lines[2]


@pytest.mark.parametrize(
    ("joules", "text"),
    [
        (0.008147, "energy per update: 8.147 mJ"),
        (0.5, "energy per update: 500 mJ"),
        (10.0, "energy per update: 10 J"),
        (14.8, "energy per update: 14.8 J"),
        (123.456, "energy per update: 123.5 J"),
    ],
)
def test_describe_energy_unit_fits_value(joules: float, text: str) -> None:
    report = {"source": "hwmon/ina226 (hwmon2)/power1_input", "estimated": False}
    report.update(joules_per_update=joules, average_power_w=None, battery=None)

    line = describe_energy(report)[0]

    assert line == f"{text} (hwmon/ina226 (hwmon2)/power1_input)"


def test_describe_energy_without_measurement() -> None:
    assert describe_energy(EnergyMeter([]).report()) == [
        "energy per update: not measured (no energy source was readable)"
    ]
