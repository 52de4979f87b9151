"""Decide when on-device training pauses to respect battery, heat and energy.

Training pauses while any of these holds, and resumes by itself once none
does:

- a system battery is discharging and below ``battery_min_percent``. It stays
  paused until the battery reaches ``battery_resume_percent`` or stops
  discharging.
- a thermal zone is above its limit. It stays paused until every zone is
  ``thermal_resume_margin_c`` below its limit.
- the energy spent on training in the last hour reached
  ``energy_budget_j_per_hour``. It resumes as soon as older spending leaves
  the one-hour window.

The policy only decides. The caller stops taking updates off its queue while
``check()`` reports a pause, so updates wait in the bounded queue.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dslo_edge.errors import ConfigError
from dslo_edge.power.battery import BatteryState, read_batteries
from dslo_edge.power.sources import Clock
from dslo_edge.power.thermal import ThermalZone, read_thermal_zones

logger = logging.getLogger(__name__)

ENERGY_WINDOW_S = 3600.0
# Checkpoints keep the last hour's training energy summed per minute.
ENERGY_BUCKET_S = 60.0


@dataclass(frozen=True)
class BudgetSettings:
    """Thresholds for pausing training.

    Attributes:
        battery_min_percent: pause below this charge while discharging.
        battery_resume_percent: resume at or above this charge.
        thermal_limit_c: pause above this temperature in any zone. None uses
            each zone's lowest passive or hot trip point, and zones without
            one are then ignored.
        thermal_resume_margin_c: resume once every zone is this far below its
            limit.
        energy_budget_j_per_hour: joules of training per sliding hour, or None
            for no energy budget.
    """

    battery_min_percent: float = 20.0
    battery_resume_percent: float = 25.0
    thermal_limit_c: float | None = None
    thermal_resume_margin_c: float = 5.0
    energy_budget_j_per_hour: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.battery_min_percent <= 100:
            raise ConfigError(
                f"battery_min_percent = {self.battery_min_percent} is invalid; "
                "expected a percentage in 0..100"
            )
        if not self.battery_min_percent <= self.battery_resume_percent <= 100:
            raise ConfigError(
                f"battery_resume_percent = {self.battery_resume_percent} is "
                f"invalid; expected {self.battery_min_percent}..100, at least "
                "battery_min_percent"
            )
        if self.thermal_resume_margin_c < 0:
            raise ConfigError(
                f"thermal_resume_margin_c = {self.thermal_resume_margin_c} is "
                "invalid; expected 0 or more degrees Celsius"
            )
        budget = self.energy_budget_j_per_hour
        if budget is not None and budget <= 0:
            raise ConfigError(
                f"energy_budget_j_per_hour = {budget} is invalid; expected a "
                "positive number of joules, or leave it unset for no budget"
            )


@dataclass(frozen=True)
class BudgetDecision:
    """Whether training may run now, and why not if it may not.

    Attributes:
        paused: True while any condition holds.
        reasons: one sentence per active condition, for the status report.
        codes: machine-readable conditions: ``battery``, ``thermal``,
            ``energy``.
        resume_in_s: for an energy pause alone, seconds until spending leaves
            the window enough to resume. None otherwise.
    """

    paused: bool
    reasons: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()
    resume_in_s: float | None = None

    @property
    def reason(self) -> str | None:
        """All reasons joined into one line, or None while training runs."""
        return "; ".join(self.reasons) if self.reasons else None

    def as_metrics(self) -> dict[str, Any]:
        """Return the decision as the ``training`` object of the metrics report."""
        return {
            "paused": self.paused,
            "reason": self.reason,
            "codes": list(self.codes),
            "resume_in_s": self.resume_in_s,
        }


class BudgetPolicy:
    """Battery, thermal and energy budget checks with hysteresis.

    Args:
        settings: the thresholds.
        root: filesystem root for the sysfs readers; tests pass a fake tree.
        clock: monotonic seconds, injected in tests.
        device_id: named in log lines.
        battery_reader: replaces the power_supply reader, for tests.
        thermal_reader: replaces the thermal zone reader, for tests.
    """

    def __init__(
        self,
        settings: BudgetSettings,
        *,
        root: str | Path = "/",
        clock: Clock = time.monotonic,
        device_id: str = "",
        battery_reader: Callable[[], list[BatteryState]] | None = None,
        thermal_reader: Callable[[], list[ThermalZone]] | None = None,
    ):
        self.settings = settings
        self.device_id = device_id
        self._clock = clock
        self._read_batteries = battery_reader or (lambda: read_batteries(root))
        self._read_zones = thermal_reader or (lambda: read_thermal_zones(root))
        self._spending: deque[tuple[float, float]] = deque()
        self._battery_paused = False
        self._thermal_paused = False
        self._last: BudgetDecision = BudgetDecision(paused=False)

    def record_energy(self, joules: float) -> None:
        """Count joules spent on training now against the hourly budget."""
        if joules > 0:
            self._spending.append((self._clock(), joules))

    def saved_spending(self) -> list[list[float]]:
        """Return the last hour's spending as [age in s, joules] per minute.

        A checkpoint keeps it, so that a restarted daemon counts the energy
        spent before the restart against the hourly budget. Each age is
        rounded down to the minute, so restored joules leave the window up
        to a minute late.
        """
        now = self._clock()
        self._forget_old_spending(now)
        minutes: dict[int, float] = {}
        for recorded_at, joules in self._spending:
            minute = int((now - recorded_at) // ENERGY_BUCKET_S)
            minutes[minute] = minutes.get(minute, 0.0) + joules
        return [
            [minute * ENERGY_BUCKET_S, joules]
            for minute, joules in sorted(minutes.items(), reverse=True)
        ]

    def restore_spending(self, saved: Any, seconds_since_save: float) -> None:
        """Count ``saved_spending`` output from before a restart as spent.

        Entries older than an hour by now are left out, and a value that is
        not such a list, as in checkpoints of earlier versions, adds nothing.
        """
        if not isinstance(saved, list):
            return
        now = self._clock()
        elapsed = max(0.0, seconds_since_save)
        restored = []
        for entry in saved:
            if not _is_spending_entry(entry):
                continue
            age = float(entry[0]) + elapsed
            if age < ENERGY_WINDOW_S:
                restored.append((now - age, float(entry[1])))
        restored.sort()
        self._spending.extendleft(reversed(restored))

    def spent_last_hour(self) -> float:
        """Return the joules recorded within the last hour."""
        self._forget_old_spending(self._clock())
        return sum(joules for _, joules in self._spending)

    def check(self) -> BudgetDecision:
        """Read the sensors, update the pause state and return the decision.

        State changes are logged at info level, with the reason.
        """
        reasons: list[str] = []
        codes: list[str] = []
        battery = self._check_battery()
        if battery:
            reasons.append(battery)
            codes.append("battery")
        thermal = self._check_thermal()
        if thermal:
            reasons.append(thermal)
            codes.append("thermal")
        energy, resume_in = self._check_energy()
        if energy:
            reasons.append(energy)
            codes.append("energy")
        only_energy = codes == ["energy"]
        decision = BudgetDecision(
            paused=bool(codes),
            reasons=tuple(reasons),
            codes=tuple(codes),
            resume_in_s=resume_in if only_energy else None,
        )
        self._log_change(decision)
        self._last = decision
        return decision

    def _check_battery(self) -> str | None:
        settings = self.settings
        for battery in self._read_batteries():
            percent = battery.capacity_percent
            if not battery.discharging or percent is None:
                continue
            threshold = (
                settings.battery_resume_percent
                if self._battery_paused
                else settings.battery_min_percent
            )
            if percent < threshold:
                self._battery_paused = True
                return self._battery_reason(battery.name, percent)
        self._battery_paused = False
        return None

    def _battery_reason(self, name: str, percent: float) -> str:
        settings = self.settings
        if percent < settings.battery_min_percent:
            cause = f"below {settings.battery_min_percent:g}%"
        else:
            # Between the two thresholds, the pause continues from an earlier drop.
            cause = f"paused since it fell below {settings.battery_min_percent:g}%"
        return (
            f"battery {name} at {_percent_text(percent)}% and discharging, "
            f"{cause}; resumes at {settings.battery_resume_percent:g}% or on "
            "external power"
        )

    def _check_thermal(self) -> str | None:
        margin = self.settings.thermal_resume_margin_c if self._thermal_paused else 0
        hottest: tuple[float, ThermalZone, float] | None = None
        for zone in self._read_zones():
            limit = self.settings.thermal_limit_c or zone.throttle_c
            if limit is None:
                continue
            excess = zone.celsius - (limit - margin)
            if excess > 0 and (hottest is None or excess > hottest[0]):
                hottest = (excess, zone, limit)
        if hottest is None:
            self._thermal_paused = False
            return None
        self._thermal_paused = True
        _, zone, limit = hottest
        resume_at = limit - self.settings.thermal_resume_margin_c
        return (
            f"thermal zone {zone.name} ({zone.kind}) at {zone.celsius:.1f} C, "
            f"limit {limit:.1f} C; resumes below {resume_at:.1f} C"
        )

    def _check_energy(self) -> tuple[str | None, float | None]:
        budget = self.settings.energy_budget_j_per_hour
        if budget is None:
            return None, None
        now = self._clock()
        spent = self.spent_last_hour()
        if spent < budget:
            return None, None
        resume_in = self._seconds_until_below(budget, now)
        message = (
            f"energy budget spent: {_joules(spent)} J of {budget:g} J in the last "
            f"hour; resumes in about {resume_in:.0f} s"
        )
        return message, resume_in

    def _seconds_until_below(self, budget: float, now: float) -> float:
        """Return when enough old spending leaves the window to drop below budget."""
        remaining = sum(joules for _, joules in self._spending)
        for recorded_at, joules in self._spending:
            remaining -= joules
            if remaining < budget:
                return max(0.0, recorded_at + ENERGY_WINDOW_S - now)
        return ENERGY_WINDOW_S

    def _forget_old_spending(self, now: float) -> None:
        while self._spending and self._spending[0][0] <= now - ENERGY_WINDOW_S:
            self._spending.popleft()

    def _log_change(self, decision: BudgetDecision) -> None:
        if decision.paused and decision.codes != self._last.codes:
            logger.info(
                "Device %s pauses training: %s", self.device_id, decision.reason
            )
        elif not decision.paused and self._last.paused:
            logger.info("Device %s resumes training", self.device_id)


def _percent_text(percent: float) -> str:
    """Format a charge in percent, rounded down to a tenth.

    A charge from energy_now/energy_full is fractional. Rounded down, 19.96%
    reads as 19.9%, not as 20%, beside a threshold of 20% that it is below.
    """
    if percent == int(percent):
        return f"{percent:.0f}"
    return f"{math.floor(percent * 10) / 10:.1f}"


def _joules(value: float) -> str:
    """Format joules with one decimal, or 3 significant digits below 10 J.

    One decimal alone would print a spent budget of 0.012 J as 0.0 J.
    """
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _is_spending_entry(entry: Any) -> bool:
    """Check for an [age in s, joules] pair of finite non-negative numbers."""
    if not isinstance(entry, list) or len(entry) != 2:
        return False
    return all(
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
        for value in entry
    )
