"""The hub state's SQLite file, which the parts of ``HubState`` share.

It contains the schema, the columns added to files of older dslo-edge versions,
the WAL journal setup, the transactions that every check-and-charge runs in,
and the recovery of a state file deleted or replaced while a worker runs.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from dslo_edge.errors import ConfigError

# The logger of hub_state, where this code was before, so that log lines and
# logging filters keep its name.
logger = logging.getLogger("dslo_edge.hub_state")

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

# How long a worker waits for another process's lock on the state file, in
# seconds, before the statement fails with "database is locked".
BUSY_TIMEOUT_S = 30.0

# The schema version that this dslo-edge writes to PRAGMA user_version. State
# files of versions that wrote none read 0 and are brought up to it. A worker
# rejects a file of a higher version, whose tables it may write wrongly.
SCHEMA_VERSION = 1

# Columns that state files of earlier dslo-edge versions lack, per table. The
# requests columns are added with NULL values, which mark an unknown charge.
ADDED_COLUMNS = {
    "requests": (("charge_multiplier", "REAL"), ("charge_count", "INTEGER")),
    "push_devices": (("batches_stored", "INTEGER NOT NULL DEFAULT 0"),),
}


def _enable_wal(db: sqlite3.Connection, timeout_s: float) -> None:
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


def check_schema_version(db: sqlite3.Connection, path: Path) -> None:
    """Reject a state file written by a newer dslo-edge, before anything is written."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"hub.state_file {path} has schema version {version}, written by a "
            f"newer dslo-edge; this version reads up to {SCHEMA_VERSION}. "
            "Upgrade dslo-edge on this machine to the version of the other "
            "workers, or set hub.state_file to another path"
        )


def _expected_columns() -> dict[str, list[str]]:
    """Return the column names of each table in SCHEMA."""
    with closing(sqlite3.connect(":memory:")) as db:
        db.executescript(SCHEMA)
        tables = [
            row[0]
            for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return {
            table: [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
            for table in tables
        }


def _check_columns(db: sqlite3.Connection, path: Path) -> None:
    """Reject a database whose tables of the hub's names lack the hub's columns.

    ``CREATE TABLE IF NOT EXISTS`` keeps a table of another schema, so without
    this check such a file fails only at the first write of that table. It
    runs before anything is written, so a rejected file stays unchanged.
    """
    expected = _expected_columns()
    _check_foreign_tables(db, path, set(expected))
    for table, columns in expected.items():
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if not present:
            continue
        added = {name for name, _ in ADDED_COLUMNS.get(table, ())}
        missing = [name for name in columns if name not in present | added]
        if missing:
            raise ConfigError(
                f"hub.state_file {path} is not a hub state database (table "
                f"{table} lacks the columns {', '.join(missing)}); move it "
                f"aside, for example to {path}.corrupt, and start again to "
                "create a new one, which starts with empty rate limits, privacy "
                "budgets and stored responses"
            )


def _check_foreign_tables(
    db: sqlite3.Connection, path: Path, hub_tables: set[str]
) -> None:
    """Reject a database with tables but none of the hub's, as another program's."""
    rows = db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' "
        "AND name NOT LIKE 'sqlite_%' ORDER BY name"
    )
    tables = [str(row[0]) for row in rows]
    if not tables or hub_tables.intersection(tables):
        return
    raise ConfigError(
        f"hub.state_file {path} is not a hub state database (it has the tables "
        f"{', '.join(tables)} and none of the hub's, so another program may "
        "use it); set hub.state_file to another path"
    )


def _file_identity(path: Path) -> tuple[int, int] | None:
    """Return the device and inode numbers of a file, or None when it is missing."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


class StateFile:
    """The connection to the state file, and its transactions."""

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
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.OperationalError) as error:
            raise ConfigError(
                f"cannot open hub.state_file {self.path}: {error}; set it to a "
                "file path in a directory this worker can write to"
            ) from error
        try:
            check_schema_version(db, self.path)
            _check_columns(db, self.path)
            _enable_wal(db, BUSY_TIMEOUT_S)
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            _add_missing_columns(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except ConfigError:
            db.close()
            raise
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
            self._empty_journal()
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

    def _empty_journal(self) -> None:
        """Move the WAL journal into the open file and truncate it to 0 bytes.

        SQLite finds the journal by the path, ``<state_file>-wal``, so a file
        opened at the path would read this file's journal as its own, and a
        replacement file would show the old file's pages in place of its own.

        Raises:
            sqlite3.OperationalError: another connection kept the journal in
                use for longer than the busy timeout.
        """
        busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise sqlite3.OperationalError(
                f"cannot empty the WAL journal {self.path}-wal of the previous "
                "file: another connection kept it in use"
            )

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
                # A failed COMMIT leaves the transaction open, and every later
                # BEGIN would then fail, so it is rolled back below too.
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite rolls a transaction back by itself after some errors,
                # such as SQLITE_FULL, and a second ROLLBACK would raise
                # "no transaction is active" in place of the error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
