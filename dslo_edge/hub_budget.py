"""Report the privacy budget each device has spent, from a hub state file.

``dslo-edge hub --show-budget`` prints it. The state file is opened
read-only, so the report can run while workers use the file.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from dslo_edge.errors import ConfigError
from dslo_edge.hub_state_file import check_schema_version
from dslo_edge.privacy import PrivacySettings, epsilon_spent


@dataclass(frozen=True)
class DeviceBudget:
    """Released vectors of one device and the epsilon they spend.

    Attributes:
        device: the device id.
        releases: released vector count per noise multiplier.
        epsilon: epsilon spent, at the report's delta and accountant.
    """

    device: str
    releases: dict[float, int]
    epsilon: float

    @property
    def samples(self) -> int:
        """Number of released vectors at any noise multiplier."""
        return sum(self.releases.values())


def read_budgets(state_file: Path, privacy: PrivacySettings) -> list[DeviceBudget]:
    """Read each device's releases from a state file and compose its epsilon.

    Raises:
        ConfigError: the file is missing, cannot be read, or is not a hub
            state database.
    """
    if not state_file.is_file():
        raise ConfigError(
            f"hub.state_file {state_file} not found: no worker with this "
            "configuration has run yet, or hub.state_file names another file"
        )
    try:
        rows = _read_releases(state_file)
    except sqlite3.Error as error:
        raise ConfigError(
            f"cannot read the privacy budgets in hub.state_file {state_file}: "
            f"{error}; check that it is a hub state database that this user "
            "can read"
        ) from error
    releases: dict[str, dict[float, int]] = {}
    for device, multiplier, count in rows:
        releases.setdefault(str(device), {})[float(multiplier)] = int(count)
    return [
        DeviceBudget(
            device,
            counts,
            epsilon_spent(counts, privacy.delta, privacy.accountant),
        )
        for device, counts in sorted(releases.items())
    ]


def _read_releases(state_file: Path) -> list[tuple[str, float, int]]:
    database = sqlite3.connect(f"{state_file.resolve().as_uri()}?mode=ro", uri=True)
    try:
        # A newer schema may count releases in another way.
        check_schema_version(database, state_file)
        return database.execute(
            "SELECT device, multiplier, count FROM releases"
        ).fetchall()
    finally:
        database.close()


def format_budgets(
    budgets: list[DeviceBudget], privacy: PrivacySettings, state_file: Path
) -> str:
    """Return the report as a header line and one row per device."""
    header = (
        f"Privacy budget per device in {state_file} (accountant "
        f"{privacy.accountant}, delta {privacy.delta:g}, budget "
        f"{privacy.epsilon_budget:g})"
    )
    if not budgets:
        return f"{header}\nno device has been charged\n"
    width = max(len("DEVICE"), *(len(budget.device) for budget in budgets))
    lines = [
        header,
        f"{'DEVICE':<{width}}  {'SAMPLES':>8}  {'EPSILON':>9}  {'LEFT':>9}",
    ]
    for budget in budgets:
        left = privacy.epsilon_budget - budget.epsilon
        lines.append(
            f"{budget.device:<{width}}  {budget.samples:>8}  "
            f"{budget.epsilon:>9.4g}  {left:>9.4g}"
        )
    return "\n".join(lines) + "\n"
