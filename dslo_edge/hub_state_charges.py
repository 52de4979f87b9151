"""Rate limits, privacy charges and stored responses of the hub state.

``ChargeState`` admits and charges label requests, stores the responses sent
for them, and charges and refunds the releases of pushes.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from dslo_edge.hub_config import RateLimit
from dslo_edge.hub_state_file import StateFile
from dslo_edge.label_protocol import STATUS_RATE_LIMITED
from dslo_edge.privacy import PrivacySettings, epsilon_spent, format_epsilon_over

# The logger of hub_state, where this code was before, so that log lines and
# logging filters keep its name.
logger = logging.getLogger("dslo_edge.hub_state")

# Admission.kind values.
ADMITTED = "admitted"
CACHED = "cached"
IN_PROGRESS = "in_progress"
RATE_LIMITED = "rate_limited"
BUDGET_EXHAUSTED = "budget_exhausted"


@dataclass(frozen=True)
class RequestKey:
    """One request of one device, with its sample count.

    Attributes:
        drained_from: the dead worker whose session this worker drained the
            request from, or None. A claim of that worker is stale.
    """

    device: str
    request_id: bytes
    samples: int
    drained_from: str | None = None


@dataclass(frozen=True)
class Admission:
    """Whether a worker may label a request, and what to send otherwise.

    Attributes:
        kind: ``admitted`` (label it), ``cached`` (send ``payload`` again
            with ``status``), ``in_progress`` (another worker is labelling
            it), ``rate_limited`` or ``budget_exhausted``.
        retry_after_s: for ``rate_limited``, and for a ``cached`` response
            with that status, seconds until the device's next token is due.
    """

    kind: str
    status: str | None = None
    payload: bytes | None = None
    retry_after_s: float | None = None
    detail: str = ""


class ChargeState(StateFile):
    """The requests, buckets and releases tables of the state file."""

    # Requests

    def admit(
        self,
        requests: list[RequestKey],
        now: float,
        rate: RateLimit,
        privacy: PrivacySettings | None,
        claim_timeout_s: float,
    ) -> list[Admission]:
        """Decide for each request whether to label it, and charge it if so.

        A new request takes one token from its device's bucket and, with
        privacy, charges one release per sample. It is then claimed by this
        worker. A request seen before takes no token. Its recorded charge is
        replaced only when this worker releases it with another noise
        multiplier or sample count, and otherwise it is not charged again.
        """
        with self._transaction() as db:
            return [
                self._admit_one(db, key, now, rate, privacy, claim_timeout_s)
                for key in requests
            ]

    def _admit_one(
        self,
        db: sqlite3.Connection,
        key: RequestKey,
        now: float,
        rate: RateLimit,
        privacy: PrivacySettings | None,
        claim_timeout_s: float,
    ) -> Admission:
        row = db.execute(
            "SELECT worker, claimed, answered, status, payload, charge_multiplier, "
            "charge_count FROM requests WHERE device = ? AND request_id = ?",
            (key.device, key.request_id),
        ).fetchone()
        if row is not None:
            return self._admit_known(db, key, row, now, rate, privacy, claim_timeout_s)
        tokens = self._tokens(db, key.device, now, rate)
        if tokens < 1.0:
            wait = (1.0 - tokens) / rate.rate
            return Admission(RATE_LIMITED, retry_after_s=wait)
        charge: tuple[float | None, int] = (None, 0)
        if privacy is not None:
            refusal = self._charge_privacy(db, key, privacy)
            if refusal:
                return Admission(BUDGET_EXHAUSTED, detail=refusal)
            charge = (privacy.noise_multiplier, key.samples)
        db.execute(
            "UPDATE buckets SET tokens = ?, updated = ? WHERE device = ?",
            (tokens - 1.0, now, key.device),
        )
        db.execute(
            "INSERT INTO requests (device, request_id, worker, claimed, "
            "charge_multiplier, charge_count) VALUES (?, ?, ?, ?, ?, ?)",
            (key.device, key.request_id, self.worker_id, now, *charge),
        )
        return Admission(ADMITTED)

    def _admit_known(
        self,
        db: sqlite3.Connection,
        key: RequestKey,
        row: tuple[Any, ...],
        now: float,
        rate: RateLimit,
        privacy: PrivacySettings | None,
        claim_timeout_s: float,
    ) -> Admission:
        worker, claimed, answered, status, payload, *charge = row
        if answered is not None and status == STATUS_RATE_LIMITED:
            # The wait given with the stored response has partly passed, so
            # the replay gives the time left until the bucket's next token.
            tokens = self._tokens(db, key.device, now, rate)
            wait = max(0.0, 1.0 - tokens) / rate.rate
            return Admission(CACHED, status, payload, retry_after_s=wait)
        if answered is not None:
            return Admission(CACHED, status=status, payload=payload)
        # A drained request comes from the session of a worker that stayed
        # offline for the drain's grace period, so that worker's claim is stale.
        live_claim = worker not in (self.worker_id, key.drained_from)
        if live_claim and now - claimed < claim_timeout_s:
            return Admission(IN_PROGRESS)
        # This worker's own claim (a redelivery after a restart) or a stale
        # claim of a worker that died: label it, already paid for unless the
        # charge differs from what this worker releases.
        if privacy is not None:
            refusal = self._move_charge(db, key, privacy, charge[0], charge[1])
            if refusal:
                return Admission(BUDGET_EXHAUSTED, detail=refusal)
        db.execute(
            "UPDATE requests SET worker = ?, claimed = ? "
            "WHERE device = ? AND request_id = ?",
            (self.worker_id, now, key.device, key.request_id),
        )
        return Admission(ADMITTED)

    def _move_charge(
        self,
        db: sqlite3.Connection,
        key: RequestKey,
        privacy: PrivacySettings,
        multiplier: float | None,
        count: int | None,
    ) -> str:
        """Replace a claimed request's charge with one for this worker's release.

        A worker restarted with another noise multiplier, or one that takes
        over the claim of a worker with another configuration, adds noise of
        its own multiplier. A resend with the same request id may also carry
        another number of samples. Returns "" when the charge fits the budget
        or already matches, else why the budget does not allow it. The old
        charge then stays.
        """
        new_charge = (privacy.noise_multiplier, key.samples)
        # NULL: a claim stored before charges were recorded, at an unknown multiplier.
        if count is None or (multiplier, count) == new_charge:
            return ""
        releases = self._releases(db, key.device)
        if count and multiplier is not None:
            releases[multiplier] = max(0, releases.get(multiplier, 0) - count)
        releases[new_charge[0]] = releases.get(new_charge[0], 0) + key.samples
        epsilon = epsilon_spent(releases, privacy.delta, privacy.accountant)
        if epsilon > privacy.epsilon_budget:
            return (
                f"labelling {key.samples} samples with noise multiplier "
                f"{new_charge[0]:g} would raise the device's spent epsilon to "
                f"{format_epsilon_over(epsilon, privacy.epsilon_budget)}, above its "
                f"budget of {privacy.epsilon_budget:g}"
            )
        self._take_back(db, key, multiplier, count)
        self._add_releases(db, key.device, *new_charge)
        db.execute(
            "UPDATE requests SET charge_multiplier = ?, charge_count = ? "
            "WHERE device = ? AND request_id = ?",
            (*new_charge, key.device, key.request_id),
        )
        return ""

    def _take_back(
        self,
        db: sqlite3.Connection,
        key: RequestKey,
        multiplier: float | None,
        count: int,
    ) -> None:
        """Remove a request's recorded charge from its device's releases."""
        if not count or multiplier is None:
            return
        db.execute(
            "UPDATE releases SET count = MAX(0, count - ?) "
            "WHERE device = ? AND multiplier = ?",
            (count, key.device, multiplier),
        )
        db.execute(
            "UPDATE requests SET charge_multiplier = NULL, charge_count = 0 "
            "WHERE device = ? AND request_id = ?",
            (key.device, key.request_id),
        )

    def _tokens(
        self, db: sqlite3.Connection, device: str, now: float, rate: RateLimit
    ) -> float:
        row = db.execute(
            "SELECT tokens, updated FROM buckets WHERE device = ?", (device,)
        ).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO buckets (device, tokens, updated) VALUES (?, ?, ?)",
                (device, rate.capacity, now),
            )
            return rate.capacity
        tokens, updated = row
        return float(min(rate.capacity, tokens + max(0.0, now - updated) * rate.rate))

    def _charge_privacy(
        self, db: sqlite3.Connection, key: RequestKey, privacy: PrivacySettings
    ) -> str:
        """Charge the releases and return "", or the reason they exceed the budget."""
        releases = self._releases(db, key.device)
        multiplier = privacy.noise_multiplier
        releases[multiplier] = releases.get(multiplier, 0) + key.samples
        epsilon = epsilon_spent(releases, privacy.delta, privacy.accountant)
        if epsilon > privacy.epsilon_budget:
            return (
                f"labelling {key.samples} more samples would raise the device's "
                "spent epsilon to "
                f"{format_epsilon_over(epsilon, privacy.epsilon_budget)}, above its "
                "budget of "
                f"{privacy.epsilon_budget:g}"
            )
        self._add_releases(db, key.device, multiplier, key.samples)
        return ""

    def _add_releases(
        self, db: sqlite3.Connection, device: str, multiplier: float, count: int
    ) -> None:
        db.execute(
            "INSERT INTO releases (device, multiplier, count) VALUES (?, ?, ?) "
            "ON CONFLICT (device, multiplier) DO UPDATE SET count = count + ?",
            (device, multiplier, count, count),
        )

    def charge_releases(self, device: str, count: int, privacy: PrivacySettings) -> str:
        """Charge ``count`` released vectors outside a request, as pushes do.

        Returns "" when charged, else why the budget does not allow them.
        """
        with self._transaction() as db:
            return self._charge_privacy(db, RequestKey(device, b"", count), privacy)

    def refund_releases(self, device: str, count: int, multiplier: float) -> None:
        """Take back ``count`` releases that ``charge_releases`` charged.

        Pushes call it for labels that the broker dropped unread.
        """
        with self._transaction() as db:
            db.execute(
                "UPDATE releases SET count = MAX(0, count - ?) "
                "WHERE device = ? AND multiplier = ?",
                (count, device, multiplier),
            )

    def _releases(self, db: sqlite3.Connection, device: str) -> dict[float, int]:
        rows = db.execute(
            "SELECT multiplier, count FROM releases WHERE device = ?", (device,)
        ).fetchall()
        return {float(multiplier): int(count) for multiplier, count in rows}

    def releases(self, device: str) -> dict[float, int]:
        """Return the released vectors of a device per noise multiplier."""
        with self._lock:
            return self._releases(self._db, device)

    def epsilon(self, device: str, privacy: PrivacySettings) -> float:
        """Return the epsilon spent on a device so far."""
        return epsilon_spent(self.releases(device), privacy.delta, privacy.accountant)

    def record_answers(
        self,
        answers: list[tuple[RequestKey, str, bytes]],
        now: float,
        *,
        refunds: list[RequestKey] | None = None,
        released: list[RequestKey] | None = None,
        privacy: PrivacySettings | None = None,
    ) -> None:
        """Store the status and payload sent for each request.

        Rate-limit and budget responses are stored too, so a repeated request
        gets the same response and is not charged.

        Args:
            refunds: requests among ``answers`` that were admitted, and so
                charged, but whose labels are not released, such as labels
                the teacher made NaN. The charge recorded with each request
                leaves the device's release count, whatever the current
                ``privacy``. A request with a stored response, or
                claimed by another worker since, is not refunded, so each
                charge is taken back at most once and only by the worker
                that holds the claim.
            released: requests among ``answers`` whose labels this worker
                made and releases. One that another worker took over after
                a claim timeout is charged again, because that worker labels
                it too, or took the admission charge back.
            privacy: this worker's settings, which charge ``released``.
        """
        with self._transaction() as db:
            for key in refunds or []:
                self._refund_privacy(db, key)
            if privacy is not None:
                for key in released or []:
                    self._charge_taken_over(db, key, privacy)
            db.executemany(
                "INSERT INTO requests "
                "(device, request_id, worker, claimed, answered, status, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (device, request_id) DO UPDATE SET "
                "answered = excluded.answered, status = excluded.status, "
                "payload = excluded.payload",
                [
                    (
                        key.device,
                        key.request_id,
                        self.worker_id,
                        now,
                        now,
                        status,
                        payload,
                    )
                    for key, status, payload in answers
                ],
            )

    def _refund_privacy(self, db: sqlite3.Connection, key: RequestKey) -> None:
        """Take back the admission charge of an unanswered request this worker holds.

        The refund removes the recorded charge, at the noise multiplier it
        was made with. A worker whose claim another worker took over after
        the claim timeout refunds nothing, because that worker may still
        release labels.
        """
        row = db.execute(
            "SELECT worker, answered, charge_multiplier, charge_count FROM requests "
            "WHERE device = ? AND request_id = ?",
            (key.device, key.request_id),
        ).fetchone()
        if row is None or row[0] != self.worker_id or row[1] is not None:
            return
        multiplier, count = row[2], row[3]
        # NOTE: a claim stored before charges were recorded (count NULL) is
        # not refunded, because the noise multiplier it was charged at is
        # unknown. That over-counts the spent budget, the safe direction.
        if not count or multiplier is None:
            return
        self._take_back(db, key, multiplier, count)
        logger.info(
            "Hub worker %s refunded the privacy charge (samples %d, noise "
            "multiplier %g) to device %s for request %s, whose labels were not "
            "released",
            self.worker_id,
            count,
            multiplier,
            key.device,
            key.request_id.hex(),
        )

    def _charge_taken_over(
        self, db: sqlite3.Connection, key: RequestKey, privacy: PrivacySettings
    ) -> None:
        """Charge again a released request whose claim another worker took over.

        The admission charged one release, but the worker that took the claim
        over labels the request as well, or refunded the charge after its own
        labels came out NaN. The labels are computed by now, so the charge is
        not checked against the budget.
        """
        row = db.execute(
            "SELECT worker FROM requests WHERE device = ? AND request_id = ?",
            (key.device, key.request_id),
        ).fetchone()
        if row is None or row[0] == self.worker_id:
            return
        self._add_releases(db, key.device, privacy.noise_multiplier, key.samples)
        logger.warning(
            "Hub worker %s released labels for request %s of device %s after "
            "worker %s took over its claim; charged its %d samples again",
            self.worker_id,
            key.request_id.hex(),
            key.device,
            row[0],
            key.samples,
        )

    def forget_answers(self, before: float) -> int:
        """Delete responses stored before ``before`` and return their number."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM requests WHERE answered IS NOT NULL AND answered < ?",
                (before,),
            )
            return cursor.rowcount

    def answer_counts(self) -> dict[str, int]:
        """Return the number of stored responses per status, for tests and metrics."""
        with self._lock:
            rows = self._db.execute(
                "SELECT status, COUNT(*) FROM requests GROUP BY status"
            ).fetchall()
        return {str(status): int(count) for status, count in rows}
