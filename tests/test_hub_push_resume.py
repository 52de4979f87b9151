"""A push run that a killed worker left unfinished resumes on a later worker."""

from __future__ import annotations

import errno
import os
import queue
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.hub_state import HubState, UnfinishedRun
from dslo_edge.hub_worker_lock import WorkerLock
from dslo_edge.protocol import decode_update
from dslo_edge.signing import generate_key_file, load_key, verify
from tests.hub_fleet import start_worker
from tests.test_hub_service import device_updates, nightly_push_config

DEVICES = ("kitchen", "porch", "garage")


def write_resume_config(folder: Path, port: int, bundle: Path) -> Path:
    """Write a private, signed nightly push of 40 samples to the three DEVICES.

    porch's key file is a FIFO, so the worker blocks when it reads that key,
    after it pushed kitchen and before it publishes anything to porch.
    """
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    keys = folder / "keys"
    keys.mkdir(parents=True)
    generate_key_file(keys / "kitchen.key")
    generate_key_file(keys / "garage.key")
    os.mkfifo(keys / "porch.key")
    extra = {
        "hub": 'keys_dir = "keys"',
        "privacy": "noise_multiplier = 8.0\nepsilon_budget = 20.0",
    }
    config = nightly_push_config(folder, port, bundle, x, extra)
    devices = ", ".join(f'"{device}"' for device in DEVICES)
    config.write_text(
        config.read_text().replace('devices = ["kitchen"]', f"devices = [{devices}]")
    )
    return config


@contextmanager
def blocked_reader(fifo: Path, process: subprocess.Popen) -> Iterator[None]:
    """Wait until ``process`` opens ``fifo`` to read, and keep its read blocked.

    Opening a FIFO to write without blocking fails with ENXIO until a reader
    has it open. The writer stays open and writes nothing, so the read waits.
    """
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, "the worker exited before reading the key"
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as error:
            if error.errno != errno.ENXIO:
                raise
        assert time.monotonic() < deadline, "the worker never read porch's key"
        time.sleep(0.05)
    try:
        yield
    finally:
        os.close(writer)


def wait_for_log(log: Path, text: str, process: subprocess.Popen) -> str:
    """Wait until the worker's log contains ``text``; return the log."""
    deadline = time.monotonic() + 30
    while text not in (content := log.read_text()):
        assert process.poll() is None, f"the worker exited:\n{content}"
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{content}"
        time.sleep(0.1)
    return content


def stop(process: subprocess.Popen, sig: signal.Signals) -> None:
    process.send_signal(sig)
    process.wait(30)


def wait_for_updates(received: queue.Queue, count: int, timeout_s: float = 15) -> None:
    """Wait until the queue contains ``count`` updates, leaving them in it."""
    deadline = time.monotonic() + timeout_s
    while received.qsize() < count:
        assert time.monotonic() < deadline, f"{received.qsize()} of {count} updates"
        time.sleep(0.05)


def sample_counts(received: queue.Queue, keys: Path, device: str) -> list[int]:
    """Return the sample count of each signed update in the queue, emptying it."""
    key = load_key(keys / f"{device}.key")
    counts = []
    while not received.empty():
        body = verify(key, f"dslo/{device}/updates", received.get())
        counts.append(decode_update(body).sample_count)
    return counts


def kill_after_kitchen(
    config: Path,
    received: dict,
    log: Path,
    before_kill: Callable[[], None] | None = None,
) -> list[bytes]:
    """Start worker w1 and SIGKILL it once kitchen got its push.

    w1 is killed while it reads porch's key, a FIFO, so porch and garage
    got nothing. ``before_kill`` runs just before the kill. Replaces the
    FIFO with a real key and returns kitchen's updates.
    """
    fifo = config.parent / "keys" / "porch.key"
    first = start_worker(config, "w1", log)
    try:
        with blocked_reader(fifo, first):
            kitchen = [received["kitchen"].get(timeout=15) for _ in range(3)]
            if before_kill is not None:
                before_kill()
            stop(first, signal.SIGKILL)
    finally:
        if first.poll() is None:
            stop(first, signal.SIGKILL)
    fifo.unlink()
    generate_key_file(fifo)
    return kitchen


def test_killed_push_run_resumes_remaining_devices(
    mlp_pair, mosquitto, tmp_path
) -> None:
    folder = tmp_path / "hub"
    config = write_resume_config(folder, mosquitto.port, mlp_pair.bundle)
    subscribers = {device: device_updates(mosquitto.port, device) for device in DEVICES}
    received = {device: queue_ for device, (_, queue_) in subscribers.items()}
    keys = folder / "keys"
    logs = [tmp_path / f"worker-{start}.log" for start in range(3)]
    try:
        kitchen_first = kill_after_kitchen(config, received, logs[0])
        after_kill = {
            device: sample_counts(received[device], keys, device) for device in DEVICES
        }

        second = start_worker(config, "w1", logs[1])
        try:
            resumed_log = wait_for_log(logs[1], "Push nightly sent", second)
            for device in ("porch", "garage"):
                wait_for_updates(received[device], 3)
            # Time for an update the worker should not send to arrive.
            time.sleep(0.5)
        finally:
            stop(second, signal.SIGTERM)
        resumed = {
            device: sample_counts(received[device], keys, device) for device in DEVICES
        }

        third = start_worker(config, "w1", logs[2])
        try:
            wait_for_log(logs[2], "hub worker w1 connected to", third)
            # The scheduler looks for due runs every second.
            time.sleep(3.0)
        finally:
            stop(third, signal.SIGTERM)
        after_finish = {
            device: sample_counts(received[device], keys, device) for device in DEVICES
        }
    finally:
        for client, _ in subscribers.values():
            client.disconnect()
            client.loop_stop()

    assert len(kitchen_first) == 3
    assert after_kill == {"kitchen": [], "porch": [], "garage": []}
    assert "Push nightly resumes the run that was cut off: 2 of 3 devices" in (
        resumed_log
    )
    assert resumed == {"kitchen": [], "porch": [16, 16, 8], "garage": [16, 16, 8]}
    assert after_finish == {"kitchen": [], "porch": [], "garage": []}
    state = HubState(folder / "state.sqlite", "reader")
    try:
        releases = {device: state.releases(device) for device in DEVICES}
    finally:
        state.close()
    assert releases == {device: {8.0: 40} for device in DEVICES}


def test_other_worker_id_resumes_killed_run(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    config = write_resume_config(folder, mosquitto.port, mlp_pair.bundle)
    subscribers = {device: device_updates(mosquitto.port, device) for device in DEVICES}
    received = {device: queue_ for device, (_, queue_) in subscribers.items()}
    keys = folder / "keys"
    try:
        kill_after_kitchen(config, received, tmp_path / "w1.log")
        # w1 does not come back, as when its unit is disabled or renamed.
        log = tmp_path / "w2.log"
        second = start_worker(config, "w2", log)
        try:
            resumed_log = wait_for_log(log, "Push nightly sent", second)
            for device in ("porch", "garage"):
                wait_for_updates(received[device], 3)
            time.sleep(0.5)
        finally:
            stop(second, signal.SIGTERM)
        resumed = {
            device: sample_counts(received[device], keys, device) for device in DEVICES
        }
    finally:
        for client, _ in subscribers.values():
            client.disconnect()
            client.loop_stop()

    assert (
        "Push nightly takes over the unfinished run of worker w1, which is not "
        "running" in resumed_log
    )
    assert "Push nightly resumes the run that was cut off: 2 of 3 devices" in (
        resumed_log
    )
    assert resumed == {"kitchen": [], "porch": [16, 16, 8], "garage": [16, 16, 8]}
    state = HubState(folder / "state.sqlite", "reader")
    try:
        releases = {device: state.releases(device) for device in DEVICES}
    finally:
        state.close()
    assert releases == {device: {8.0: 40} for device in DEVICES}


def test_running_peer_takes_over_killed_run(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    config = write_resume_config(folder, mosquitto.port, mlp_pair.bundle)
    subscribers = {device: device_updates(mosquitto.port, device) for device in DEVICES}
    received = {device: queue_ for device, (_, queue_) in subscribers.items()}
    keys = folder / "keys"
    log = tmp_path / "w2.log"
    peers: list[subprocess.Popen] = []

    def start_peer() -> None:
        peers.append(start_worker(config, "w2", log))
        wait_for_log(log, "hub worker w2 connected to", peers[0])

    try:
        kill_after_kitchen(config, received, tmp_path / "w1.log", start_peer)
        try:
            for device in ("porch", "garage"):
                # The peer looks for runs of stopped worker ids every 10 s.
                wait_for_updates(received[device], 3, timeout_s=30)
            peer_log = wait_for_log(log, "Push nightly sent", peers[0])
            time.sleep(0.5)
        finally:
            for peer in peers:
                stop(peer, signal.SIGTERM)
        resumed = {
            device: sample_counts(received[device], keys, device) for device in DEVICES
        }
    finally:
        for client, _ in subscribers.values():
            client.disconnect()
            client.loop_stop()

    assert "Push nightly takes over the unfinished run of worker w1" in peer_log
    assert resumed == {"kitchen": [], "porch": [16, 16, 8], "garage": [16, 16, 8]}


def test_unfinished_run_lists_devices_left(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    state = HubState(path, "w1")
    assert state.claim_run("nightly", 0.0, 3600.0, DEVICES)
    state.start_device_push("nightly", "kitchen")
    state.end_device_push("nightly", "kitchen")
    state.start_device_push("nightly", "porch")
    state.close()

    restarted = HubState(path, "w1")
    # A running worker holds its id's lock, so other ids leave its run alone.
    lock = WorkerLock(path, "w1")
    other = HubState(path, "w2")
    try:
        assert other.take_unfinished_run("nightly", 10.0) is None
        first = restarted.take_unfinished_run("nightly", 10.0)
        second = restarted.take_unfinished_run("nightly", 10.0)
        restarted.end_run("nightly")
        after_end = restarted.take_unfinished_run("nightly", 10.0)
    finally:
        restarted.close()
        other.close()
        lock.release()

    assert first == UnfinishedRun(
        pending=("garage",), interrupted=(), partly_sent=("porch",)
    )
    assert second == first
    assert after_end is None


def test_device_started_by_older_version_interrupted(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    state = HubState(path, "w1")
    assert state.claim_run("nightly", 0.0, 3600.0, DEVICES)
    state.close()
    # An earlier dslo-edge version set started and stored no batches.
    old = sqlite3.connect(path)
    old.execute("UPDATE push_devices SET started = 1 WHERE device = 'porch'")
    old.commit()
    old.close()

    restarted = HubState(path, "w1")
    try:
        first = restarted.take_unfinished_run("nightly", 10.0)
        second = restarted.take_unfinished_run("nightly", 10.0)
    finally:
        restarted.close()

    assert first == UnfinishedRun(pending=("kitchen", "garage"), interrupted=("porch",))
    assert second == UnfinishedRun(pending=("kitchen", "garage"), interrupted=())


def test_stopped_worker_id_run_taken_over(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    killed = HubState(path, "w1")
    killed_lock = WorkerLock(path, "w1")
    assert killed.claim_run("nightly", 0.0, 3600.0, DEVICES)
    killed.start_device_push("nightly", "kitchen")
    killed.end_device_push("nightly", "kitchen")
    killed.start_device_push("nightly", "porch")
    killed.close()
    other = HubState(path, "w2")
    other_lock = WorkerLock(path, "w2")
    try:
        while_running = other.take_unfinished_run("nightly", 10.0)
        killed_lock.release()
        taken = other.take_unfinished_run("nightly", 10.0)
        # The run is w2's now, so w1 finds nothing when it starts again.
        restarted = HubState(path, "w1")
        try:
            for_restarted = restarted.take_unfinished_run("nightly", 10.0)
        finally:
            restarted.close()
        again = other.take_unfinished_run("nightly", 10.0)
    finally:
        other.close()
        other_lock.release()

    assert while_running is None
    assert taken == UnfinishedRun(
        pending=("garage",),
        interrupted=(),
        taken_from=("w1",),
        partly_sent=("porch",),
    )
    assert for_restarted is None
    assert again == UnfinishedRun(
        pending=("garage",), interrupted=(), partly_sent=("porch",)
    )


def test_unfinished_run_dropped_when_next_due(tmp_path) -> None:
    state = HubState(tmp_path / "state.sqlite", "w1")
    try:
        assert state.claim_run("nightly", 0.0, 3600.0, DEVICES)
        at_next_run = state.take_unfinished_run("nightly", 3600.0)
        assert state.claim_run("nightly", 3600.0, 3600.0, ("kitchen",))
        after_claim = state.take_unfinished_run("nightly", 3601.0)
    finally:
        state.close()

    assert at_next_run is None
    assert after_claim == UnfinishedRun(pending=("kitchen",), interrupted=())


def test_state_file_without_push_devices_loads(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    # The schedule table as dslo-edge wrote it before push_devices existed.
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE schedule (name TEXT PRIMARY KEY, next_due REAL NOT NULL)")
    old.execute("INSERT INTO schedule VALUES ('nightly', 3600.0)")
    old.commit()
    old.close()

    state = HubState(path, "w1")
    try:
        unfinished = state.take_unfinished_run("nightly", 10.0)
        claimed_early = state.claim_run("nightly", 10.0, 3600.0, DEVICES)
        claimed_due = state.claim_run("nightly", 3600.0, 3600.0, DEVICES)
        after_claim = state.take_unfinished_run("nightly", 3601.0)
    finally:
        state.close()

    assert unfinished is None
    assert claimed_early is False
    assert claimed_due is True
    assert after_claim == UnfinishedRun(pending=DEVICES, interrupted=())


def persistent_subscriber(port: int, topic: str) -> tuple[mqtt.Client, queue.Queue]:
    """Subscribe to ``topic`` in a session that outlives the connection.

    The broker keeps the subscription while the client is offline, and across
    a restart when it has persistence on, and queues QoS 1 messages for it.
    paho reconnects after the connection drops. Returns the client and a queue
    of the topics of the messages it receives.
    """
    received: queue.Queue = queue.Queue()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="resume-test-watcher",
        protocol=mqtt.MQTTv5,
    )
    client.on_message = lambda _c, _u, message: received.put(message.topic)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.reconnect_delay_set(min_delay=0.2, max_delay=1)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 600
    client.connect("127.0.0.1", port, clean_start=False, properties=properties)
    client.subscribe(topic, qos=1)
    client.loop_start()
    assert subscribed.wait(10), f"the broker did not confirm the subscription {topic}"
    return client, received


def test_resume_waits_for_broker(mlp_pair, broker_factory, tmp_path, caplog) -> None:
    # With persistence, the restarted broker keeps the subscriber's session, so
    # the resumed updates reach it whether the worker or the subscriber
    # reconnects first.
    broker = broker_factory("mosquitto", persistence=True)
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    config = nightly_push_config(tmp_path / "hub", broker.port, mlp_pair.bundle, x)
    config.write_text(
        config.read_text().replace(
            'devices = ["kitchen"]', 'devices = ["kitchen", "porch"]'
        )
    )
    loaded = load_hub_config(config, "w1")
    # A run of this worker id that reached kitchen and not porch.
    earlier = HubState(loaded.state_file, "w1")
    earlier.claim_run("nightly", time.time(), 3600.0, ("kitchen", "porch"))
    earlier.end_device_push("nightly", "kitchen")
    earlier.close()
    client, received = persistent_subscriber(broker.port, "dslo/+/updates")
    try:
        broker.stop()
        worker = HubWorker(loaded)
        assert worker.pushes is not None
        caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
        worker.start()
        try:
            time.sleep(2.5)
            runs_while_down = worker.pushes.counters()["runs"]
            broker.restart()
            topics = [received.get(timeout=15) for _ in range(3)]
            time.sleep(0.5)
        finally:
            worker.stop()
    finally:
        client.disconnect()
        client.loop_stop()

    assert runs_while_down == 0
    assert topics == ["dslo/porch/updates"] * 3
    assert received.empty()
    assert worker.pushes.counters()["runs"] == 1
    messages = [record.getMessage() for record in caplog.records]
    assert (
        "Push nightly resumes the run that was cut off: 1 of 2 devices remains (porch)"
    ) in messages
