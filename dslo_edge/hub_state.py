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
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dslo_edge.errors import ConfigError
from dslo_edge.hub_config import RateLimit
from dslo_edge.hub_worker_lock import lock_if_stopped
from dslo_edge.label_protocol import STATUS_RATE_LIMITED
from dslo_edge.privacy import PrivacySettings, epsilon_spent

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    device TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS releases (
    device TEXT NOT NULL, multiplier REAL NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (device, multiplier));
CREATE TABLE IF NOT EXISTS requests (
    device TEXT NOT NULL, request_id BLOB NOT NULL, worker TEXT NOT NULL,
    claimed REAL NOT NULL, answered REAL, status TEXT, payload BLOB,
    charge_multiplier REAL, charge_count INTEGER,
    PRIMARY KEY (device, request_id));
CREATE INDEX IF NOT EXISTS requests_answered ON requests (answered);
CREATE TABLE IF NOT EXISTS teachers (
    identity TEXT PRIMARY KEY, round INTEGER NOT NULL, version TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS schedule (
    name TEXT PRIMARY KEY, next_due REAL NOT NULL);
CREATE TABLE IF NOT EXISTS push_devices (
    name TEXT NOT NULL, device TEXT NOT NULL, position INTEGER NOT NULL,
    worker TEXT NOT NULL, started INTEGER NOT NULL DEFAULT 0,
    batches_stored INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, device));
CREATE TABLE IF NOT EXISTS push_batches (
    name TEXT NOT NULL, device TEXT NOT NULL, batch INTEGER NOT NULL,
    first_sample INTEGER NOT NULL, end_sample INTEGER NOT NULL,
    source TEXT NOT NULL, created REAL NOT NULL, payload BLOB NOT NULL,
    acknowledged INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, device, batch));
"""
# push_devices contains the devices of each push's current run whose push has not
# ended, in the order of push.devices, with the worker that claimed the run.
# State files of earlier dslo-edge versions lack it and get it empty, so their
# last runs count as finished.
# push_batches contains each charged update of a device whose push started and
# has not ended, with its exact payload, so a resumed run publishes it again
# unchanged. push_devices.batches_stored marks a device whose push stores them:
# a started device without it was started by an earlier dslo-edge version.
# Columns that state files of earlier dslo-edge versions lack, per table. The
# requests columns are added with NULL values, which mark an unknown charge.
ADDED_COLUMNS = {
    "requests": (("charge_multiplier", "REAL"), ("charge_count", "INTEGER")),
    "push_devices": (("batches_stored", "INTEGER NOT NULL DEFAULT 0"),),
}

# Admission.kind values.
ADMITTED = "admitted"
CACHED = "cached"
IN_PROGRESS = "in_progress"
RATE_LIMITED = "rate_limited"
BUDGET_EXHAUSTED = "budget_exhausted"


def _enable_wal(db: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    # Switching to WAL does not wait on SQLite's busy timeout: when two
    # workers open a new file at once, one gets "database is locked".
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Add the ADDED_COLUMNS that a state file of an older release lacks."""
    for table, columns in ADDED_COLUMNS.items():
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns:
            if name in present:
                continue
            try:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as error:
                # Another worker that opened the file at the same time added it.
                if "duplicate column" not in str(error):
                    raise


def _file_identity(path: Path) -> tuple[int, int] | None:
    """Return the device and inode numbers of a file, or None when it is missing."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


@dataclass(frozen=True)
class RequestKey:
    """One request of one device, with its sample count."""

    device: str
    request_id: bytes
    samples: int


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


class HubState:
    """The shared SQLite state; one instance per worker process.

    Args:
        path: the database file, created when missing.
        worker_id: this worker, recorded with its claims.
    """

    def __init__(self, path: str | Path, worker_id: str):
        self.path = Path(path)
        self.worker_id = worker_id
        self._lock = threading.Lock()
        self._db = self._connect()
        self._identity = _file_identity(self.path)

    def _connect(self) -> sqlite3.Connection:
        """Open the database file, creating it and its directories when missing.

        Raises:
            ConfigError: the file cannot be opened or written, or it is not a
                hub state database.
        """
        try:
            self._create_directories()
            db = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.OperationalError) as error:
            raise ConfigError(
                f"cannot open hub.state_file {self.path}: {error}; set it to a "
                "file path in a directory this worker can write to"
            ) from error
        try:
            _enable_wal(db)
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            _add_missing_columns(db)
        except sqlite3.DatabaseError as error:
            db.close()
            # SQLite opens a file without write permission in read-only mode
            # and fails at the first write, here the switch to WAL. An earlier
            # run as another user can leave such a file.
            if "readonly" in str(error):
                raise ConfigError(
                    f"cannot write hub.state_file {self.path}: {error}; give "
                    "this worker's user write access to the file and its "
                    "directory, or set hub.state_file to another path"
                ) from error
            # OperationalError (locked, unreadable) is a DatabaseError too, but
            # it does not mean that the file is damaged.
            if isinstance(error, sqlite3.OperationalError):
                raise
            raise ConfigError(
                f"hub.state_file {self.path} is not a hub state database "
                f"({error}); move it aside, for example to {self.path}.corrupt, "
                "and start again to create a new one, which starts with empty "
                "rate limits, privacy budgets and stored responses"
            ) from error
        return db

    def _create_directories(self) -> None:
        """Create the missing directories of the state file's path."""
        missing = []
        for folder in (self.path.parent, *self.path.parent.parents):
            if folder.is_dir():
                break
            missing.append(folder)
        if not missing:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A mistyped path creates folders, so the log names every level.
        noun = "directory" if len(missing) == 1 else "directories"
        names = ", ".join(str(folder) for folder in reversed(missing))
        logger.info("Created the %s %s for hub.state_file", noun, names)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def reopen_if_moved(self) -> bool:
        """Reopen the state file if it was deleted or replaced; return True if so.

        SQLite goes on using a deleted file through its open descriptor, so
        without this check a worker would charge devices in a file that no
        other worker, and no restart, ever reads. A deleted file is first
        written back from this worker's open copy, so the rate limits,
        budgets and stored responses survive.

        Raises:
            ConfigError, OSError, sqlite3.Error: the file could not be written
                back or opened. The worker then keeps its open copy.
        """
        with self._lock:
            identity = _file_identity(self.path)
            if identity == self._identity:
                return False
            if identity is None:
                restored = self._restore()
                logger.error(
                    "hub.state_file %s was deleted while worker %s ran; %s",
                    self.path,
                    self.worker_id,
                    "wrote its rate limits, privacy budgets and stored responses "
                    "back from this worker's open copy"
                    if restored
                    else "another worker wrote it back first, so this worker uses it",
                )
            else:
                logger.error(
                    "hub.state_file %s was replaced while worker %s ran, by another "
                    "worker that wrote a deleted file back or by another file; this "
                    "worker now uses the file at that path and its rate limits, "
                    "privacy budgets and stored responses",
                    self.path,
                    self.worker_id,
                )
            db = self._connect()
            self._db.close()
            self._db = db
            self._identity = _file_identity(self.path)
            return True

    def _restore(self) -> bool:
        """Write the open database to the missing path, unless another worker did first.

        Returns False when the path already names a file.
        """
        self._create_directories()
        temporary = self.path.with_name(f"{self.path.name}.{self.worker_id}.restore")
        temporary.unlink(missing_ok=True)
        target = sqlite3.connect(temporary)
        try:
            self._db.backup(target)
        finally:
            target.close()
        try:
            # A link never replaces a file that another worker restored first.
            os.link(temporary, self.path)
        except FileExistsError:
            return False
        finally:
            temporary.unlink()
        return True

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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
        if worker != self.worker_id and now - claimed < claim_timeout_s:
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
                f"{new_charge[0]:g} would spend epsilon {epsilon:.3g} of the budget "
                f"{privacy.epsilon_budget:g}"
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
                f"labelling {key.samples} more samples would spend epsilon "
                f"{epsilon:.3g} of the budget {privacy.epsilon_budget:g}"
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

    # Teachers and schedules

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

    def claim_run(
        self, name: str, now: float, every_s: float, devices: Sequence[str] = ()
    ) -> bool:
        """Return True, once per period across workers, when a push is due.

        A claimed run stores ``devices`` as not yet pushed, in place of what
        the push's previous run left. A run stored as due more than
        ``every_s`` ahead, because ``every_s`` was shortened since the last
        run, is moved to ``now + every_s``.
        """
        with self._transaction() as db:
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
    ) -> str:
        """Charge a push's batch to a device and store it, in one transaction.

        Without ``privacy`` the batch is only stored. Nothing is stored when
        the budget does not allow the batch.

        Returns:
            "" when charged and stored, else why the budget does not allow it.
        """
        samples = batch.end_sample - batch.first_sample
        with self._transaction() as db:
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

    def acknowledge_push_batch(self, name: str, device: str, batch: int) -> None:
        """Record that the broker acknowledged a stored batch of a push."""
        with self._transaction() as db:
            db.execute(
                "UPDATE push_batches SET acknowledged = 1 "
                "WHERE name = ? AND device = ? AND batch = ?",
                (name, device, batch),
            )

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
            db.executemany(
                "UPDATE push_batches SET acknowledged = 1 "
                "WHERE name = ? AND device = ? AND batch = ?",
                [(name, device, batch) for batch in batches],
            )

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
