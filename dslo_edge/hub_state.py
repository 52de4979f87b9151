"""State shared by the hub workers of one machine, in one SQLite file.

Workers that share the file agree on:

- per-device rate limits: one token bucket per device;
- per-device privacy budgets: released vectors per noise multiplier,
  composed with ``privacy.epsilon_spent``;
- request claims and responses: a request id is labelled and charged once,
  and a repeated request (a device resend, or a broker redelivery to
  another worker) gets the stored response again;
- teacher rounds: every worker gives the same teacher file the same round;
- push runs: each scheduled push runs on one worker per period, and the
  devices its current run has not reached yet are stored, so that a worker
  killed part way through a run finishes it when it starts again, or
  another worker does when the killed worker's id is not running. Each
  charged update of a device whose push is under way is stored with its
  payload, so the run that resumes publishes it again unchanged, not
  charged again, and charges only the rest.

Every check-and-charge runs in one ``BEGIN IMMEDIATE`` transaction, which
holds SQLite's write lock, so two workers cannot both spend a device's last
token. The journal is WAL with ``synchronous=FULL``: a privacy charge is on
disk before the labels it pays for are published.

Workers on other machines cannot share the file (SQLite locking is not safe
on network file systems). Give them their own file and a ``rate_limit.share``
below 1, or a device partition of their own.

``HubState`` is built in layers, one module each: ``hub_state_file`` (the
schema, the connection and its transactions), ``hub_state_charges`` (rate
limits, privacy charges and stored responses) and ``hub_push_state`` (push
runs and their stored batches). This module adds the teacher rounds and
exports the names that callers import.
"""

from __future__ import annotations

from dslo_edge.hub_push_state import PushState, StoredBatch, UnfinishedRun
from dslo_edge.hub_state_charges import (
    ADMITTED,
    BUDGET_EXHAUSTED,
    CACHED,
    IN_PROGRESS,
    RATE_LIMITED,
    Admission,
    RequestKey,
)
from dslo_edge.hub_state_file import ADDED_COLUMNS, SCHEMA

__all__ = [
    "ADDED_COLUMNS",
    "ADMITTED",
    "BUDGET_EXHAUSTED",
    "CACHED",
    "IN_PROGRESS",
    "RATE_LIMITED",
    "SCHEMA",
    "Admission",
    "HubState",
    "RequestKey",
    "StoredBatch",
    "UnfinishedRun",
]


class HubState(PushState):
    """The shared SQLite state; one instance per worker process.

    Args:
        path: the database file, created when missing.
        worker_id: this worker, recorded with its claims.
    """

    def teacher_round(self, identity: str, version: str) -> int:
        """Return the round of a teacher file, numbering new files 1, 2, ..."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT round FROM teachers WHERE identity = ?", (identity,)
            ).fetchone()
            if row is not None:
                return int(row[0])
            (latest,) = db.execute("SELECT MAX(round) FROM teachers").fetchone()
            number = int(latest or 0) + 1
            db.execute(
                "INSERT INTO teachers (identity, round, version) VALUES (?, ?, ?)",
                (identity, number, version),
            )
            return number
