"""A hub worker that drains the session of a peer killed with SIGKILL."""

from __future__ import annotations

import json
import logging
import math
import queue
import signal
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.broker import Broker
from dslo_edge.config import MqttSettings
from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_drain import (
    DRAIN_ATTEMPTS,
    DRAIN_IDLE_S,
    grace_period,
    peer_reconnect_max_s,
)
from dslo_edge.hub_service import HubWorker
from dslo_edge.hub_state import ADMITTED, HubState, RequestKey
from dslo_edge.label_protocol import (
    LabelRequest,
    encode_request,
    request_properties,
    user_properties,
    worker_status_topic,
)
from tests.hub_fleet import (
    HubWatcher,
    start_worker,
    subscribed_client,
    wait_online,
    write_hub_config,
)
from tests.mqtt_proxy import DelayProxy

OWN_SETTINGS = MqttSettings(reconnect_max_s=30.0)


@pytest.mark.parametrize(
    ("peer_value", "expected_grace"),
    [(50.0, 55.0), (10, 35.0), (30.0, 35.0), (0, 35.0), (1e9, 3605.0)],
)
def test_grace_uses_larger_reconnect_max(peer_value, expected_grace) -> None:
    status = {"state": "offline", "reconnect_max_s": peer_value}
    peer_max_s, _problem = peer_reconnect_max_s(status)

    assert grace_period(OWN_SETTINGS, peer_max_s) == expected_grace


def test_grace_without_peer_value_uses_own() -> None:
    peer_max_s, problem = peer_reconnect_max_s({"state": "offline"})

    assert peer_max_s is None
    assert problem == ""
    assert grace_period(OWN_SETTINGS, peer_max_s) == 35.0
    assert grace_period(OWN_SETTINGS) == 35.0


@pytest.mark.parametrize(
    ("value", "expected_problem"),
    [
        (-1, "reconnect_max_s = -1 is not a finite number >= 0"),
        (-0.5, "reconnect_max_s = -0.5 is not a finite number >= 0"),
        (math.nan, "reconnect_max_s = nan is not a finite number >= 0"),
        (math.inf, "reconnect_max_s = inf is not a finite number >= 0"),
        ("40", "reconnect_max_s = '40' is not a number"),
        (True, "reconnect_max_s = True is not a number"),
        (None, "reconnect_max_s = None is not a number"),
        ([40], "reconnect_max_s = [40] is not a number"),
    ],
)
def test_peer_reconnect_max_rejects_bad_value(value, expected_problem) -> None:
    peer_max_s, problem = peer_reconnect_max_s({"reconnect_max_s": value})

    assert peer_max_s is None
    assert problem == expected_problem
    assert grace_period(OWN_SETTINGS, peer_max_s) == 35.0


def test_peer_reconnect_max_caps_large_value() -> None:
    peer_max_s, problem = peer_reconnect_max_s({"reconnect_max_s": 1e9})

    assert peer_max_s == 3600.0
    assert problem == (
        "reconnect_max_s = 1000000000.0 is above the maximum 3600, so it is "
        "capped there"
    )


def test_peer_reconnect_max_caps_huge_integer() -> None:
    # Beyond the float range, where math.isfinite raises OverflowError.
    peer_max_s, problem = peer_reconnect_max_s({"reconnect_max_s": 10**400})

    assert peer_max_s == 3600.0
    assert problem.endswith("is above the maximum 3600, so it is capped there")


def test_peer_reconnect_max_accepts_valid_values() -> None:
    for value, expected in [(0, 0.0), (2, 2.0), (16.5, 16.5), (3600, 3600.0)]:
        peer_max_s, problem = peer_reconnect_max_s({"reconnect_max_s": value})
        assert peer_max_s == expected
        assert isinstance(peer_max_s, float)
        assert problem == ""


def test_peer_reconnect_max_reads_json_nan() -> None:
    # Python's json module writes and reads NaN, although JSON has no NaN.
    status = json.loads('{"state": "offline", "reconnect_max_s": NaN}')
    peer_max_s, problem = peer_reconnect_max_s(status)

    assert peer_max_s is None
    assert problem == "reconnect_max_s = nan is not a finite number >= 0"


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


def restart_broker_beside_peer(
    mlp_pair, broker_factory, tmp_path, caplog, peer_retry_s: float, after_s: float
) -> tuple[int, str | None]:
    """Restart the broker under w1 and r1, which retries every ``peer_retry_s``.

    w1 is back within 1 s of the broker and receives r1's retained offline
    will. Returns r1's connect count and status ``after_s`` after both are
    online again.
    """
    broker = broker_factory("mosquitto", persistence=True)
    fast = {"mqtt": "reconnect_min_s = 0.2\nreconnect_max_s = 1.0"}
    slow = {
        "mqtt": f"reconnect_min_s = {peer_retry_s}\nreconnect_max_s = {peer_retry_s}"
    }
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
        watcher.wait_for(lambda w: w.status.get("r1") == "offline", timeout=10)
        wait_online(watcher, ["w1", "r1"])
        time.sleep(after_s)
        return r1.connection.connects, watcher.status.get("r1")
    finally:
        if watcher is not None:
            watcher.close()
        w1.stop()
        r1.stop()


def test_broker_restart_keeps_live_peer_connected(
    mlp_pair, broker_factory, tmp_path, caplog
) -> None:
    # r1 retries only 2 to 4 s after the broker dropped it, within w1's grace.
    after_s = grace_period(MqttSettings(reconnect_max_s=4.0)) + 2.0
    r1_connects, r1_status = restart_broker_beside_peer(
        mlp_pair, broker_factory, tmp_path, caplog, 4.0, after_s
    )

    r1_connected = [
        message
        for message in connection_messages(caplog)
        if message.startswith("hub worker r1 connected")
    ]
    assert peer_drain_lines(caplog, "r1") == []
    assert r1_connects == 2
    assert r1_connected[-1].endswith("(session resumed)")
    assert r1_status == "online"


def test_broker_restart_keeps_slower_peer_connected(
    mlp_pair, broker_factory, tmp_path, caplog
) -> None:
    # w1's own grace would be 1 + 5 = 6 s, but r1 retries only 8 to 16 s
    # after the broker dropped it, so w1 must wait r1's 16 + 5 = 21 s.
    r1_connects, r1_status = restart_broker_beside_peer(
        mlp_pair, broker_factory, tmp_path, caplog, 16.0, 1.0
    )

    grace_lines = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("Hub worker w1 drains the session of r1")
    ]
    # Under load, w1 can also read r1's offline status at start, before r1
    # publishes online, and plan a drain that r1's online status cancels.
    assert len(grace_lines) >= 1
    assert set(grace_lines) == {
        "Hub worker w1 drains the session of r1 if it stays offline for 21 s"
    }
    assert peer_drain_lines(caplog, "r1") == []
    assert r1_connects == 2
    assert r1_status == "online"


def wait_for_lines(caplog, prefix: str, count: int, timeout: float = 10.0) -> None:
    """Wait until ``count`` log lines start with ``prefix``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records]
        if sum(line.startswith(prefix) for line in lines) >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"fewer than {count} log lines start with {prefix!r}")


def test_status_reconnect_max_sent_and_checked(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    worker = HubWorker(load_hub_config(config, "w1"))
    topic = worker_status_topic("dslo", "x9")
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    reader, statuses = subscribed_client(
        mosquitto.port, worker_status_topic("dslo", "w1"), lambda m: m.payload
    )
    caplog.set_level(logging.INFO)

    def publish(state: str, value: object) -> None:
        status = {"state": state, "client_id": "dslo-hub-x9", "group": "dslo-hub"}
        payload = json.dumps({**status, "reconnect_max_s": value})
        publisher.publish(topic, payload, qos=1).wait_for_publish(timeout=5)

    started = "Hub worker w1 drains the session of x9"
    cancelled = "Hub worker w1 does not drain x9"
    try:
        worker.start()
        own_status = json.loads(statuses.get(timeout=10))
        # The same bad value twice, then another bad value.
        publish("offline", -1)
        wait_for_lines(caplog, started, 1)
        publish("online", -1)
        wait_for_lines(caplog, cancelled, 1)
        publish("offline", -1)
        wait_for_lines(caplog, started, 2)
        publish("online", -1)
        wait_for_lines(caplog, cancelled, 2)
        publish("offline", 1e9)
        wait_for_lines(caplog, started, 3)
    finally:
        worker.stop()
        for client in (publisher, reader):
            client.disconnect()
            client.loop_stop()

    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "invalid status" in record.getMessage()
    ]
    grace_lines = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith(started)
    ]
    assert own_status == {
        "state": "online",
        "client_id": "dslo-hub-w1",
        "group": "dslo-hub",
        "reconnect_max_s": 2.0,
    }
    assert warnings == [
        "Hub worker w1 received an invalid status from x9: reconnect_max_s = -1 "
        "is not a finite number >= 0. It uses its own reconnect_max_s for the "
        "grace period before a drain of x9; check the mqtt.reconnect_max_s of "
        "worker x9",
        "Hub worker w1 received an invalid status from x9: reconnect_max_s = "
        "1000000000.0 is above the maximum 3600, so it is capped there. It uses "
        "3600 s as reconnect_max_s for the grace period before a drain of x9; "
        "check the mqtt.reconnect_max_s of worker x9",
    ]
    assert grace_lines == [
        f"{started} if it stays offline for 7 s",
        f"{started} if it stays offline for 7 s",
        f"{started} if it stays offline for 3605 s",
    ]


def test_status_huge_number_keeps_worker_connected(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    worker = HubWorker(load_hub_config(config, "w1"))
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    reader, statuses = subscribed_client(
        mosquitto.port, worker_status_topic("dslo", "w1"), lambda m: m.payload
    )
    caplog.set_level(logging.INFO)
    # A float has no value this large: 400 digits overflow math.isfinite, and
    # 5000 digits are above Python's limit for reading an int from text.
    # Lists nested 100000 deep are beyond the recursion limit of json.loads.
    huge_values = {
        "x8": "1" * 400,
        "x9": "1" * 5000,
        "x6": "[" * 100_000 + "]" * 100_000,
    }

    def publish(peer: str, value: str) -> None:
        status = (
            f'{{"state": "offline", "client_id": "dslo-hub-{peer}", '
            f'"group": "dslo-hub", "reconnect_max_s": {value}}}'
        )
        topic = worker_status_topic("dslo", peer)
        publisher.publish(topic, status, qos=1).wait_for_publish(timeout=5)

    try:
        worker.start()
        statuses.get(timeout=10)
        for peer, value in huge_values.items():
            publish(peer, value)
        # A valid status after them still arrives, so the network thread lives.
        publish("x7", "2.0")
        wait_for_lines(caplog, "Hub worker w1 drains the session of x7", 1)
        alive = worker.connection.client.is_connected()
    finally:
        worker.stop()
        for client in (publisher, reader):
            client.disconnect()
            client.loop_stop()

    drains = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("Hub worker w1 drains the session of")
    ]
    assert alive
    assert drains == [
        "Hub worker w1 drains the session of x8 if it stays offline for 3605 s",
        "Hub worker w1 drains the session of x7 if it stays offline for 7 s",
    ]


def test_unreadable_password_fails_drain_only(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    folder = tmp_path / "hub"
    folder.mkdir()
    password_file = folder / "password"
    password_file.write_text("secret\n")
    # mosquitto in the tests accepts any user name and password.
    auth = {"mqtt": 'username = "hub"\npassword_file = "password"'}
    config = write_hub_config(folder, mosquitto.port, mlp_pair.bundle, auth)
    worker = HubWorker(load_hub_config(config, "w1"))
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    reader, statuses = subscribed_client(
        mosquitto.port, worker_status_topic("dslo", "w1"), lambda m: m.payload
    )
    caplog.set_level(logging.INFO)

    def publish_offline(peer: str) -> None:
        status = {"state": "offline", "client_id": f"dslo-hub-{peer}"}
        topic = worker_status_topic("dslo", peer)
        payload = json.dumps({**status, "group": "dslo-hub", "reconnect_max_s": 2})
        publisher.publish(topic, payload, qos=1).wait_for_publish(timeout=5)

    try:
        worker.start()
        statuses.get(timeout=10)
        # Not valid UTF-8, as after a botched rotation of the password file.
        password_file.write_bytes(b"\xff\xfe")
        publish_offline("x8")
        publish_offline("x7")
        wait_for_lines(caplog, "Hub worker w1 drains the session of x7", 1)
        alive = worker.connection.client.is_connected()
    finally:
        worker.stop()
        for client in (publisher, reader):
            client.disconnect()
            client.loop_stop()

    failures = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("Hub worker w1 failed to drain")
    ]
    assert alive
    # Each drain runs in its own thread, so the two lines come in either order.
    assert sorted(failures) == [
        "Hub worker w1 failed to drain the session of x7",
        "Hub worker w1 failed to drain the session of x8",
    ]


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


def publish_requests(client: mqtt.Client, devices: list[str]) -> list[bytes]:
    """Publish one 2-sample request per device; return the request ids."""
    inputs = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    request_ids = []
    for index, device in enumerate(devices):
        request_id = bytes([index]) * 16
        request = LabelRequest(request_id, time.time(), ["a", "b"], inputs)
        client.publish(
            f"dslo/{device}/requests",
            encode_request(request),
            qos=1,
            properties=request_properties(f"dslo/{device}/labels", request_id),
        ).wait_for_publish(timeout=10)
        request_ids.append(request_id)
    return request_ids


def test_drain_waits_for_late_requests(mlp_pair, tmp_path, caplog) -> None:
    # mosquitto 2.0.11 sends at most max_inflight_messages requests of the
    # resumed session, and each further one only after the drain acknowledges
    # an earlier one.
    text = "listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 5\n"
    broker = Broker.start(kind="mosquitto", workdir=tmp_path / "b", config_text=text)
    # The drain receives the CONNACK at once and each request half of
    # DRAIN_IDLE_S late.
    proxy = DelayProxy(broker.port, "dslo-hub-w1", delay_s=DRAIN_IDLE_S / 2)
    w1_config = write_hub_config(tmp_path / "w1", broker.port, mlp_pair.bundle)
    w2_config = write_hub_config(tmp_path / "w2", proxy.port, mlp_pair.bundle)
    devices = [f"dev-{index:02d}" for index in range(12)]
    peer = start_worker(w1_config, "w1", tmp_path / "w1.log")
    watcher = HubWatcher(broker.port)
    client, received = subscribed_client(broker.port, "dslo/+/labels")
    worker = HubWorker(load_hub_config(w2_config, "w2"))
    caplog.set_level(logging.INFO)
    try:
        wait_online(watcher, ["w1"])
        peer.send_signal(signal.SIGKILL)
        peer.wait(timeout=10)
        watcher.wait_for(lambda w: w.status.get("w1") == "offline")
        # w1 is the only member of the group, so its session queues them all.
        publish_requests(client, devices)

        # A batch that takes longer than DRAIN_IDLE_S, as on a loaded CPU,
        # acknowledges each request more than DRAIN_IDLE_S after it arrived.
        serve = worker.labeller.serve

        def slow_serve(batch) -> None:
            time.sleep(DRAIN_IDLE_S + 0.2)
            serve(batch)

        worker.labeller.serve = slow_serve
        worker.start()
        deadline = time.monotonic() + 60
        while not drain_messages(caplog) and time.monotonic() < deadline:
            time.sleep(0.1)
        # The worker responds before it acknowledges, so the responses to
        # every drained request are sent when the drain ends.
        replies = {}
        while len(replies) < len(devices):
            try:
                reply = received.get(timeout=5.0)
            except queue.Empty:
                break
            replies[reply.topic] = user_properties(reply.properties)["status"]
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait(timeout=10)
        worker.stop()
        client.disconnect()
        client.loop_stop()
        watcher.close()
        proxy.close()
        broker.stop()

    assert drain_messages(caplog) == [
        f"Hub worker w2 drained the session of w1: {len(devices)} requests "
        "received again"
    ]
    assert sorted(replies) == [f"dslo/{device}/labels" for device in devices]
    assert set(replies.values()) == {"ok"}


def test_drain_serves_requests_dead_peer_claimed(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    devices = ["kitchen", "garage"]
    peer = start_worker(config, "w1", tmp_path / "w1.log")
    watcher = HubWatcher(mosquitto.port)
    client, received = subscribed_client(mosquitto.port, "dslo/+/labels")
    worker = None
    caplog.set_level(logging.INFO)
    try:
        wait_online(watcher, ["w1"])
        peer.send_signal(signal.SIGKILL)
        peer.wait(timeout=10)
        watcher.wait_for(lambda w: w.status.get("w1") == "offline")
        request_ids = publish_requests(client, devices)
        # As if w1 had admitted the kitchen request and died while labelling it.
        peer_config = load_hub_config(config, "w1")
        peer_state = HubState(peer_config.state_file, "w1")
        claims = peer_state.admit(
            [RequestKey("kitchen", request_ids[0], 2)],
            time.time(),
            peer_config.rate,
            None,
            peer_config.requests.claim_timeout_s,
        )
        peer_state.close()

        worker = HubWorker(load_hub_config(config, "w2"))
        worker.start()
        deadline = time.monotonic() + 60
        while not drain_messages(caplog) and time.monotonic() < deadline:
            time.sleep(0.1)
        replies = {}
        while len(replies) < len(devices):
            try:
                reply = received.get(timeout=5.0)
            except queue.Empty:
                break
            replies[reply.topic] = user_properties(reply.properties)["status"]
        counters = worker.counters
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait(timeout=10)
        if worker is not None:
            worker.stop()
        client.disconnect()
        client.loop_stop()
        watcher.close()

    assert [claim.kind for claim in claims] == [ADMITTED]
    assert drain_messages(caplog) == [
        "Hub worker w2 drained the session of w1: 2 requests received again"
    ]
    assert replies == {"dslo/kitchen/labels": "ok", "dslo/garage/labels": "ok"}
    assert counters["in_progress"] == 0
    assert counters["answered"] == 2
