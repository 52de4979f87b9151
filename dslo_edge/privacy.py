"""Differential privacy for the soft labels a hub releases to devices.

Soft labels are the outputs of the hub's teacher on query samples, so they
can leak the hub's training data. The hub can release each probability vector
through the Gaussian mechanism: add ``N(0, sigma^2 I)`` noise with
``sigma = noise_multiplier * sqrt(2)``, because two probability vectors
differ by at most sqrt(2) in L2 norm (all mass on one class against all
mass on another), then project the result back onto the probability simplex.
The projection is post-processing and costs no privacy.

Every released vector is one Gaussian mechanism on the same training data,
so the hub composes them per device with the RDP accountant of the
``dp-accounting`` library, or with its exact Gaussian epsilon for ``pld``,
and rejects a release once the device's ``(epsilon, delta)`` budget would be
exceeded. The ledger is a JSON file, so
the spent budget survives hub restarts.

Noise is added at the hub only. ``dp-accounting`` is an optional dependency:
``pip install 'dslo-edge[hub]'``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.errors import ConfigError, DsloError
from dslo_edge.json_input import parse_json

logger = logging.getLogger(__name__)

# Largest L2 distance between two probability vectors, reached by two
# different one-hot vectors.
L2_SENSITIVITY = math.sqrt(2.0)
ACCOUNTANTS = ("rdp", "pld")
LEDGER_FORMAT = 1
# Absolute tolerance of the root search for the analytic Gaussian epsilon.
_ROOT_TOLERANCE = 1e-12


class PrivacyBudgetExceeded(DsloError):
    """Releasing more soft labels to a device would exceed its privacy budget."""


@dataclass(frozen=True)
class PrivacySettings:
    """Noise level and budget of the hub's soft-label releases.

    Attributes:
        noise_multiplier: noise standard deviation divided by the L2
            sensitivity sqrt(2), > 0.
        epsilon_budget: maximum epsilon spent per device, > 0.
        delta: the delta of the ``(epsilon, delta)`` guarantee, in (0, 1).
        accountant: ``rdp`` (Renyi DP, the common conservative choice) or
            ``pld`` (the exact epsilon of the composed Gaussian releases,
            which is tighter than ``rdp`` and which dp-accounting's privacy
            loss distribution accountant bounds from above).
    """

    noise_multiplier: float
    epsilon_budget: float
    delta: float = 1e-5
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        checks = [
            ("noise_multiplier", self.noise_multiplier > 0, "a number > 0"),
            ("epsilon_budget", self.epsilon_budget > 0, "a number > 0"),
            ("delta", 0 < self.delta < 1, "a number in (0, 1)"),
        ]
        for name, valid, expected in checks:
            value = getattr(self, name)
            if not (valid and math.isfinite(value)):
                raise ConfigError(
                    f"invalid privacy {name} {value!r}: expected {expected}"
                )
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"invalid privacy accountant {self.accountant!r}: expected 'rdp' "
                "or 'pld'"
            )

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each probability."""
        return self.noise_multiplier * L2_SENSITIVITY


def project_to_simplex(values: np.ndarray) -> np.ndarray:
    """Return the Euclidean projection of each row onto the probability simplex.

    Uses the sort-based algorithm of Duchi et al., "Efficient projections
    onto the l1-ball for learning in high dimensions" (ICML 2008): with the
    row sorted in decreasing order ``u``, find the largest ``j`` with
    ``u_j - (sum_{i<=j} u_i - 1) / j > 0`` and subtract that threshold.

    Args:
        values: float array of shape (N, K).

    Returns:
        float64 array of shape (N, K), rows non-negative and summing to 1.
    """
    rows = np.asarray(values, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"expected an array of shape (N, K), got {rows.shape}")
    ordered = -np.sort(-rows, axis=1)
    cumulative = np.cumsum(ordered, axis=1) - 1.0
    ranks = np.arange(1, rows.shape[1] + 1)
    positive = ordered - cumulative / ranks > 0
    # positive is true on a prefix of each row, and always for j = 1.
    count = positive.sum(axis=1)
    threshold = cumulative[np.arange(rows.shape[0]), count - 1] / count
    return np.maximum(rows - threshold[:, None], 0.0)


def add_gaussian_noise(
    probabilities: np.ndarray, settings: PrivacySettings, rng: np.random.Generator
) -> np.ndarray:
    """Return the probabilities plus Gaussian noise, before projection."""
    rows = np.asarray(probabilities, dtype=np.float64)
    return rows + rng.normal(0.0, settings.noise_std, size=rows.shape)


def privatise(
    probabilities: np.ndarray, settings: PrivacySettings, rng: np.random.Generator
) -> np.ndarray:
    """Return noisy probabilities projected back onto the simplex, as float32."""
    noisy = add_gaussian_noise(probabilities, settings, rng)
    return project_to_simplex(noisy).astype(np.float32)


def format_epsilon_over(epsilon: float, budget: float) -> str:
    """Format an epsilon above ``budget`` so that it reads as larger than it.

    Three significant digits by default. More where three would round it to
    the budget as ``{budget:g}`` shows it, such as 12.03 against 12.
    """
    shown_budget = float(f"{budget:g}")
    for digits in range(3, 18):
        text = f"{epsilon:.{digits}g}"
        if float(text) > shown_budget:
            return text
    return repr(epsilon)


def epsilon_spent(
    releases: dict[float, int], delta: float, accountant: str = "rdp"
) -> float:
    """Return the epsilon of a set of Gaussian releases, from dp-accounting.

    Args:
        releases: count of released vectors per noise multiplier.
        delta: target delta.
        accountant: ``rdp`` or ``pld``.
    """
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    counts = {
        multiplier: count for multiplier, count in sorted(releases.items()) if count > 0
    }
    if not counts:
        return 0.0
    if accountant == "pld":
        return _composed_gaussian_epsilon(counts, delta)
    events = [
        dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(multiplier), count)
        for multiplier, count in counts.items()
    ]
    engine: Any = rdp_privacy_accountant.RdpAccountant()
    engine.compose(dp_event.ComposedDpEvent(events))
    return float(engine.get_epsilon(delta))


def _composed_gaussian_epsilon(releases: dict[float, int], delta: float) -> float:
    """Return the exact epsilon of composed Gaussian releases, in constant time.

    The privacy loss of one release at noise multiplier m is normal with mean
    1 / (2 m^2) and variance 1 / m^2. Composition adds means and variances,
    so n_i releases at m_i are exactly one Gaussian release at the multiplier
    (sum n_i / m_i^2)^(-1/2). dp-accounting's PLDAccountant also reduces a
    self-composed Gaussian to that one release, but then discretises its
    privacy loss, which takes seconds once thousands of releases make the
    loss wide. ``get_epsilon_gaussian`` solves the analytic formula instead.
    Its epsilon is the tight value, which the PLD accountant's pessimistic
    estimate exceeds by at most 3e-7 in tests/test_privacy.py.
    """
    from dp_accounting.gaussian_mechanism import get_epsilon_gaussian

    precision = sum(count / multiplier**2 for multiplier, count in releases.items())
    epsilon = float(get_epsilon_gaussian(precision**-0.5, delta, tol=_ROOT_TOLERANCE))
    # The root search stops within its tolerance on either side of the
    # exact epsilon, so rounding up keeps the result from under-counting.
    return epsilon + 2 * _ROOT_TOLERANCE + 1e-15 * epsilon


class PrivacyLedger:
    """Released vectors per device and noise multiplier, kept in a JSON file.

    ``release`` charges the ledger before it adds noise, and raises
    ``PrivacyBudgetExceeded`` without charging when the release would take
    the device past its budget.

    NOTE: budgets are per device, as configured. Every device's labels come
    from the same training data, so devices that pool what they received
    hold the composition of all their releases, which is more than any one
    device's epsilon. Hard labels are not noised or counted, which is why
    ``push`` rejects ``--hard-labels`` with the ``--dp-*`` options and the
    hub service rejects ``hard_labels`` in a ``[[push]]`` table together
    with ``[privacy]``.
    """

    def __init__(self, settings: PrivacySettings, path: str | Path | None = None):
        """Load the ledger file when it exists.

        Raises:
            ConfigError: dp-accounting is not installed, or the file is not a
                ledger.
        """
        try:
            import dp_accounting  # noqa: F401
        except ImportError as error:
            raise ConfigError(
                f"private release needs dp-accounting ({error}); install it "
                "with: pip install 'dslo-edge[hub]'"
            ) from error
        self.settings = settings
        self.path = Path(path) if path is not None else None
        self._releases: dict[str, dict[float, int]] = {}
        if self.path is not None and self.path.exists():
            self._releases = _read_ledger(self.path)

    def releases(self, device_id: str) -> dict[float, int]:
        """Return the released vector count per noise multiplier for a device."""
        return dict(self._releases.get(device_id, {}))

    def epsilon(self, device_id: str, extra: int = 0) -> float:
        """Return the device's epsilon, after ``extra`` more releases if given."""
        releases = self.releases(device_id)
        multiplier = self.settings.noise_multiplier
        releases[multiplier] = releases.get(multiplier, 0) + extra
        return epsilon_spent(releases, self.settings.delta, self.settings.accountant)

    def charge(self, device_id: str, count: int) -> float:
        """Record ``count`` released vectors for a device and return its epsilon.

        Raises:
            PrivacyBudgetExceeded: the epsilon after the release would exceed
                the budget. Nothing is recorded then.
            ConfigError: the ledger file cannot be written. Nothing is
                recorded then, so the caller must not release the labels.
        """
        after = self.epsilon(device_id, count)
        if after > self.settings.epsilon_budget:
            before = self.epsilon(device_id)
            raise PrivacyBudgetExceeded(
                f"releasing {count} more soft labels to device {device_id!r} would "
                f"spend epsilon {after:.3g} (delta {self.settings.delta:g}), above "
                f"its budget {self.settings.epsilon_budget:g}; {before:.3g} is spent "
                "already. Raise the noise multiplier or the budget, or stop "
                "sending to this device"
            )
        previous = self._releases.get(device_id)
        device = dict(previous or {})
        multiplier = self.settings.noise_multiplier
        device[multiplier] = device.get(multiplier, 0) + count
        self._releases[device_id] = device
        if self.path is not None:
            try:
                _write_ledger(self.path, self._releases)
            except OSError as error:
                if previous is None:
                    del self._releases[device_id]
                else:
                    self._releases[device_id] = previous
                raise ConfigError(
                    f"cannot write privacy ledger {self.path}: {error}; these "
                    "labels were not released, so give a ledger path in a "
                    "writable directory with free space and send them again"
                ) from error
        return after

    def refund(self, device_id: str, count: int) -> None:
        """Take back ``count`` vectors charged by ``charge`` that no one received.

        Raises:
            ConfigError: the ledger file cannot be written. The charge then
                stays, which overstates the spent budget but never hides a
                release.
        """
        previous = self._releases.get(device_id, {})
        multiplier = self.settings.noise_multiplier
        device = dict(previous)
        device[multiplier] = max(0, device.get(multiplier, 0) - count)
        self._releases[device_id] = device
        if self.path is None:
            return
        try:
            _write_ledger(self.path, self._releases)
        except OSError as error:
            self._releases[device_id] = previous
            raise ConfigError(
                f"cannot write privacy ledger {self.path}: {error}; it still "
                f"counts {count} soft labels for device {device_id!r} that the "
                "device never received"
            ) from error

    def release(
        self,
        device_id: str,
        probabilities: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Charge the ledger for the rows and return them privatised.

        Raises:
            PrivacyBudgetExceeded: the device's budget would be exceeded.
        """
        spent = self.charge(device_id, int(np.asarray(probabilities).shape[0]))
        logger.debug("Device %s privacy spent: epsilon %.4g", device_id, spent)
        return privatise(probabilities, self.settings, rng)


def _read_ledger(path: Path) -> dict[str, dict[float, int]]:
    try:
        # JSON text is UTF-8 (RFC 8259), whatever the locale.
        data = parse_json(path.read_text(encoding="utf-8"))
    except ValueError as error:
        # The ledger is replaced atomically, so a damaged one was changed by
        # something else. Deleting it would forget the privacy already spent.
        raise ConfigError(
            f"cannot read privacy ledger {path}: it is not valid JSON ({error}); "
            "restore it from a backup, and move it away only if no labels were "
            "released with it"
        ) from error
    except OSError as error:
        raise ConfigError(f"cannot read privacy ledger {path}: {error}") from error
    if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
        raise ConfigError(
            f"privacy ledger {path} is not a format {LEDGER_FORMAT} ledger; "
            "move it away only if no labels were released with it"
        )
    devices = data.get("devices", {})
    if not isinstance(devices, dict):
        raise _invalid_ledger(path, f"devices = {devices!r}", "an object of devices")
    return {
        device: _read_device_releases(path, device, counts)
        for device, counts in devices.items()
    }


def _read_device_releases(path: Path, device: str, counts: Any) -> dict[float, int]:
    """Read and check one device's release counts per noise multiplier."""
    key = f"devices.{device}"
    if not isinstance(counts, dict):
        raise _invalid_ledger(
            path, f"{key} = {counts!r}", "an object of release counts"
        )
    releases: dict[float, int] = {}
    for text, count in counts.items():
        try:
            multiplier = float(text)
        except ValueError:
            multiplier = math.nan
        if not (math.isfinite(multiplier) and multiplier > 0):
            raise _invalid_ledger(
                path, f"key {text!r} of {key}", "a noise multiplier > 0"
            )
        # bool is an int subclass, and a fraction or a negative count would
        # make the device's spent epsilon smaller than what it received.
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise _invalid_ledger(
                path, f"{key}.{text} = {count!r}", "a whole number of releases >= 0"
            )
        releases[multiplier] = count
    return releases


def _invalid_ledger(path: Path, entry: str, expected: str) -> ConfigError:
    return ConfigError(
        f"privacy ledger {path}: {entry} is invalid; expected {expected}. "
        "The file was changed by hand or damaged, so restore it from a backup, "
        "because a new ledger would let devices spend their budget again"
    )


def _write_ledger(path: Path, releases: dict[str, dict[float, int]]) -> None:
    """Replace the ledger file atomically, so a crash leaves the old or new one."""
    document = {
        "format": LEDGER_FORMAT,
        "devices": {
            device: {repr(multiplier): count for multiplier, count in counts.items()}
            for device, counts in releases.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".ledger-")
    try:
        with os.fdopen(descriptor, "w") as stream:
            json.dump(document, stream, indent=2)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass
class PrivateRelease:
    """Settings and state for releasing one device's labels privately.

    Attributes:
        ledger: the ledger charged for every released vector.
        device_id: the device the labels are for.
        rng: source of the Gaussian noise.
        temperature: converts teacher logits into probabilities first.
    """

    ledger: PrivacyLedger
    device_id: str
    rng: np.random.Generator
    temperature: float = 1.0

    def labels(self, teacher_output: np.ndarray, output_kind: str) -> np.ndarray:
        """Return privatised probabilities for one batch of teacher outputs.

        Raises:
            PrivacyBudgetExceeded: the device's budget would be exceeded.
        """
        rows = np.asarray(teacher_output, dtype=np.float64)
        if output_kind == "logits":
            scaled = rows / self.temperature
            scaled -= scaled.max(axis=1, keepdims=True)
            rows = np.exp(scaled)
            rows /= rows.sum(axis=1, keepdims=True)
        return self.ledger.release(self.device_id, rows, self.rng)
