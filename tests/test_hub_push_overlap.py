"""A run of a push that outlasts its every_s delays the next run.

The stored batches of a push carry no run id. A second run at the same time
would find the first run's stored batches and publish them again as its own.
A refund by the first run could then take back the charge of an update that
the second run delivered.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.hub_state import HubState, UnfinishedRun
from dslo_edge.hub_worker_lock import WorkerLock
from tests.mqtt_proxy import PubackProxy
from tests.test_hub_push_batches import (
    DEVICES,
    drain_updates,
    stored_rows,
    write_config,
)
from tests.test_hub_service import device_updates

EVERY_S = 1.0


def wait_for_rows(path: Path, device: str, expected: list) -> None:
    deadline = time.monotonic() + 30
    while (rows := stored_rows(path, device)) != expected:
        assert time.monotonic() < deadline, f"stored batches of {device}: {rows}"
        time.sleep(0.05)


def connected_worker(config: Path, worker_id: str, port: int) -> HubWorker:
    """Build a worker and connect its client, without its scheduler thread."""
    worker = HubWorker(load_hub_config(config, worker_id))
    client = worker.connection.client
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected():
        assert time.monotonic() < deadline, f"worker {worker_id} did not connect"
        time.sleep(0.05)
    return worker


def close_worker(worker: HubWorker) -> None:
    worker.connection.client.disconnect()
    worker.connection.client.loop_stop()
    worker.state.close()
    worker._lock.release()


def test_push_not_claimed_during_peer_run(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    folder = tmp_path / "hub"
    # w1 gets no PUBACK for kitchen's updates until the test releases them.
    proxy = PubackProxy(mosquitto.port, "dslo/kitchen/updates", 0)
    config = write_config(folder, proxy.port, mlp_pair.bundle)
    config.write_text(config.read_text().replace("every_s = 3600", "every_s = 1"))
    second_config = folder / "hub-w2.toml"
    second_config.write_text(
        config.read_text().replace(f"port = {proxy.port}", f"port = {mosquitto.port}")
    )
    state_file = folder / "state.sqlite"
    subscribers = {device: device_updates(mosquitto.port, device) for device in DEVICES}
    caplog.set_level(logging.INFO, logger="dslo_edge.hub_pushes")
    first = connected_worker(config, "w1", proxy.port)
    second = connected_worker(second_config, "w2", mosquitto.port)
    assert first.pushes is not None
    assert second.pushes is not None
    [schedule] = first.config.pushes
    try:
        assert first.pushes._claim(schedule)
        claimed_at = time.monotonic()
        first_run = threading.Thread(
            target=first.pushes._run, args=(schedule, schedule.devices)
        )
        first_run.start()
        wait_for_rows(state_file, "kitchen", [(0, 0), (1, 0), (2, 0)])
        time.sleep(max(0.0, claimed_at + EVERY_S + 0.1 - time.monotonic()))
        # The next run is due, and w1's run is still waiting for kitchen.
        claimed_during_run = second.pushes._claim(schedule)

        proxy.release_held()
        first_run.join(40)
        assert not first_run.is_alive()
        claimed_after_run = second.pushes._claim(schedule)
        if claimed_after_run:
            second.pushes._run(schedule, schedule.devices)
        time.sleep(0.5)
    finally:
        close_worker(first)
        close_worker(second)
        proxy.close()
        for client, _ in subscribers.values():
            client.disconnect()
            client.loop_stop()

    keys = folder / "keys"
    received = {
        device: drain_updates(queue_, keys, device)
        for device, (_, queue_) in subscribers.items()
    }
    state = HubState(state_file, "reader")
    try:
        releases = {device: state.releases(device) for device in DEVICES}
    finally:
        state.close()
    messages = [record.getMessage() for record in caplog.records]

    assert claimed_during_run is False
    assert claimed_after_run is True
    for device in DEVICES:
        counts = [count for _, count, _ in received[device]]
        assert counts == [16, 16, 8, 16, 16, 8], device
        # Each run labelled its own updates, with new message ids.
        assert len({message_id for message_id, _, _ in received[device]}) == 6
    assert releases == {device: {8.0: 80} for device in DEVICES}
    assert first.pushes.counters()["republished_updates"] == 0
    assert second.pushes.counters()["republished_updates"] == 0
    assert [m for m in messages if "failed" in m or "resumes" in m] == []
    [overrun] = [m for m in messages if "longer than its every_s" in m]
    assert overrun.startswith("Push nightly took ")
    assert overrun.endswith(
        "longer than its every_s of 1 s; no worker starts the next run of a "
        "push before the run in progress ends"
    )


def test_claim_waits_for_running_peer(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    running = HubState(path, "w1")
    running_lock = WorkerLock(path, "w1")
    other = HubState(path, "w2")
    try:
        assert running.claim_run("nightly", 0.0, 60.0, DEVICES)
        running.start_device_push("nightly", "kitchen")
        while_running = other.claim_run("nightly", 60.0, 60.0, DEVICES)
        running.end_run("nightly")
        after_end = other.claim_run("nightly", 61.0, 60.0, DEVICES)
        assert after_end
        other.start_device_push("nightly", "kitchen")
        # w2 was stopped part way through its run, so its devices left are
        # no longer in progress.
        after_stop = running.claim_run("nightly", 121.0, 60.0, ("kitchen",))
        # The devices left by this worker id's own earlier run never wait.
        own_left = running.claim_run("nightly", 181.0, 60.0, DEVICES)
        unfinished = running.take_unfinished_run("nightly", 200.0)
    finally:
        running.close()
        running_lock.release()
        other.close()

    assert while_running is False
    assert after_stop is True
    assert own_left is True
    assert unfinished == UnfinishedRun(pending=DEVICES, interrupted=())
