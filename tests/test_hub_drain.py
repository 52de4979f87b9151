"""A hub worker that drains the session of a peer killed with SIGKILL."""

from __future__ import annotations

import logging
import signal
import time

from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from tests.hub_fleet import HubWatcher, start_worker, wait_online, write_hub_config


def drain_messages(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "dslo_edge.hub_drain"
    ]


def test_drain_skips_worker_status_messages(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    peer = start_worker(config, "w1", tmp_path / "w1.log")
    worker = HubWorker(load_hub_config(config, "w2"))
    watcher = HubWatcher(mosquitto.port)
    caplog.set_level(logging.INFO)
    try:
        worker.start()
        wait_online(watcher, ["w1", "w2"])
        # The peer's will sets its status to offline, and its own persistent
        # session, subscribed to every worker's status, queues that message.
        peer.send_signal(signal.SIGKILL)
        peer.wait(timeout=10)
        deadline = time.monotonic() + 30
        while not drain_messages(caplog) and time.monotonic() < deadline:
            time.sleep(0.1)
        counters = worker.counters
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait(timeout=10)
        worker.stop()
        watcher.close()

    ignored = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("Ignoring a request")
    ]
    assert drain_messages(caplog) == [
        "Hub worker w2 drained the session of w1: 0 requests received again"
    ]
    assert ignored == []
    assert counters["requests"] == 0
    assert counters["unanswerable"] == 0
