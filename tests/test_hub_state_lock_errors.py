"""Label requests while another process locks the hub's state file."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.label_protocol import (
    LabelRequest,
    encode_request,
    request_properties,
    user_properties,
)
from tests.hub_fleet import HubWatcher, subscribed_client, wait_online, write_hub_config


def send_request(client, request_id: bytes) -> None:
    inputs = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    payload = encode_request(LabelRequest(request_id, time.time(), ["a", "b"], inputs))
    client.publish(
        "dslo/cam/requests",
        payload,
        qos=1,
        properties=request_properties("dslo/cam/labels", request_id),
    )


def lock_state_file(path) -> subprocess.Popen:
    """Start a process that holds an exclusive lock on the SQLite file."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_locked_file_requests_acknowledged(
    mlp_pair, mosquitto, tmp_path, caplog, monkeypatch
) -> None:
    # Two requests in flight fill the worker's Receive Maximum, so the
    # broker sends a third only after the worker acknowledged one of them.
    monkeypatch.setattr("dslo_edge.hub_service.RECEIVE_MAXIMUM", 2)
    monkeypatch.setattr("dslo_edge.hub_state_file.BUSY_TIMEOUT_S", 0.2)
    config = write_hub_config(
        tmp_path / "hub",
        mosquitto.port,
        mlp_pair.bundle,
        {"requests": "batch_wait_s = 0.5"},
    )
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(
        mosquitto.port,
        "dslo/cam/labels",
        lambda message: (
            bytes(message.properties.CorrelationData),
            user_properties(message.properties)["status"],
        ),
    )
    caplog.set_level("ERROR", logger="dslo_edge.hub_service")
    watcher = HubWatcher(mosquitto.port)
    holder = None
    try:
        worker.start()
        wait_online(watcher, ["w1"])
        holder = lock_state_file(tmp_path / "hub" / "state.sqlite")
        send_request(client, b"a" * 16)
        send_request(client, b"b" * 16)
        time.sleep(1.5)
        holder.kill()
        holder.wait()
        holder = None

        send_request(client, b"c" * 16)
        reply = received.get(timeout=10)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        worker.stop()
        watcher.close()
        client.disconnect()
        client.loop_stop()
    assert reply == (b"c" * 16, "ok")
    errors = [record.getMessage() for record in caplog.records]
    assert len(errors) == 1
    # The two requests may arrive in one batch or two, and a second line with
    # the same error is only counted.
    assert errors[0].startswith("Hub worker w1 did not serve ")
    assert "(database is locked); the devices resend them" in errors[0]
    assert all(record.exc_info is None for record in caplog.records)
