"""Budget policy: pauses and resumes for battery, heat and energy."""

from __future__ import annotations

from pathlib import Path

import pytest

from dslo_edge.budget import BudgetPolicy, BudgetSettings
from dslo_edge.errors import ConfigError
from tests.sysfs_tree import FakeClock, power_supply, thermal_zone


def battery(root: Path, percent: int, status: str = "Discharging") -> None:
    power_supply(root, "BAT0", type="Battery", capacity=percent, status=status)


def zone(root: Path, millidegrees: int, **trips: object) -> None:
    thermal_zone(root, "thermal_zone0", type="cpu-thermal", temp=millidegrees, **trips)


def test_runs_with_no_sensors(tmp_path: Path) -> None:
    decision = BudgetPolicy(BudgetSettings(), root=tmp_path).check()
    assert not decision.paused
    assert decision.reason is None
    assert decision.as_metrics() == {
        "paused": False,
        "reason": None,
        "codes": [],
        "resume_in_s": None,
    }


def test_low_battery_pauses_and_resumes(tmp_path: Path) -> None:
    policy = BudgetPolicy(BudgetSettings(20, 25), root=tmp_path)
    battery(tmp_path, 30)
    assert not policy.check().paused

    battery(tmp_path, 18)
    decision = policy.check()
    assert decision.paused
    assert decision.codes == ("battery",)
    assert decision.reason == (
        "battery BAT0 at 18% and discharging, below 20%; "
        "resumes at 25% or on external power"
    )

    battery(tmp_path, 22)  # above the pause threshold, below the resume one
    decision = policy.check()
    assert decision.paused
    assert decision.reason == (
        "battery BAT0 at 22% and discharging, paused since it fell below 20%; "
        "resumes at 25% or on external power"
    )

    battery(tmp_path, 25)
    assert not policy.check().paused


def test_fractional_charge_reads_below_threshold(tmp_path: Path) -> None:
    policy = BudgetPolicy(BudgetSettings(20, 25), root=tmp_path)
    power_supply(
        tmp_path,
        "BAT0",
        type="Battery",
        status="Discharging",
        energy_now=19_960_000,
        energy_full=100_000_000,
    )

    decision = policy.check()

    assert decision.paused
    assert decision.reason == (
        "battery BAT0 at 19.9% and discharging, below 20%; "
        "resumes at 25% or on external power"
    )


def test_low_battery_resumes_on_external_power(tmp_path: Path) -> None:
    policy = BudgetPolicy(BudgetSettings(), root=tmp_path)
    battery(tmp_path, 10)
    assert policy.check().paused
    battery(tmp_path, 10, status="Charging")
    assert not policy.check().paused


def test_low_battery_on_charge_does_not_pause(tmp_path: Path) -> None:
    battery(tmp_path, 5, status="Not charging")
    assert not BudgetPolicy(BudgetSettings(), root=tmp_path).check().paused


def test_hot_zone_pauses_with_hysteresis(tmp_path: Path) -> None:
    policy = BudgetPolicy(
        BudgetSettings(thermal_limit_c=75.0, thermal_resume_margin_c=5.0),
        root=tmp_path,
    )
    zone(tmp_path, 74_000)
    assert not policy.check().paused

    zone(tmp_path, 76_500)
    decision = policy.check()
    assert decision.paused
    assert decision.codes == ("thermal",)
    assert decision.reason == (
        "thermal zone thermal_zone0 (cpu-thermal) at 76.5 C, limit 75.0 C; "
        "resumes below 70.0 C"
    )

    zone(tmp_path, 72_000)
    assert policy.check().paused

    zone(tmp_path, 69_900)
    assert not policy.check().paused


def test_zone_trip_point_is_the_default_limit(tmp_path: Path) -> None:
    policy = BudgetPolicy(BudgetSettings(), root=tmp_path)
    zone(tmp_path, 81_000, trip_point_0_type="passive", trip_point_0_temp=80_000)
    thermal_zone(tmp_path, "thermal_zone1", type="acpitz", temp=99_000)
    decision = policy.check()
    assert decision.paused
    assert "thermal_zone0" in (decision.reason or "")
    assert "limit 80.0 C" in (decision.reason or "")


def test_energy_budget_pauses_until_window_passes() -> None:
    clock = FakeClock()
    policy = BudgetPolicy(
        BudgetSettings(energy_budget_j_per_hour=100.0),
        clock=clock,
        battery_reader=list,
        thermal_reader=list,
    )
    policy.record_energy(60.0)
    clock.advance(600)
    assert not policy.check().paused

    policy.record_energy(50.0)
    decision = policy.check()
    assert decision.paused
    assert decision.codes == ("energy",)
    # The first 60 J leave the window 3,000 s from now, leaving 50 J < 100 J.
    assert decision.resume_in_s == pytest.approx(3000.0)
    assert decision.reason == (
        "energy budget spent: 110.0 J of 100 J in the last hour; "
        "resumes in about 3000 s"
    )

    clock.advance(2999)
    assert policy.check().paused
    clock.advance(1)
    assert not policy.check().paused
    assert policy.spent_last_hour() == pytest.approx(50.0)


def test_small_energy_budget_shows_spent() -> None:
    clock = FakeClock()
    policy = BudgetPolicy(
        BudgetSettings(energy_budget_j_per_hour=0.01),
        clock=clock,
        battery_reader=list,
        thermal_reader=list,
    )
    policy.record_energy(0.0123)

    decision = policy.check()

    assert decision.paused
    assert decision.reason == (
        "energy budget spent: 0.0123 J of 0.01 J in the last hour; "
        "resumes in about 3600 s"
    )


def test_energy_spending_survives_restart() -> None:
    clock = FakeClock()
    settings = BudgetSettings(energy_budget_j_per_hour=100.0)
    before = BudgetPolicy(
        settings, clock=clock, battery_reader=list, thermal_reader=list
    )
    before.record_energy(70.0)
    clock.advance(600)
    before.record_energy(40.0)
    clock.advance(30)
    saved = before.saved_spending()

    # A new process: its monotonic clock starts elsewhere, 20 s after the save.
    restarted_clock = FakeClock(start=5.0)
    after = BudgetPolicy(
        settings, clock=restarted_clock, battery_reader=list, thermal_reader=list
    )
    after.restore_spending(saved, seconds_since_save=20.0)

    assert saved == [[600.0, 70.0], [0.0, 40.0]]
    assert after.spent_last_hour() == pytest.approx(110.0)
    decision = after.check()
    assert decision.paused
    assert decision.codes == ("energy",)
    # The 70 J were recorded 650 s ago as restored (630 s, rounded down to
    # 600 s, plus 20 s), so they leave the window in 2,980 s.
    assert decision.resume_in_s == pytest.approx(2980.0)
    restarted_clock.advance(2980)
    assert not after.check().paused
    assert after.spent_last_hour() == pytest.approx(40.0)


@pytest.mark.parametrize(
    "saved",
    [None, "60", [[60.0]], [[-1.0, 5.0]], [[60.0, float("nan")]], [[True, 5.0]]],
)
def test_restore_spending_skips_invalid(saved) -> None:
    policy = BudgetPolicy(
        BudgetSettings(energy_budget_j_per_hour=100.0),
        clock=FakeClock(),
        battery_reader=list,
        thermal_reader=list,
    )

    policy.restore_spending(saved, seconds_since_save=0.0)

    assert policy.spent_last_hour() == 0.0


def test_restore_spending_drops_old_minutes() -> None:
    policy = BudgetPolicy(
        BudgetSettings(energy_budget_j_per_hour=100.0),
        clock=FakeClock(),
        battery_reader=list,
        thermal_reader=list,
    )

    policy.restore_spending([[3000.0, 80.0], [60.0, 30.0]], seconds_since_save=700.0)

    assert policy.spent_last_hour() == pytest.approx(30.0)


def test_several_reasons_are_joined(tmp_path: Path) -> None:
    policy = BudgetPolicy(
        BudgetSettings(thermal_limit_c=70.0, energy_budget_j_per_hour=1.0),
        root=tmp_path,
    )
    battery(tmp_path, 3)
    zone(tmp_path, 90_000)
    policy.record_energy(5.0)
    decision = policy.check()
    assert decision.codes == ("battery", "thermal", "energy")
    assert decision.resume_in_s is None
    assert decision.reason is not None
    assert decision.reason.count("; resumes") == 3


def test_pause_and_resume_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="dslo_edge.budget")
    policy = BudgetPolicy(BudgetSettings(), root=tmp_path, device_id="cam-1")
    battery(tmp_path, 10)
    policy.check()
    policy.check()
    battery(tmp_path, 90)
    policy.check()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("Device cam-1 pauses training: battery BAT0")
    assert messages[1] == "Device cam-1 resumes training"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"battery_min_percent": 120}, "battery_min_percent = 120"),
        (
            {"battery_min_percent": 30, "battery_resume_percent": 20},
            "battery_resume_percent = 20",
        ),
        ({"thermal_resume_margin_c": -1}, "thermal_resume_margin_c = -1"),
        ({"energy_budget_j_per_hour": 0}, "energy_budget_j_per_hour = 0"),
    ],
)
def test_settings_reject_invalid_values(
    settings: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        BudgetSettings(**settings)
