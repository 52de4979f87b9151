"""Hub worker threads that meet an SQLite error in the state file."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

from dslo_edge.bundle import load_bundle
from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.hub_state import SCHEMA
from dslo_edge.label_protocol import (
    LabelRequest,
    encode_request,
    request_properties,
    user_properties,
)
from tests.hub_fleet import (
    HubWatcher,
    subscribed_client,
    wait_online,
    write_hub_config,
)


def run_sql(path: Path, script: str) -> None:
    db = sqlite3.connect(path)
    try:
        db.executescript(script)
    finally:
        db.close()


def wait_until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(predicate())


def test_push_claim_error_keeps_scheduler(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    folder = tmp_path / "hub"
    folder.mkdir()
    np.savez(folder / "data.npz", x=np.zeros((4, 64), dtype=np.float32))
    config = write_hub_config(folder, mosquitto.port, mlp_pair.bundle)
    push = (
        '\n[[push]]\nname = "nightly"\ndevices = ["kitchen"]\ndata = "data.npz"\n'
        "every_s = 1.0\n"
    )
    config.write_text(config.read_text() + push)
    worker = HubWorker(load_hub_config(config, "w1"))
    watcher = HubWatcher(mosquitto.port)
    # Without the device's subscription, the broker would drop the updates and
    # each run would log that as an error.
    kitchen, _received = subscribed_client(
        mosquitto.port, "dslo/kitchen/updates", lambda message: message.payload
    )
    caplog.set_level(logging.ERROR, logger="dslo_edge.hub_pushes")
    try:
        worker.start()
        wait_online(watcher, ["w1"])
        assert worker.pushes is not None
        assert wait_until(lambda: worker.pushes.runs >= 1)
        run_sql(folder / "state.sqlite", "DROP TABLE schedule")
        failed = wait_until(lambda: len(caplog.records) >= 1)
        time.sleep(2.5)
        runs_while_broken = worker.pushes.runs
        run_sql(folder / "state.sqlite", SCHEMA)
        recovered = wait_until(lambda: worker.pushes.runs > runs_while_broken)
        alive = worker.pushes.is_alive()
    finally:
        worker.stop()
        watcher.close()
        kitchen.disconnect()
        kitchen.loop_stop()

    messages = [record.getMessage() for record in caplog.records]
    assert failed
    assert recovered
    assert alive
    # The same error on every check is logged once.
    assert len(messages) == 1
    assert messages[0].startswith("Push nightly cannot be claimed in hub.state_file")
    assert "no such table: schedule" in messages[0]


def test_teacher_round_error_keeps_batcher(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    teacher = tmp_path / "teacher.tflite"
    shutil.copy(load_bundle(mlp_pair.bundle).teacher_path, teacher)
    extra = {"teacher": 'output_kind = "probabilities"'}
    config = write_hub_config(tmp_path / "hub", mosquitto.port, teacher, extra)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/kitchen/labels")
    watcher = HubWatcher(mosquitto.port)
    caplog.set_level(logging.ERROR, logger="dslo_edge.hub_service")
    try:
        worker.start()
        wait_online(watcher, ["w1"])
        # A new teacher needs a round from the state file, which now fails.
        run_sql(tmp_path / "hub" / "state.sqlite", "DROP TABLE teachers")
        teacher.write_bytes(teacher.read_bytes() + b"\0" * 16)
        worker.request_reload()
        failed = wait_until(lambda: len(caplog.records) >= 1)
        inputs = np.random.default_rng(0).random((2, 64), dtype=np.float32)
        request = LabelRequest(b"q" * 16, time.time(), ["a", "b"], inputs)
        client.publish(
            "dslo/kitchen/requests",
            encode_request(request),
            qos=1,
            properties=request_properties("dslo/kitchen/labels", b"q" * 16),
        )
        reply = received.get(timeout=10)
        alive = worker._batcher.is_alive()
        first_version = worker.teacher.current.version
        # Once the state file works again, a later poll loads the new teacher.
        run_sql(
            tmp_path / "hub" / "state.sqlite",
            "CREATE TABLE teachers (identity TEXT PRIMARY KEY, "
            "round INTEGER NOT NULL, version TEXT NOT NULL)",
        )
        reloaded = wait_until(lambda: worker.teacher.current.version != first_version)
        new_round = worker.teacher.current.round
    finally:
        worker.stop()
        watcher.close()
        client.disconnect()
        client.loop_stop()

    assert failed
    assert alive
    assert user_properties(reply.properties)["status"] == "ok"
    assert reloaded
    assert new_round == 1
    message = caplog.records[0].getMessage()
    assert message.startswith("Hub worker w1 failed a teacher check")
