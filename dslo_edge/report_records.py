"""Compact copies of metrics reports that keep what the report's plots read.

A report that the daemon publishes is about 2.9 kB of JSON, and parsed into
dicts it takes about 6 times that (measured with tracemalloc on CPython
3.11), mostly in latency histograms and monitor figures. The plots draw a
few figures of every report over time, but read the latency histograms and
the energy object of one report only: the newest one that has them. So
``ReportCollector`` keeps, for each report, its top-level numbers, strings
and nulls and the nested figures drawn over time, and keeps the whole report
only where a plot can read more of it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

# Teacher-monitor figures that the training plot reads, from ``teacher`` or,
# for a multi-head student, from ``teacher.<head>``.
MONITOR_KEYS = frozenset({"mean_entropy", "latest_round"})


@dataclass
class _NewestFigures:
    """Positions and objects of one device's newest reports in one log."""

    last: tuple[int, dict[str, Any]] | None = None
    latency: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    energy: tuple[int, dict[str, Any]] | None = None


class ReportCollector:
    """Collect metrics reports of one log as compact copies.

    ``reports()`` returns them in the order added. Each is a dict with the
    report's top-level values that are not objects or arrays, and with these
    nested figures:

    - ``teacher``: ``mean_entropy`` and ``latest_round``, also per head.
    - ``dynamic``: ``heads.<head>.alpha.mean``.
    - ``probe_accuracy_heads``: each head's value if it is not an object or
      an array, else null.
    - ``energy``: ``joules_per_update``.

    For each device, its last report stays whole. Its newest report with a
    usable histogram in a latency field keeps that field's summary, and its
    newest report with a number in ``energy.joules_per_update`` keeps the
    whole ``energy`` object. So ``latest_histogram`` and ``latest_energy``
    return the same objects as on whole reports, also on the reports of one
    device and on several logs read in turn. The other fields of a report
    are dropped.
    """

    def __init__(self, latency_fields: Sequence[str]):
        self._latency_fields = tuple(latency_fields)
        self._reports: list[dict[str, Any]] = []
        self._newest: dict[str, _NewestFigures] = {}
        # json.loads makes new key strings for each report, and one shared copy
        # saves a str object (50 to 80 bytes) per key and report.
        self._strings: dict[str, str] = {}

    def add(self, report: dict[str, Any]) -> None:
        """Add a report whose ``device`` is a string."""
        index = len(self._reports)
        self._reports.append(self._compact(report))
        device = self._shared(report["device"])
        newest = self._newest.setdefault(device, _NewestFigures())
        newest.last = (index, report)
        for name in self._latency_fields:
            summary = as_mapping(report.get(name))
            if histogram_of(summary) is not None:
                newest.latency[name] = (index, summary)
        energy = report.get("energy")
        if isinstance(energy, dict) and is_number(energy.get("joules_per_update")):
            newest.energy = (index, energy)

    def reports(self) -> list[dict[str, Any]]:
        """Return the reports added, with the whole objects that plots read."""
        for newest in self._newest.values():
            if newest.last is not None:
                index, report = newest.last
                self._reports[index] = report
            for name, (index, summary) in newest.latency.items():
                self._reports[index][name] = summary
            if newest.energy is not None:
                index, energy = newest.energy
                self._reports[index]["energy"] = energy
        return self._reports

    def _shared(self, text: str) -> str:
        return self._strings.setdefault(text, text)

    def _compact(self, report: dict[str, Any]) -> dict[str, Any]:
        compact: dict[str, Any] = {}
        for key, value in report.items():
            if _is_scalar(value):
                figure = self._shared(value) if key == "device" else value
            elif key == "teacher" and isinstance(value, dict):
                figure = self._monitor_figures(value)
            elif key == "dynamic" and isinstance(as_mapping(value).get("heads"), dict):
                figure = {"heads": self._head_alphas(value["heads"])}
            elif key == "probe_accuracy_heads" and isinstance(value, dict):
                figure = {
                    self._shared(head): accuracy if _is_scalar(accuracy) else None
                    for head, accuracy in value.items()
                }
            elif key == "energy" and isinstance(value, dict):
                figure = _pick(value, ("joules_per_update",))
            else:
                continue
            compact[self._shared(key)] = figure
        return compact

    def _monitor_figures(self, teacher: dict[str, Any]) -> dict[str, Any]:
        """Keep the plotted monitor figures, and those of each head object."""
        figures: dict[str, Any] = {}
        for key, value in teacher.items():
            if isinstance(value, dict):
                figures[self._shared(key)] = _pick(value, MONITOR_KEYS)
            elif key in MONITOR_KEYS and _is_scalar(value):
                figures[self._shared(key)] = value
        return figures

    def _head_alphas(self, heads: dict[str, Any]) -> dict[str, Any]:
        """Keep each head's ``alpha.mean``, with an empty object for a head without."""
        alphas: dict[str, Any] = {}
        for head, figures in heads.items():
            if not isinstance(figures, dict):
                continue
            alpha = figures.get("alpha")
            if isinstance(alpha, dict) and "mean" in alpha:
                alphas[self._shared(head)] = {"alpha": _pick(alpha, ("mean",))}
            else:
                alphas[self._shared(head)] = {}
        return alphas


def _pick(mapping: dict[str, Any], keys: Collection[str]) -> dict[str, Any]:
    """Return the items of ``mapping`` under ``keys`` whose values are scalars."""
    return {
        key: value
        for key, value in mapping.items()
        if key in keys and _is_scalar(value)
    }


def _is_scalar(value: Any) -> bool:
    """Check whether a JSON value is a number, a string, a boolean or null."""
    return not isinstance(value, dict | list)


def as_mapping(value: Any) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def histogram_of(summary: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """Return a latency histogram's (edges, counts), or None if it is unusable.

    A usable histogram has numeric edges and one numeric count per bucket,
    with at least one sample.
    """
    histogram = as_mapping(summary.get("histogram"))
    edges = histogram.get("edges_ms")
    counts = histogram.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list):
        return None
    if len(edges) != len(counts) + 1 or not counts:
        return None
    if not all(is_number(value) for value in edges + counts):
        return None
    if not sum(counts):
        return None
    return edges, counts
