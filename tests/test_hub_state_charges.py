"""Privacy charges of label requests when the noise multiplier changes.

A worker restarted with another ``privacy.noise_multiplier`` finds the
charges that its earlier configuration made for requests still in flight.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from dslo_edge.hub_config import RateLimit
from dslo_edge.hub_state import ADMITTED, BUDGET_EXHAUSTED, HubState, RequestKey

pytest.importorskip("dp_accounting")

from dslo_edge.privacy import PrivacySettings  # noqa: E402

RATE = RateLimit(requests_per_s=1000.0, burst=1000)
DELTA = 1e-5


def key(request: int, samples: int = 32) -> RequestKey:
    return RequestKey("cam", request.to_bytes(16, "little"), samples)


def privacy(multiplier: float, budget: float = 100.0) -> PrivacySettings:
    return PrivacySettings(noise_multiplier=multiplier, epsilon_budget=budget)


def rdp_epsilon(releases: dict[float, int]) -> float:
    """Return the epsilon of Gaussian releases, composed with dp-accounting's RDP."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    for multiplier, count in releases.items():
        accountant.compose(dp_event.GaussianDpEvent(multiplier), count)
    return float(accountant.get_epsilon(DELTA))


def test_refund_after_multiplier_change(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    before = HubState(path, "w1")
    assert before.admit([key(1)], 0.0, RATE, privacy(4.0), 30)[0].kind == ADMITTED
    epsilon_charged = before.epsilon("cam", privacy(4.0))
    before.close()

    # The worker restarts with noise multiplier 2 and releases request 2.
    after = HubState(path, "w1")
    assert after.admit([key(2)], 1.0, RATE, privacy(2.0), 30)[0].kind == ADMITTED
    after.record_answers(
        [(key(2), "ok", b"labels")], 2.0, released=[key(2)], privacy=privacy(2.0)
    )
    # Request 1, charged at multiplier 4, has NaN labels after all.
    after.record_answers(
        [(key(1), "rejected", b"nan")], 3.0, refunds=[key(1)], privacy=privacy(2.0)
    )

    # docs/hub.md lists 7.08 for 32 samples at 4.0 and 16.5 at 2.0.
    assert epsilon_charged == pytest.approx(7.08, abs=0.005)
    assert after.releases("cam") == {4.0: 0, 2.0: 32}
    assert after.epsilon("cam", privacy(2.0)) == pytest.approx(16.5, abs=0.05)
    assert after.epsilon("cam", privacy(2.0)) == pytest.approx(rdp_epsilon({2.0: 32}))


def test_restart_moves_charge_to_new_multiplier(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    before = HubState(path, "w1")
    before.admit([key(1)], 0.0, RATE, privacy(4.0), 30)
    before.close()

    # The broker redelivers request 1 to the restarted worker, whose
    # labels get noise of multiplier 2.
    after = HubState(path, "w1")
    admission = after.admit([key(1)], 1.0, RATE, privacy(2.0), 30)[0]
    after.record_answers(
        [(key(1), "ok", b"labels")], 2.0, released=[key(1)], privacy=privacy(2.0)
    )

    assert admission.kind == ADMITTED
    assert after.releases("cam") == {4.0: 0, 2.0: 32}
    assert after.epsilon("cam", privacy(2.0)) == pytest.approx(rdp_epsilon({2.0: 32}))


def test_restart_refund_removes_moved_charge(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    before = HubState(path, "w1")
    before.admit([key(1)], 0.0, RATE, privacy(4.0), 30)
    before.close()

    after = HubState(path, "w1")
    after.admit([key(1)], 1.0, RATE, privacy(2.0), 30)
    after.record_answers(
        [(key(1), "rejected", b"nan")], 2.0, refunds=[key(1)], privacy=privacy(2.0)
    )

    assert after.releases("cam") == {4.0: 0, 2.0: 0}
    assert after.epsilon("cam", privacy(2.0)) == 0.0


def test_moved_charge_over_budget_is_refused(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    before = HubState(path, "w1")
    before.admit([key(1)], 0.0, RATE, privacy(4.0, budget=10.0), 30)
    before.close()

    # 32 samples at multiplier 2 spend epsilon 16.5, over the budget of 10.
    after = HubState(path, "w1")
    admission = after.admit([key(1)], 1.0, RATE, privacy(2.0, budget=10.0), 30)[0]

    assert admission.kind == BUDGET_EXHAUSTED
    assert "noise multiplier 2" in admission.detail
    assert after.releases("cam") == {4.0: 32}


def test_resend_with_more_samples_is_charged(tmp_path) -> None:
    state = HubState(tmp_path / "state.sqlite", "w1")
    state.admit([key(1, samples=4)], 0.0, RATE, privacy(4.0), 30)

    # A resend of the unanswered request with the same id and 32 samples.
    admission = state.admit([key(1, samples=32)], 1.0, RATE, privacy(4.0), 30)[0]

    assert admission.kind == ADMITTED
    assert state.releases("cam") == {4.0: 32}


def test_older_state_file_gets_charge_columns(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE requests (device TEXT NOT NULL, request_id BLOB NOT NULL, "
        "worker TEXT NOT NULL, claimed REAL NOT NULL, answered REAL, status TEXT, "
        "payload BLOB, PRIMARY KEY (device, request_id))"
    )
    db.execute(
        "CREATE TABLE releases (device TEXT NOT NULL, multiplier REAL NOT NULL, "
        "count INTEGER NOT NULL, PRIMARY KEY (device, multiplier))"
    )
    db.execute("INSERT INTO releases VALUES ('cam', 4.0, 32)")
    db.execute(
        "INSERT INTO requests (device, request_id, worker, claimed) "
        "VALUES (?, ?, ?, ?)",
        ("cam", key(1).request_id, "w1", 0.0),
    )
    db.commit()
    db.close()

    state = HubState(path, "w1")
    admission = state.admit([key(1)], 1.0, RATE, privacy(2.0), 30)[0]
    state.record_answers(
        [(key(1), "rejected", b"nan")], 2.0, refunds=[key(1)], privacy=privacy(2.0)
    )
    state.admit([key(2)], 3.0, RATE, privacy(2.0), 30)
    state.record_answers(
        [(key(2), "rejected", b"nan")], 4.0, refunds=[key(2)], privacy=privacy(2.0)
    )

    # The charge of the older claim has no recorded size, so it stays.
    assert admission.kind == ADMITTED
    assert state.releases("cam") == {4.0: 32, 2.0: 0}


def test_pld_admission_fast_at_many_releases(tmp_path) -> None:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_event.GaussianDpEvent(8.0), 30_000)
    budget = float(accountant.get_epsilon(DELTA))
    settings = PrivacySettings(
        noise_multiplier=8.0, epsilon_budget=budget, accountant="pld"
    )
    state = HubState(tmp_path / "state.sqlite", "w1")
    assert state.charge_releases("cam", 29_990, settings) == ""

    # dp-accounting's PLD accountant took 7 s per admission at this count
    # on a 2-core Xeon.
    started = time.perf_counter()
    last_fitting = state.admit([key(1, samples=10)], 0.0, RATE, settings, 30)[0]
    one_over = state.admit([key(2, samples=1)], 1.0, RATE, settings, 30)[0]
    elapsed = time.perf_counter() - started

    assert elapsed < 1.0
    assert last_fitting.kind == ADMITTED
    assert one_over.kind == BUDGET_EXHAUSTED
    assert state.releases("cam") == {8.0: 30_000}
    assert state.epsilon("cam", settings) <= budget


def test_rejection_epsilon_reads_above_budget(tmp_path) -> None:
    # 77 releases at 4.0 spend 12.03, which three significant digits show as 12.
    settings = privacy(4.0, budget=12.0)
    state = HubState(tmp_path / "state.sqlite", "w1")
    assert state.charge_releases("cam", 76, settings) == ""

    rejection = state.admit([key(1, samples=1)], 0.0, RATE, settings, 30)[0]

    assert rejection.kind == BUDGET_EXHAUSTED
    shown_epsilon = rejection.detail.split("spent epsilon to ")[1].split(",")[0]
    assert float(shown_epsilon) > 12.0
    assert float(shown_epsilon) == pytest.approx(rdp_epsilon({4.0: 77}), abs=0.01)
    assert rejection.detail.endswith("above its budget of 12")
