"""Energy per update, average power while adapting, and battery impact.

An ``EnergyMeter`` brackets train steps (or spans of several updates) with two
reads of the best energy source available at the start of the span. Figures
over a recent window describe the current rate; totals count everything
measured with the current source.

Example::

    meter = EnergyMeter(discover_sources(power_model=model))
    with meter.measure(updates=1):
        trainer.apply(update)
    report = meter.report()
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from dslo_edge.power.battery import BatteryState
from dslo_edge.power.sources import Clock, EnergySource

logger = logging.getLogger(__name__)

SECONDS_PER_HOUR = 3600.0
JOULES_PER_WATT_HOUR = 3600.0


@dataclass(frozen=True)
class SpanEnergy:
    """Energy measured over one bracketed span of updates."""

    source: str
    estimated: bool
    joules: float
    seconds: float
    updates: int
    ended_at: float


@dataclass(frozen=True)
class BatteryCapacity:
    """A full-charge energy in Wh and where the figure comes from."""

    watt_hours: float
    source: str


class EnergyMeter:
    """Measures the energy of train steps with the best source available.

    Args:
        sources: energy sources, best first (see ``discover_sources``).
        battery_reader: returns the system batteries; the first one with a
            full-charge energy sets the capacity for the battery impact.
        fallback_capacity: capacity to use when no battery reports one, for
            example a power bank named in the firmware profile or config.
        clock: monotonic seconds, injected in tests.
        window_s: how far back the "current rate" figures look.
    """

    def __init__(
        self,
        sources: Sequence[EnergySource],
        *,
        battery_reader: Callable[[], list[BatteryState]] | None = None,
        fallback_capacity: BatteryCapacity | None = None,
        clock: Clock = time.monotonic,
        window_s: float = 600.0,
    ):
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.sources = list(sources)
        self.battery_reader = battery_reader
        self.fallback_capacity = fallback_capacity
        self.window_s = window_s
        self._clock = clock
        self._open: tuple[EnergySource, float, float] | None = None
        self._source: EnergySource | None = None
        self._window: deque[SpanEnergy] = deque()
        self._total_joules = 0.0
        self._total_updates = 0

    def begin(self) -> None:
        """Start a span with the first source that can be read now."""
        self._open = None
        for source in self.sources:
            joules = source.read_joules()
            if joules is not None:
                self._open = (source, joules, self._clock())
                return

    def end(self, updates: int = 1) -> SpanEnergy | None:
        """Close the span opened by ``begin`` and record it.

        Returns:
            The span, or None when no source was readable at the start or the
            source stopped being readable during the span (for example the
            board was plugged in while a battery source was in use).
        """
        if self._open is None:
            return None
        source, start_joules, started = self._open
        self._open = None
        joules = source.read_joules()
        if joules is None:
            return None
        now = self._clock()
        span = SpanEnergy(
            source.label,
            source.estimated,
            max(0.0, joules - start_joules),
            now - started,
            updates,
            now,
        )
        self._record(source, span)
        return span

    @contextmanager
    def measure(self, updates: int = 1) -> Iterator[None]:
        """Bracket a block that applies ``updates`` updates."""
        self.begin()
        try:
            yield
        finally:
            self.end(updates)

    def _record(self, source: EnergySource, span: SpanEnergy) -> None:
        if source is not self._source:
            if self._source is not None:
                logger.info(
                    "Energy source changed from %s to %s; energy totals restart",
                    self._source.label,
                    source.label,
                )
            self._source = source
            self._window.clear()
            self._total_joules = 0.0
            self._total_updates = 0
        self._window.append(span)
        self._total_joules += span.joules
        self._total_updates += span.updates
        self._prune(span.ended_at)

    def _prune(self, now: float) -> None:
        while self._window and self._window[0].ended_at < now - self.window_s:
            self._window.popleft()

    def report(self) -> dict[str, Any]:
        """Return the energy figures as a JSON-ready dict for the metrics report.

        ``source`` and ``estimated`` describe the source in use. ``updates`` and
        ``joules`` count everything measured since that source was first used.
        ``joules_per_update``, ``average_power_w`` (while adapting) and
        ``updates_per_hour`` cover the recent window. ``battery`` is described
        in ``battery_impact``. Figures are None until measured.
        """
        self._prune(self._clock())
        spans = list(self._window)
        joules = sum(span.joules for span in spans)
        updates = sum(span.updates for span in spans)
        busy = sum(span.seconds for span in spans)
        per_update = joules / updates if updates else None
        rate = _updates_per_hour(spans)
        return {
            "source": self._source.label if self._source else None,
            "estimated": self._source.estimated if self._source else None,
            "updates": self._total_updates,
            "joules": round(self._total_joules, 6),
            "joules_per_update": _rounded(per_update),
            "average_power_w": _rounded(joules / busy if busy > 0 else None),
            "updates_per_hour": _rounded(rate),
            "battery": self.battery_impact(per_update, rate),
        }

    def battery_impact(
        self, joules_per_update: float | None, updates_per_hour: float | None
    ) -> dict[str, Any] | None:
        """Return the projected battery use, or None when no capacity is known.

        ``percent_per_1000_updates`` is the share of a full charge that 1,000
        updates take at the measured energy per update. ``percent_per_hour``
        is the share per hour at the recent update rate. Both count only the
        energy drawn during train steps, not the board's idle draw between
        them.
        """
        battery = self._first_battery()
        capacity = self._capacity(battery)
        if capacity is None:
            return None
        full_joules = capacity.watt_hours * JOULES_PER_WATT_HOUR
        per_thousand = per_hour = None
        if joules_per_update is not None:
            per_thousand = 100.0 * 1000 * joules_per_update / full_joules
            if updates_per_hour is not None:
                per_hour = 100.0 * joules_per_update * updates_per_hour / full_joules
        return {
            "capacity_wh": round(capacity.watt_hours, 3),
            "capacity_source": capacity.source,
            "percent": battery.capacity_percent if battery else None,
            "status": battery.status if battery else None,
            "percent_per_1000_updates": _rounded(per_thousand),
            "percent_per_hour": _rounded(per_hour),
        }

    def _first_battery(self) -> BatteryState | None:
        if self.battery_reader is None:
            return None
        batteries = self.battery_reader()
        return batteries[0] if batteries else None

    def _capacity(self, battery: BatteryState | None) -> BatteryCapacity | None:
        if battery is not None and battery.full_wh:
            return BatteryCapacity(
                battery.full_wh, battery.label(battery.full_wh_source)
            )
        return self.fallback_capacity


def _updates_per_hour(spans: list[SpanEnergy]) -> float | None:
    """Return the update rate from the first span's start to the last span's end."""
    if len(spans) < 2:
        return None
    first_start = spans[0].ended_at - spans[0].seconds
    elapsed = spans[-1].ended_at - first_start
    if elapsed <= 0:
        return None
    return sum(span.updates for span in spans) * SECONDS_PER_HOUR / elapsed


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def describe_energy(report: dict[str, Any]) -> list[str]:
    """Return report lines for an ``EnergyMeter.report()``, each naming its source.

    Example output::

        energy per update: 0.912 mJ (profile raspberry-pi-4b power model
        (CPU time), an estimate)
    """
    source = report.get("source")
    if source is None or report.get("joules_per_update") is None:
        return ["energy per update: not measured (no energy source was readable)"]
    label = f"{source}, an estimate" if report.get("estimated") else source
    lines = [
        f"energy per update: {_format_joules(report['joules_per_update'])} ({label})",
    ]
    if report.get("average_power_w") is not None:
        lines.append(
            f"average power while adapting: {report['average_power_w']:.3g} W ({label})"
        )
    battery = report.get("battery")
    if not battery:
        lines.append("battery impact: no battery capacity known")
        return lines
    capacity = f"{battery['capacity_wh']:g} Wh from {battery['capacity_source']}"
    per_thousand = battery.get("percent_per_1000_updates")
    per_hour = battery.get("percent_per_hour")
    parts = []
    if per_thousand is not None:
        parts.append(f"{per_thousand:.3g}% per 1,000 updates")
    rate = report.get("updates_per_hour")
    if per_hour is not None and rate is not None:
        parts.append(
            f"{per_hour:.3g}% per hour if updates kept coming at the recent rate "
            f"({rate:,.0f} per hour)"
        )
    impact = ", ".join(parts) or "not measured yet"
    lines.append(f"battery impact: {impact} (capacity {capacity}; energy {label})")
    return lines


def _format_joules(joules: float) -> str:
    """Format energy in mJ below 1 J and in J above, to 4 significant digits.

    ``.4g`` alone would print 10 J as ``1e+04 mJ``.
    """
    if joules < 1:
        return f"{joules * 1000:.4g} mJ"
    return f"{joules:.4g} J"
