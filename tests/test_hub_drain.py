"""A hub worker that drains the session of a peer killed with SIGKILL."""

from __future__ import annotations

import logging
import signal
import time

import paho.mqtt.client as mqtt

from dslo_edge.broker import Broker
from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_drain import DRAIN_ATTEMPTS, grace_period
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


def peer_drain_lines(caplog, peer: str) -> list[str]:
    """Return the log lines of drains that connected as or ended ``peer``."""
    return [
        message
        for message in drain_messages(caplog) + connection_messages(caplog)
        if f"drained the session of {peer}" in message
        or f"draining {peer} connected" in message
    ]


def connection_messages(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "dslo_edge.connection"
    ]


def test_broker_restart_keeps_live_peer_connected(
    mlp_pair, broker_factory, tmp_path, caplog
) -> None:
    broker = broker_factory("mosquitto", persistence=True)
    # w1 is back within 1 s of the broker and receives r1's retained offline
    # will, and r1 retries only 2 to 4 s after the broker dropped it.
    fast = {"mqtt": "reconnect_min_s = 0.2\nreconnect_max_s = 1.0"}
    slow = {"mqtt": "reconnect_min_s = 4.0\nreconnect_max_s = 4.0"}
    w1_config = write_hub_config(tmp_path / "w1", broker.port, mlp_pair.bundle, fast)
    r1_config = write_hub_config(tmp_path / "r1", broker.port, mlp_pair.bundle, slow)
    caplog.set_level(logging.INFO)
    w1 = HubWorker(load_hub_config(w1_config, "w1"))
    r1 = HubWorker(load_hub_config(r1_config, "r1"))
    watcher = None
    try:
        w1.start()
        r1.start()
        watcher = HubWatcher(broker.port)
        wait_online(watcher, ["w1", "r1"])
        watcher.close()
        watcher = None
        broker.restart()
        watcher = HubWatcher(broker.port)
        wait_online(watcher, ["w1", "r1"])
        time.sleep(grace_period(r1.config.mqtt) + 2.0)
        r1_connects = r1.connection.connects
        r1_status = watcher.status.get("r1")
    finally:
        if watcher is not None:
            watcher.close()
        w1.stop()
        r1.stop()

    r1_connected = [
        message
        for message in connection_messages(caplog)
        if message.startswith("hub worker r1 connected")
    ]
    assert peer_drain_lines(caplog, "r1") == []
    assert r1_connects == 2
    assert r1_connected[-1].endswith("(session resumed)")
    assert r1_status == "online"


def test_drain_skips_peer_of_other_group(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    other_group = {"hub": 'group = "rgroup"'}
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    r_config = write_hub_config(
        tmp_path / "r", mosquitto.port, mlp_pair.bundle, other_group
    )
    w2 = start_worker(config, "w2", tmp_path / "w2.log")
    r1 = start_worker(r_config, "r1", tmp_path / "r1.log")
    worker = HubWorker(load_hub_config(config, "w1"))
    watcher = HubWatcher(mosquitto.port)
    caplog.set_level(logging.INFO)
    try:
        worker.start()
        wait_online(watcher, ["w1", "w2", "r1"])
        for peer in (w2, r1):
            peer.send_signal(signal.SIGKILL)
            peer.wait(timeout=10)
        # The drain of w2 sets its status to stopped; r1 keeps its will.
        watcher.wait_for(lambda w: w.status.get("w2") == "stopped", timeout=60)
        time.sleep(1.0)
        r1_status = watcher.status.get("r1")
    finally:
        for peer in (w2, r1):
            if peer.poll() is None:
                peer.kill()
                peer.wait(timeout=10)
        worker.stop()
        watcher.close()

    skipped = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("Hub worker w1 does not drain r1")
    ]
    assert drain_messages(caplog) == [
        "Hub worker w1 drained the session of w2: 0 requests received again"
    ]
    assert peer_drain_lines(caplog, "r1") == []
    assert r1_status == "offline"
    assert skipped == [
        "Hub worker w1 does not drain r1, which is offline: it served group "
        "rgroup, and this worker serves group dslo-hub"
    ]


def test_drain_retries_refused_connect_then_gives_up(
    mlp_pair, tmp_path, caplog
) -> None:
    # Three connections fill the listener: w1, the watcher, and w2 or, once
    # w2 is dead, the filler. mosquitto 2.0.11 accepts max_connections + 1
    # clients (checked by hand), so the setting is 2.
    text = "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections 2\n"
    broker = Broker.start(kind="mosquitto", workdir=tmp_path / "b", config_text=text)
    timing = {"mqtt": "reconnect_min_s = 0.5\nreconnect_max_s = 1.0"}
    config = write_hub_config(tmp_path / "hub", broker.port, mlp_pair.bundle, timing)
    w2 = start_worker(config, "w2", tmp_path / "w2.log")
    worker = HubWorker(load_hub_config(config, "w1"))
    caplog.set_level(logging.INFO)
    filler = None
    watcher = None
    try:
        worker.start()
        watcher = HubWatcher(broker.port)
        wait_online(watcher, ["w1", "w2"])
        w2.send_signal(signal.SIGKILL)
        w2.wait(timeout=10)
        filler = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        filler.connect("127.0.0.1", broker.port)
        filler.loop_start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            "gives up" in message for message in drain_messages(caplog)
        ):
            time.sleep(0.1)
        failed = [record for record in caplog.records if record.name.endswith("drain")]

        # The next offline status after a reconnect starts a new drain.
        filler.disconnect()
        filler.loop_stop()
        filler = None
        worker.connection.request_reconnect()
        while time.monotonic() < deadline and not any(
            "drained the session" in message for message in drain_messages(caplog)
        ):
            time.sleep(0.1)
    finally:
        if filler is not None:
            filler.disconnect()
            filler.loop_stop()
        if watcher is not None:
            watcher.close()
        if w2.poll() is None:
            w2.kill()
            w2.wait(timeout=10)
        worker.stop()
        broker.stop()

    retries = [r.getMessage() for r in failed if "could not connect" in r.getMessage()]
    gave_up = [r.getMessage() for r in failed if "gives up" in r.getMessage()]
    assert [record.exc_info for record in failed] == [None] * len(failed)
    assert len(retries) == DRAIN_ATTEMPTS - 1
    assert retries[0].startswith(
        "Hub worker w1 could not connect as dslo-hub-w2 to drain the session of "
        f"w2 (attempt 1 of {DRAIN_ATTEMPTS}): "
    )
    assert len(gave_up) == 1
    assert gave_up[0].startswith(
        "Hub worker w1 gives up draining the session of w2 after "
        f"{DRAIN_ATTEMPTS} failed connects as dslo-hub-w2: "
    )
    assert drain_messages(caplog)[-1] == (
        "Hub worker w1 drained the session of w2: 0 requests received again"
    )
