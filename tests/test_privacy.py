"""Gaussian noise on released soft labels, simplex projection and accounting."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dslo_edge.errors import ConfigError
from dslo_edge.privacy import (
    L2_SENSITIVITY,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    PrivacySettings,
    PrivateRelease,
    add_gaussian_noise,
    epsilon_spent,
    privatise,
    project_to_simplex,
)

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting import dp_event  # noqa: E402
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402


def library_epsilon(multiplier: float, count: int, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(multiplier), count)
    return accountant.get_epsilon(delta)


# Noise and projection


def test_sensitivity_is_distance_of_two_one_hots() -> None:
    first, second = np.eye(5)[[0, 3]]
    assert np.linalg.norm(first - second) == pytest.approx(L2_SENSITIVITY)


def test_noise_std_is_multiplier_times_sqrt2() -> None:
    privacy = PrivacySettings(noise_multiplier=0.5, epsilon_budget=1.0)
    zeros = np.zeros((20_000, 10))
    noise = add_gaussian_noise(zeros, privacy, np.random.default_rng(0))
    assert privacy.noise_std == pytest.approx(0.5 * math.sqrt(2))
    # 200,000 draws: the sample std is within 1 % of sigma with overwhelming odds.
    assert noise.std() == pytest.approx(privacy.noise_std, rel=0.01)
    assert abs(noise.mean()) < 0.01


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ([0.5, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]),
        ([2.0, 0.0, 0.0], [1.0, 0.0, 0.0]),
        ([0.6, 0.6, -1.0], [0.5, 0.5, 0.0]),
        ([-1.0, -2.0, -3.0], [1.0, 0.0, 0.0]),
        ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),
    ],
)
def test_projection_hand_cases(row: list[float], expected: list[float]) -> None:
    projected = project_to_simplex(np.array([row]))
    np.testing.assert_allclose(projected[0], expected, atol=1e-12)


@settings(max_examples=200)
@given(
    values=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 5), st.integers(2, 12)),
        elements=st.floats(-5, 5),
    ),
    seed=st.integers(0, 2**31),
)
def test_projection_is_nearest_simplex_point(values: np.ndarray, seed: int) -> None:
    projected = project_to_simplex(values)
    assert np.all(projected >= 0)
    np.testing.assert_allclose(projected.sum(axis=1), 1.0, atol=1e-9)
    # x is the projection of v iff (v - x) . (y - x) <= 0 for every simplex y.
    others = np.random.default_rng(seed).dirichlet(np.ones(values.shape[1]), 20)
    for row, point in zip(values, projected, strict=True):
        inner = (others - point) @ (row - point)
        assert np.all(inner <= 1e-9)


def test_privatised_rows_are_distributions() -> None:
    privacy = PrivacySettings(noise_multiplier=0.3, epsilon_budget=1.0)
    p = np.random.default_rng(1).dirichlet(np.ones(10), 64)
    noisy = privatise(p, privacy, np.random.default_rng(2))
    assert noisy.dtype == np.float32
    assert np.all(noisy >= 0)
    np.testing.assert_allclose(noisy.sum(axis=1), 1.0, atol=1e-6)
    assert not np.allclose(noisy, p, atol=1e-3)


# Accounting against dp-accounting's own figures


@pytest.mark.parametrize(
    ("multiplier", "count", "delta"),
    [(1.0, 1, 1e-5), (5.0, 320, 1e-5), (20.0, 3680, 1e-6)],
)
def test_epsilon_matches_rdp_accountant(
    multiplier: float, count: int, delta: float
) -> None:
    expected = library_epsilon(multiplier, count, delta)
    assert epsilon_spent({multiplier: count}, delta) == pytest.approx(
        expected, rel=1e-12
    )


def test_epsilon_matches_pld_accountant() -> None:
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_event.GaussianDpEvent(4.0), 200)
    expected = accountant.get_epsilon(1e-5)
    assert epsilon_spent({4.0: 200}, 1e-5, "pld") == pytest.approx(expected, rel=1e-9)


def pld_library_epsilon(releases: dict[float, int], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant()
    for multiplier, count in releases.items():
        accountant.compose(dp_event.GaussianDpEvent(multiplier), count)
    return float(accountant.get_epsilon(delta))


def gaussian_log_delta(releases: dict[float, int], epsilon: float) -> float:
    """Return log delta(epsilon) of composed Gaussian releases, from the formula.

    delta(epsilon) = Phi(mu / 2 - epsilon / mu) - e^epsilon Phi(-mu / 2 - epsilon
    / mu) with mu^2 = sum count / multiplier^2.
    """
    from scipy.stats import norm

    mu = math.sqrt(sum(count / m**2 for m, count in releases.items()))
    first = norm.logcdf(mu / 2 - epsilon / mu)
    second = epsilon + norm.logcdf(-mu / 2 - epsilon / mu)
    return first + math.log1p(-math.exp(second - first))


PLD_CASES = [
    ({1.0: 1}, 1e-5),
    ({4.0: 200}, 1e-5),
    ({8.0: 1000}, 1e-5),
    ({20.0: 3680}, 1e-6),
    ({2.0: 50, 4.0: 10}, 1e-5),
    ({1.0: 1, 8.0: 100}, 1e-3),
    ({0.3: 3}, 1e-8),
    ({100.0: 1}, 1e-5),
]


@pytest.mark.parametrize(("releases", "delta"), PLD_CASES)
def test_pld_epsilon_within_pld_accountant(
    releases: dict[float, int], delta: float
) -> None:
    expected = pld_library_epsilon(releases, delta)
    epsilon = epsilon_spent(releases, delta, "pld")
    # The library's discretised loss is pessimistic, so it may only be above.
    assert epsilon <= expected + 1e-9
    assert epsilon == pytest.approx(expected, abs=3e-7)


@pytest.mark.parametrize(("releases", "delta"), PLD_CASES)
def test_pld_epsilon_never_under_counts(
    releases: dict[float, int], delta: float
) -> None:
    epsilon = epsilon_spent(releases, delta, "pld")
    # The returned epsilon gives at most the target delta, and one 1e-6
    # below it gives more, so it is the tight value rounded up.
    assert gaussian_log_delta(releases, epsilon) <= math.log(delta)
    assert gaussian_log_delta(releases, epsilon - 1e-6) > math.log(delta)


def test_pld_epsilon_fast_for_many_releases() -> None:
    # dp-accounting's PLD accountant took 7 s for 30,000 releases at 8.0
    # on a 2-core Xeon.
    started = time.perf_counter()
    epsilon = epsilon_spent({8.0: 30_000}, 1e-5, "pld")
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5
    assert epsilon == pytest.approx(epsilon_spent({8.0: 30_000}, 1e-5, "rdp"), rel=0.1)
    assert epsilon < epsilon_spent({8.0: 30_000}, 1e-5, "rdp")


def test_single_release_meets_classic_gaussian_bound() -> None:
    # sigma = sqrt(2 ln(1.25 / delta)) * sensitivity / epsilon gives
    # (epsilon, delta)-DP for epsilon < 1 (Dwork and Roth, Theorem A.1), so an
    # accountant must report at most that epsilon for one release.
    epsilon, delta = 0.5, 1e-5
    multiplier = math.sqrt(2 * math.log(1.25 / delta)) / epsilon
    assert epsilon_spent({multiplier: 1}, delta) <= epsilon


def test_mixed_noise_levels_compose() -> None:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(2.0), 50)
    accountant.compose(dp_event.GaussianDpEvent(4.0), 10)
    expected = accountant.get_epsilon(1e-5)
    assert epsilon_spent({2.0: 50, 4.0: 10}, 1e-5) == pytest.approx(expected, rel=1e-9)


# Ledger


def test_ledger_charges_per_device(tmp_path) -> None:
    privacy = PrivacySettings(noise_multiplier=5.0, epsilon_budget=10.0)
    ledger = PrivacyLedger(privacy, tmp_path / "ledger.json")
    spent = ledger.charge("kitchen", 32)
    ledger.charge("garage", 8)

    assert spent == pytest.approx(library_epsilon(5.0, 32, 1e-5))
    assert ledger.releases("kitchen") == {5.0: 32}
    assert ledger.releases("garage") == {5.0: 8}
    assert ledger.epsilon("nobody") == 0.0


def test_ledger_rejects_release_over_budget(tmp_path) -> None:
    privacy = PrivacySettings(noise_multiplier=5.0, epsilon_budget=1.0)
    ledger = PrivacyLedger(privacy, tmp_path / "ledger.json")
    # Find the largest count that fits by the library's own figure.
    fits = max(n for n in range(1, 200) if library_epsilon(5.0, n, 1e-5) <= 1.0)
    ledger.charge("kitchen", fits)

    with pytest.raises(PrivacyBudgetExceeded, match="'kitchen'.*budget 1"):
        ledger.charge("kitchen", 1)
    assert ledger.releases("kitchen") == {5.0: fits}


def test_ledger_survives_restart(tmp_path) -> None:
    path = tmp_path / "hub" / "ledger.json"
    privacy = PrivacySettings(noise_multiplier=5.0, epsilon_budget=10.0)
    PrivacyLedger(privacy, path).charge("kitchen", 40)

    reopened = PrivacyLedger(privacy, path)

    assert reopened.releases("kitchen") == {5.0: 40}
    assert json.loads(path.read_text())["format"] == 1


def test_unwritable_ledger_charges_nothing(tmp_path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    path = blocker / "ledger.json"
    ledger = PrivacyLedger(
        PrivacySettings(noise_multiplier=5.0, epsilon_budget=10.0), path
    )

    with pytest.raises(ConfigError) as caught:
        ledger.charge("kitchen", 32)

    assert str(caught.value).startswith(f"cannot write privacy ledger {path}: ")
    assert "these labels were not released" in str(caught.value)
    assert ledger.releases("kitchen") == {}
    assert ledger.epsilon("kitchen") == 0.0
    assert blocker.read_text() == ""


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            b'{"format": 1, "devices": {"kitchen"',
            "(Expecting ':' delimiter: line 1 column 36 (char 35))",
        ),
        (b'{"format": 1, "devices": {"kitchen\xff": {}}}', "can't decode byte 0xff"),
        (b'{"format": 1' + b"0" * 5000 + b"}", "Exceeds the limit (4300 digits)"),
        (b"[" * 100_000 + b"]" * 100_000, "maximum recursion depth exceeded"),
    ],
    ids=["truncated", "not_utf8", "int_too_long", "nested_too_deeply"],
)
def test_ledger_rejects_damaged_json(tmp_path, content: bytes, reason: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_bytes(content)
    privacy = PrivacySettings(noise_multiplier=5.0, epsilon_budget=10.0)

    with pytest.raises(ConfigError) as caught:
        PrivacyLedger(privacy, path)

    message = str(caught.value)
    assert message.startswith(f"cannot read privacy ledger {path}: it is not valid ")
    assert reason in message
    assert message.endswith(
        "restore it from a backup, and move it away only if no labels were "
        "released with it"
    )
    assert path.read_bytes() == content


def test_ledger_rejects_foreign_file(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"devices": {}}')
    privacy = PrivacySettings(noise_multiplier=5.0, epsilon_budget=10.0)
    with pytest.raises(ConfigError, match="not a format 1 ledger"):
        PrivacyLedger(privacy, path)


@pytest.mark.parametrize(
    ("devices", "entry", "expected"),
    [
        ("[]", "devices = []", "an object of devices"),
        ('{"kitchen": 7}', "devices.kitchen = 7", "an object of release counts"),
        ('{"kitchen": {"four": 3}}', "key 'four' of devices.kitchen", "a noise"),
        ('{"kitchen": {"0.0": 3}}', "key '0.0' of devices.kitchen", "a noise"),
        ('{"kitchen": {"NaN": 3}}', "key 'NaN' of devices.kitchen", "a noise"),
        ('{"kitchen": {"5.0": -5}}', "devices.kitchen.5.0 = -5", "a whole number"),
        ('{"kitchen": {"5.0": 31.9}}', "devices.kitchen.5.0 = 31.9", "a whole"),
        ('{"kitchen": {"5.0": "32"}}', "devices.kitchen.5.0 = '32'", "a whole"),
        ('{"kitchen": {"5.0": true}}', "devices.kitchen.5.0 = True", "a whole"),
    ],
)
def test_ledger_rejects_invalid_entries(
    tmp_path, devices: str, entry: str, expected: str
) -> None:
    path = tmp_path / "ledger.json"
    text = f'{{"format": 1, "devices": {devices}}}'
    path.write_text(text)
    privacy = PrivacySettings(noise_multiplier=5.0, epsilon_budget=10.0)

    with pytest.raises(ConfigError) as caught:
        PrivacyLedger(privacy, path)

    message = str(caught.value)
    assert message.startswith(f"privacy ledger {path}: {entry} is invalid; ")
    assert f"expected {expected}" in message
    assert message.endswith(
        "restore it from a backup, because a new ledger would "
        "let devices spend their budget again"
    )
    assert path.read_text() == text


def test_ledger_reads_valid_entries(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"format": 1, "devices": {"kitchen": {"5.0": 32, "2.5": 0}}}')
    privacy = PrivacySettings(noise_multiplier=5.0, epsilon_budget=10.0)

    ledger = PrivacyLedger(privacy, path)

    assert ledger.releases("kitchen") == {5.0: 32, 2.5: 0}


def test_release_converts_logits_and_charges(tmp_path) -> None:
    privacy = PrivacySettings(noise_multiplier=1.0, epsilon_budget=100.0)
    release = PrivateRelease(
        PrivacyLedger(privacy), "kitchen", np.random.default_rng(0)
    )
    logits = np.random.default_rng(1).normal(size=(6, 4))
    labels = release.labels(logits, "logits")
    assert labels.shape == (6, 4)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-6)
    assert release.ledger.releases("kitchen") == {1.0: 6}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier 0.0"),
        ({"epsilon_budget": -1.0}, "epsilon_budget -1.0"),
        ({"delta": 1.0}, r"delta 1.0: expected a number in \(0, 1\)"),
        ({"accountant": "moments"}, "accountant 'moments'"),
    ],
)
def test_privacy_settings_reject_invalid(fields: dict, message: str) -> None:
    values = {"noise_multiplier": 1.0, "epsilon_budget": 1.0, **fields}
    with pytest.raises(ConfigError, match=message):
        PrivacySettings(**values)


def test_refund_failure_names_unreceived_labels(tmp_path) -> None:
    folder = tmp_path / "ledgers"
    ledger = PrivacyLedger(PrivacySettings(1.0, 1000.0), folder / "ledger.json")
    ledger.charge("kitchen", 8)
    # A file in place of the ledger's folder makes the write fail.
    (folder / "ledger.json").unlink()
    folder.rmdir()
    folder.write_text("")

    with pytest.raises(ConfigError) as caught:
        ledger.refund("kitchen", 8)

    # A push refunds updates the broker dropped and updates that SIGINT kept
    # from the broker, so the message names neither cause.
    assert "8 soft labels for device 'kitchen'" in str(caught.value)
    assert "the device never received" in str(caught.value)
    assert "broker" not in str(caught.value)
    assert ledger.releases("kitchen") == {1.0: 8}
