"""Push runs and their stored batches in the hub state.

``PushState`` claims each push's run once per period across workers and
keeps the devices that the run has not reached yet. It also stores each
charged batch of a device's push, so a run resumed after a stop publishes
the same bytes again and charges only the rest.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

from dslo_edge.hub_state_charges import ChargeState, RequestKey
from dslo_edge.hub_worker_lock import lock_if_stopped
from dslo_edge.privacy import PrivacySettings

# The logger of hub_state, where this code was before, so that log lines and
# logging filters keep its name.
logger = logging.getLogger("dslo_edge.hub_state")


@dataclass(frozen=True)
class UnfinishedRun:
    """The devices of a push run that a stopped worker claimed and did not finish.

    Attributes:
        pending: devices whose push had not started, in the order of the
            push's ``devices``.
        interrupted: devices whose push an earlier dslo-edge version started
            and did not end, so they may have received and been charged for
            part of the run, with no stored batches to resume from.
        taken_from: the other worker ids whose run this worker took over,
            because no worker with that id was running.
        partly_sent: devices whose push started and did not end, with the
            batches charged so far stored in ``push_batches``, in the order
            of the push's ``devices``.
    """

    pending: tuple[str, ...]
    interrupted: tuple[str, ...]
    taken_from: tuple[str, ...] = ()
    partly_sent: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredBatch:
    """One charged update of a device's push, as published.

    Attributes:
        batch: the batch's index in the device's push, from 0.
        first_sample, end_sample: the dataset rows it labels, end excluded.
        source: the teacher and data file it was made from, as the pusher
            describes them, to tell whether later batches would match.
        created: when it was made and charged, in seconds since the epoch,
            which is also the update's timestamp.
        payload: the encoded, and signed when the device has a key, update.
        acknowledged: whether the broker acknowledged it.
    """

    batch: int
    first_sample: int
    end_sample: int
    source: str
    created: float
    payload: bytes
    acknowledged: bool = False


class PushState(ChargeState):
    """The schedule, push_devices and push_batches tables of the state file.

    It charges each stored batch through ``ChargeState``.
    """

    def claim_run(
        self, name: str, now: float, every_s: float, devices: Sequence[str] = ()
    ) -> bool:
        """Return True, once per period across workers, when a push is due.

        A claimed run stores ``devices`` as not yet pushed, in place of what
        the push's previous run left. A run stored as due more than
        ``every_s`` ahead, because ``every_s`` was shortened since the last
        run, is moved to ``now + every_s``. A due run is not claimed while
        another worker id whose lock is held has devices of the previous run
        left, because that run is still in progress.
        """
        # The locks of stopped worker ids are held until the commit, so a
        # worker with such an id that starts meanwhile waits, then finds the
        # new run claimed.
        with ExitStack() as other_locks, self._transaction() as db:
            row = db.execute(
                "SELECT next_due FROM schedule WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and row[0] > now + every_s:
                db.execute(
                    "UPDATE schedule SET next_due = ? WHERE name = ?",
                    (now + every_s, name),
                )
                logger.info(
                    "Push %s was due in %.0f s, more than its every_s %g; its "
                    "next run is in %g s",
                    name,
                    row[0] - now,
                    every_s,
                    every_s,
                )
                return False
            if row is not None and row[0] > now:
                return False
            if self._run_in_progress(db, name, other_locks):
                return False
            db.execute(
                "INSERT INTO schedule (name, next_due) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET next_due = excluded.next_due",
                (name, now + every_s),
            )
            db.execute("DELETE FROM push_devices WHERE name = ?", (name,))
            db.execute("DELETE FROM push_batches WHERE name = ?", (name,))
            db.executemany(
                "INSERT INTO push_devices (name, device, position, worker) "
                "VALUES (?, ?, ?, ?)",
                [
                    (name, device, position, self.worker_id)
                    for position, device in enumerate(devices)
                ],
            )
            return True

    def _run_in_progress(
        self, db: sqlite3.Connection, name: str, other_locks: ExitStack
    ) -> bool:
        """Return whether a running worker of another id still runs the push.

        The runs and stored batches of a push have no run id, so a second run
        would take over the first one's stored batches and publish them again
        as its own. This worker's own devices left are never in progress,
        because its scheduler runs one push at a time.
        """
        for (worker,) in db.execute(
            "SELECT DISTINCT worker FROM push_devices WHERE name = ? AND worker != ?",
            (name, self.worker_id),
        ).fetchall():
            if not other_locks.enter_context(lock_if_stopped(self.path, str(worker))):
                return True
        return False

    def take_unfinished_run(self, name: str, now: float) -> UnfinishedRun | None:
        """Take the run of a push that a stopped worker claimed and did not finish.

        The run is this worker id's, or another worker id's whose lock is
        free, so that no worker with that id runs on this machine. Call it
        only while holding this worker id's lock, and not while this worker
        runs the push, because such a run is in progress. The interrupted
        devices, which have no stored batches, are removed from the run, so a
        second call returns only the pending and partly sent ones. Returns
        None when no such run is stored, or when its period is over and the
        next run is due, since that run pushes to every device.
        """
        # Other ids' locks are held until the commit, so a worker with such
        # an id that starts meanwhile waits and then finds the run taken.
        with ExitStack() as other_locks, self._transaction() as db:
            row = db.execute(
                "SELECT next_due FROM schedule WHERE name = ?", (name,)
            ).fetchone()
            if row is None or row[0] <= now:
                return None
            taken_from = self._take_stopped_workers_runs(db, name, other_locks)
            rows = db.execute(
                "SELECT device, started, batches_stored FROM push_devices "
                "WHERE name = ? AND worker = ? ORDER BY position",
                (name, self.worker_id),
            ).fetchall()
            if not rows:
                return None
            db.execute(
                "DELETE FROM push_devices WHERE name = ? AND worker = ? AND started "
                "AND NOT batches_stored",
                (name, self.worker_id),
            )
        return UnfinishedRun(
            pending=tuple(device for device, started, _ in rows if not started),
            interrupted=tuple(
                device for device, started, stored in rows if started and not stored
            ),
            taken_from=taken_from,
            partly_sent=tuple(
                device for device, started, stored in rows if started and stored
            ),
        )

    def _take_stopped_workers_runs(
        self, db: sqlite3.Connection, name: str, other_locks: ExitStack
    ) -> tuple[str, ...]:
        """Move a push's devices from stopped worker ids to this one.

        Returns the worker ids taken over. Their locks stay in
        ``other_locks`` until it closes.
        """
        workers = [
            str(worker)
            for (worker,) in db.execute(
                "SELECT DISTINCT worker FROM push_devices "
                "WHERE name = ? AND worker != ? ORDER BY worker",
                (name, self.worker_id),
            )
        ]
        taken_over = []
        for worker in workers:
            if not other_locks.enter_context(lock_if_stopped(self.path, worker)):
                continue
            db.execute(
                "UPDATE push_devices SET worker = ? WHERE name = ? AND worker = ?",
                (self.worker_id, name, worker),
            )
            taken_over.append(worker)
        return tuple(taken_over)

    def start_device_push(self, name: str, device: str) -> None:
        """Record that this worker's run of a push starts publishing to a device.

        The device's charged batches are stored from now on, through
        ``store_push_batch``, so a resumed run can continue its push.
        """
        with self._transaction() as db:
            # Batches of a device not started in this run are left from an
            # earlier run, which an older dslo-edge version may have claimed
            # without deleting them.
            db.execute(
                "DELETE FROM push_batches WHERE name = ? AND device = ? AND "
                "NOT EXISTS (SELECT 1 FROM push_devices WHERE name = ? AND "
                "device = ? AND started)",
                (name, device, name, device),
            )
            db.execute(
                "UPDATE push_devices SET started = 1, batches_stored = 1 "
                "WHERE name = ? AND device = ? AND worker = ?",
                (name, device, self.worker_id),
            )

    def end_device_push(self, name: str, device: str) -> None:
        """Record that this worker's run of a push is done with a device."""
        with self._transaction() as db:
            db.execute(
                "DELETE FROM push_devices WHERE name = ? AND device = ? AND worker = ?",
                (name, device, self.worker_id),
            )
            db.execute(
                "DELETE FROM push_batches WHERE name = ? AND device = ?",
                (name, device),
            )

    def end_run(self, name: str) -> None:
        """Record that this worker's run of a push ended, even with devices left."""
        with self._transaction() as db:
            db.execute(
                "DELETE FROM push_devices WHERE name = ? AND worker = ?",
                (name, self.worker_id),
            )
            db.execute(
                "DELETE FROM push_batches WHERE name = ? AND device NOT IN "
                "(SELECT device FROM push_devices WHERE name = ?)",
                (name, name),
            )

    def store_push_batch(
        self,
        name: str,
        device: str,
        batch: StoredBatch,
        privacy: PrivacySettings | None,
        acknowledged: Sequence[int] = (),
    ) -> str:
        """Charge a push's batch to a device and store it, in one transaction.

        Without ``privacy`` the batch is only stored. Nothing is stored when
        the budget does not allow the batch, and nothing at all, the marks
        included, when the transaction fails.

        Args:
            acknowledged: earlier batches of the push that the broker
                acknowledged, marked so in the same transaction, also when
                the budget does not allow the batch. This saves the pusher a
                synced commit of its own for the marks.

        Returns:
            "" when charged and stored, else why the budget does not allow it.
        """
        samples = batch.end_sample - batch.first_sample
        with self._transaction() as db:
            _mark_acknowledged(db, name, device, acknowledged)
            if privacy is not None:
                key = RequestKey(device, b"", samples)
                refusal = self._charge_privacy(db, key, privacy)
                if refusal:
                    return refusal
            db.execute(
                "INSERT INTO push_batches (name, device, batch, first_sample, "
                "end_sample, source, created, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    device,
                    batch.batch,
                    batch.first_sample,
                    batch.end_sample,
                    batch.source,
                    batch.created,
                    batch.payload,
                ),
            )
            return ""

    def acknowledge_push_batches(
        self, name: str, device: str, batches: Sequence[int]
    ) -> None:
        """Record that the broker acknowledged stored batches of a push."""
        with self._transaction() as db:
            _mark_acknowledged(db, name, device, batches)

    def refund_push_batches(
        self,
        name: str,
        device: str,
        batches: Sequence[int],
        count: int,
        multiplier: float,
    ) -> None:
        """Take back the charge of a push's dropped batches and mark them as done.

        The batches are marked acknowledged in the refund's transaction, so a
        resumed run never publishes an update again after its charge went.

        Args:
            batches: the indices of the batches that the broker dropped.
            count: their samples, which leave the device's releases.
        """
        with self._transaction() as db:
            db.execute(
                "UPDATE releases SET count = MAX(0, count - ?) "
                "WHERE device = ? AND multiplier = ?",
                (count, device, multiplier),
            )
            _mark_acknowledged(db, name, device, batches)

    def stored_push_batches(self, name: str, device: str) -> list[StoredBatch]:
        """Return the stored batches of a device's push, by batch index."""
        with self._lock:
            rows = self._db.execute(
                "SELECT batch, first_sample, end_sample, source, created, payload, "
                "acknowledged FROM push_batches WHERE name = ? AND device = ? "
                "ORDER BY batch",
                (name, device),
            ).fetchall()
        return [
            StoredBatch(
                batch=int(row[0]),
                first_sample=int(row[1]),
                end_sample=int(row[2]),
                source=str(row[3]),
                created=float(row[4]),
                payload=bytes(row[5]),
                acknowledged=bool(row[6]),
            )
            for row in rows
        ]


def _mark_acknowledged(
    db: sqlite3.Connection, name: str, device: str, batches: Sequence[int]
) -> None:
    db.executemany(
        "UPDATE push_batches SET acknowledged = 1 "
        "WHERE name = ? AND device = ? AND batch = ?",
        [(name, device, batch) for batch in batches],
    )
