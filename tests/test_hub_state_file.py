"""A hub state file deleted or replaced while the workers run."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.hub_config import RateLimit, load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.hub_state import ADMITTED, HubState, RequestKey, StoredBatch
from dslo_edge.label_protocol import (
    LabelRequest,
    encode_request,
    request_properties,
)
from tests.hub_fleet import HubWatcher, wait_online, write_hub_config

RATE = RateLimit(requests_per_s=1.0, burst=5)


def delete_state_file(path: Path) -> None:
    """Delete the database and its WAL files, as an operator's rm would."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def stored_buckets(path: Path) -> dict[str, float]:
    """Read the token buckets of the file at ``path`` with a new connection."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT device, tokens FROM buckets").fetchall()
    finally:
        db.close()
    return {str(device): float(tokens) for device, tokens in rows}


def test_deleted_file_is_written_back(tmp_path, caplog) -> None:
    path = tmp_path / "state.sqlite"
    first = HubState(path, "w1")
    second = HubState(path, "w2")
    request = RequestKey("cam", b"a" * 16, 1)
    assert first.admit([request], 0.0, RATE, None, 30)[0].kind == ADMITTED
    delete_state_file(path)

    with caplog.at_level(logging.ERROR, logger="dslo_edge.hub_state"):
        assert first.reopen_if_moved()
        assert second.reopen_if_moved()
        assert not first.reopen_if_moved()

    assert stored_buckets(path) == {"cam": 4.0}
    # Both workers now charge the file at the path, so they share one bucket.
    second_request = RequestKey("cam", b"b" * 16, 1)
    assert second.admit([second_request], 0.0, RATE, None, 30)[0].kind == ADMITTED
    assert stored_buckets(path) == {"cam": 3.0}
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "was deleted while worker w1 ran" in messages[0]
    assert "back from this worker's open copy" in messages[0]
    assert "was replaced while worker w2 ran" in messages[1]


def test_replaced_file_is_used(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    state = HubState(path, "w1")
    state.admit([RequestKey("cam", b"a" * 16, 1)], 0.0, RATE, None, 30)
    delete_state_file(path)
    HubState(path, "w2").admit([RequestKey("door", b"a" * 16, 1)], 0.0, RATE, None, 30)

    assert state.reopen_if_moved()

    request = RequestKey("door", b"b" * 16, 1)
    assert state.admit([request], 0.0, RATE, None, 30)[0].kind == ADMITTED
    assert stored_buckets(path) == {"door": 3.0}


def test_file_renamed_over_is_read(tmp_path) -> None:
    # A rename leaves the old file's -wal journal at the path, unlike an rm.
    path = tmp_path / "state.sqlite"
    state = HubState(path, "w1")
    state.admit([RequestKey("cam", b"a" * 16, 1)], 0.0, RATE, None, 30)
    other = tmp_path / "other.sqlite"
    other_state = HubState(other, "w2")
    other_state.admit([RequestKey("door", b"a" * 16, 1)], 0.0, RATE, None, 30)
    other_state.close()
    other.rename(path)

    assert state.reopen_if_moved()

    request = RequestKey("door", b"b" * 16, 1)
    assert state.admit([request], 0.0, RATE, None, 30)[0].kind == ADMITTED
    assert stored_buckets(path) == {"door": 3.0}


def send_request(client: mqtt.Client, request_id: bytes) -> None:
    inputs = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    request = LabelRequest(request_id, time.time(), ["a", "b"], inputs)
    info = client.publish(
        "dslo/kitchen/requests",
        encode_request(request),
        qos=1,
        properties=request_properties("dslo/kitchen/labels", request_id),
    )
    info.wait_for_publish(timeout=10)


def wait_for_charge(path: Path, releases: int) -> int:
    """Wait until kitchen's released vectors in the file reach ``releases``."""
    deadline = time.monotonic() + 15
    count = 0
    while time.monotonic() < deadline:
        if path.is_file():
            db = sqlite3.connect(path)
            try:
                row = db.execute(
                    "SELECT count FROM releases WHERE device = 'kitchen'"
                ).fetchone()
            except sqlite3.OperationalError:
                row = None
            finally:
                db.close()
            count = int(row[0]) if row else 0
            if count >= releases:
                return count
        time.sleep(0.1)
    return count


def test_worker_writes_deleted_file_back(mlp_pair, mosquitto, tmp_path) -> None:
    extra = {"privacy": "noise_multiplier = 10.0\nepsilon_budget = 100.0"}
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle, extra)
    path = tmp_path / "hub" / "state.sqlite"
    worker = HubWorker(load_hub_config(config, "w1"))
    watcher = HubWatcher(mosquitto.port)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        worker.start()
        wait_online(watcher, ["w1"])
        send_request(client, b"a" * 16)
        before = wait_for_charge(path, 2)
        delete_state_file(path)
        restored = wait_for_charge(path, 2)
        send_request(client, b"b" * 16)
        after = wait_for_charge(path, 4)
    finally:
        worker.stop()
        watcher.close()
        client.disconnect()
        client.loop_stop()

    assert before == 2
    assert restored == 2
    assert after == 4


def test_full_state_file_raises_full_error(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    state = HubState(path, "w1")
    batch = StoredBatch(0, 0, 16, "teacher", 1.0, bytes(8192))
    try:
        # SQLite's page limit at the file's size fails the insert with
        # SQLITE_FULL, as on a full disk, and SQLite rolls the transaction back.
        (pages,) = state._db.execute("PRAGMA page_count").fetchone()
        state._db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            state.store_push_batch("nightly", "kitchen", batch, None)
        state._db.execute(f"PRAGMA max_page_count = {0xFFFFFFFE}")
        stored_after_failure = state.stored_push_batches("nightly", "kitchen")
        # The connection is still usable for the next transaction.
        state.store_push_batch("nightly", "kitchen", batch, None)
        stored = state.stored_push_batches("nightly", "kitchen")
    finally:
        state.close()

    assert stored_after_failure == []
    assert stored == [batch]


def test_failed_commit_leaves_no_open_transaction(tmp_path) -> None:
    state = HubState(tmp_path / "state.db", "w1")
    try:
        # A deferred foreign key fails at COMMIT, and SQLite then keeps the
        # transaction open.
        state._db.executescript(
            "PRAGMA foreign_keys = ON;"
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
            "CREATE TABLE child (parent INTEGER REFERENCES parent (id) "
            "DEFERRABLE INITIALLY DEFERRED);"
        )
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            with state._transaction() as db:
                db.execute("INSERT INTO child VALUES (7)")

        assert not state._db.in_transaction
        (children,) = state._db.execute("SELECT COUNT(*) FROM child").fetchone()
        assert children == 0
        # The next write of the state file commits.
        state.admit([RequestKey("door", b"a" * 16, 1)], 0.0, RATE, None, 30)
    finally:
        state.close()
