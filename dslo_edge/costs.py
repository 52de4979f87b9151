"""Adaptation costs on this device: energy, battery, budget and latency.

One object per daemon bundles the energy meter (best source first, see
``dslo_edge.power``), the training budget policy and the inference latency
window, so the daemon only brackets train steps and checks whether to pause.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from dslo_edge.budget import BudgetDecision, BudgetPolicy, BudgetSettings
from dslo_edge.metrics import LatencyWindow
from dslo_edge.power import (
    BatteryCapacity,
    EnergyMeter,
    discover_sources,
    read_batteries,
)
from dslo_edge.profiles import FirmwareProfile

# The budget reads sysfs, so it is checked at most this often.
BUDGET_CHECK_INTERVAL_S = 1.0


class AdaptationCosts:
    """Energy meter, training budget and inference latency of one device.

    Args:
        device_id: named in log lines.
        profile: the board's firmware profile, for its power model, sensor
            files, battery and thermal limit; None measures with what sysfs
            offers and has no power model.
        budget: pause thresholds; a missing thermal limit comes from the
            profile.
        battery_wh: capacity of a battery the system does not report (a power
            bank); overrides the profile's.
        root: filesystem root of the sysfs readers; tests pass a fake tree.
    """

    def __init__(
        self,
        device_id: str,
        profile: FirmwareProfile | None,
        budget: BudgetSettings,
        *,
        battery_wh: float | None = None,
        root: str | Path = "/",
    ):
        power_model = profile.power_model() if profile else None
        power_files = profile.power_files if profile else ()
        capacity = self._capacity(profile, battery_wh)
        self.meter = EnergyMeter(
            discover_sources(root, power_model=power_model, power_files=power_files),
            battery_reader=lambda: read_batteries(root),
            fallback_capacity=capacity,
        )
        if budget.thermal_limit_c is None and profile is not None:
            budget = dataclasses.replace(
                budget, thermal_limit_c=profile.thermal_limit_c
            )
        self.policy = BudgetPolicy(budget, root=root, device_id=device_id)
        self.infer_ms = LatencyWindow()
        self._decision = BudgetDecision(paused=False)
        self._checked_at = float("-inf")

    @staticmethod
    def _capacity(
        profile: FirmwareProfile | None, battery_wh: float | None
    ) -> BatteryCapacity | None:
        if battery_wh:
            return BatteryCapacity(battery_wh, "device config battery_wh")
        if profile is not None and profile.battery_wh:
            return BatteryCapacity(profile.battery_wh, f"profile {profile.name}")
        return None

    def begin_step(self) -> None:
        self.meter.begin()

    def end_step(self, updates: int = 1) -> None:
        span = self.meter.end(updates)
        if span is not None:
            self.policy.record_energy(span.joules)
            if self.policy.settings.energy_budget_j_per_hour is not None:
                # The energy budget can run out on this very step.
                self._checked_at = float("-inf")

    def decision(self) -> BudgetDecision:
        """Return whether training should pause now, re-checked once a second."""
        now = time.monotonic()
        if now - self._checked_at >= BUDGET_CHECK_INTERVAL_S:
            self._decision = self.policy.check()
            self._checked_at = now
        return self._decision

    def report(self) -> dict[str, Any]:
        """Return the ``energy``, ``training`` and ``infer_ms`` report objects."""
        return {
            "energy": self.meter.report(),
            "training": self._decision.as_metrics(),
            "infer_ms": self.infer_ms.summary(),
        }
