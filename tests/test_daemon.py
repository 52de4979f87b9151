"""The edge daemon against a real mosquitto broker on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from dslo_edge.admission import Received
from dslo_edge.bundle import load_bundle
from dslo_edge.config import DeviceConfig, load_config, render_config
from dslo_edge.daemon import (
    METRICS_LOG,
    METRICS_MIN_INTERVAL_S,
    EdgeDaemon,
    burst_checkpoint_every,
)
from dslo_edge.hub import HubClient
from dslo_edge.models import StudentModel
from dslo_edge.protocol import SoftLabelUpdate, encode_update, new_message_id
from dslo_edge.trainer import Trainer

DEVICE = "test-device"
WAIT_S = 30.0


def write_config(
    tmp_path: Path, bundle: Path, broker, **overrides: dict
) -> DeviceConfig:
    # amqtt, the fallback broker, speaks MQTT 3.1.1 only.
    protocol = "5" if broker.kind == "mosquitto" else "3.1.1"
    path = tmp_path / "device.toml"
    text = render_config(
        DEVICE,
        bundle,
        tmp_path / "state",
        broker.port,
        planned_updates=50,
        protocol=protocol,
        overrides=overrides,
    )
    path.write_text(text)
    return load_config(path)


def make_update(seed: int, samples: int = 8, **changes: object) -> SoftLabelUpdate:
    rng = np.random.default_rng(seed)
    update = SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="test-teacher",
        teacher_round=1,
        timestamp=time.time(),
        sample_ids=[f"s{seed}-{i}" for i in range(samples)],
        inputs=rng.random((samples, 64), dtype=np.float32),
        labels=rng.dirichlet(np.ones(10), size=samples).astype(np.float32),
        label_kind="probabilities",
    )
    for name, value in changes.items():
        setattr(update, name, value)
    return update


def hub_client(broker) -> HubClient:
    protocol = mqtt.MQTTv5 if broker.kind == "mosquitto" else mqtt.MQTTv311
    return HubClient(broker.host, broker.port, DEVICE, protocol)


def wait_processed(hub: HubClient, count: int) -> dict:
    return hub.wait_for_metrics(lambda m: m["processed"] >= count, WAIT_S)


@pytest.fixture
def running_daemon(mlp_pair, broker, tmp_path):
    config = write_config(tmp_path, mlp_pair.bundle, broker)
    daemon = EdgeDaemon(config)
    daemon.start()
    hub = hub_client(broker)
    wait_processed(hub, 0)
    yield daemon, hub
    hub.close()
    daemon.stop()


def invalid_payloads() -> dict[str, bytes]:
    valid = encode_update(make_update(1))
    rng = np.random.default_rng(2)
    nan_inputs = rng.random((8, 64), dtype=np.float32)
    nan_inputs[3, 5] = np.nan
    logits = rng.normal(size=(8, 10)).astype(np.float32)
    scaled = rng.dirichlet(np.ones(10), size=8).astype(np.float32) * 1.3
    negative = rng.dirichlet(np.ones(10), size=8).astype(np.float32)
    negative[0, :2] = [-0.1, negative[0, 0] + negative[0, 1] + 0.1]
    # Finite, but above the default limits.max_abs_input of 1e6.
    huge = rng.random((8, 64), dtype=np.float32)
    huge[2, 7] = 2.5e6
    huge_negative = rng.random((8, 64), dtype=np.float32)
    huge_negative[6, 0] = -3e38
    return {
        "truncated": valid[: len(valid) // 2],
        "shape_mismatch": encode_update(
            make_update(3, inputs=rng.random((8, 32), dtype=np.float32))
        ),
        "non_finite": encode_update(make_update(4, inputs=nan_inputs)),
        "negative_probability": encode_update(make_update(5, labels=negative)),
        "unnormalised": encode_update(make_update(6, labels=scaled)),
        "logits_as_probabilities": encode_update(make_update(7, labels=logits)),
        "out_of_range": encode_update(make_update(9, inputs=huge)),
        "out_of_range_negative": encode_update(make_update(10, inputs=huge_negative)),
    }


def test_invalid_updates_never_touch_weights(running_daemon) -> None:
    daemon, hub = running_daemon
    factory = daemon.student.get_weights()
    payloads = invalid_payloads()

    for payload in payloads.values():
        hub.publish(payload)
    metrics = wait_processed(hub, len(payloads))

    assert metrics["applied"] == 0
    assert metrics["rejected"] == {
        "truncated": 1,
        "shape_mismatch": 1,
        "non_finite": 1,
        # logits have negative entries, so they fail the same check
        "negative_probability": 2,
        "unnormalised": 1,
        "out_of_range": 2,
    }
    for name, value in daemon.student.get_weights().items():
        assert np.array_equal(value, factory[name]), name

    hub.publish(encode_update(make_update(8, input_dtype="float16")))
    metrics = wait_processed(hub, len(payloads) + 1)

    assert metrics["applied"] == 1
    changed = daemon.student.get_weights()
    assert any(not np.array_equal(changed[n], factory[n]) for n in factory)


def test_daemon_trains_with_dynamic_alpha(running_daemon) -> None:
    daemon, hub = running_daemon

    for seed in range(5):
        hub.publish(encode_update(make_update(10 + seed)))
    metrics = wait_processed(hub, 5)

    assert metrics["applied"] == 5
    assert metrics["samples_applied"] == 40
    assert 0.2 <= metrics["mean_alpha"] <= 0.8
    assert metrics["train_ms"]["count"] == 5
    assert metrics["end_to_end_ms"]["p50"] > 0
    assert metrics["stage_ms"]["queue"]["count"] == 5
    assert metrics["stage_ms"]["admit"]["count"] == 5
    assert metrics["stage_ms"]["prepare"]["count"] == 5
    assert metrics["progress"] == pytest.approx(5 / 50)


def replay(bundle: Path, config: DeviceConfig, updates: list[SoftLabelUpdate]):
    """Apply updates in-process, as the daemon would, and return the student."""
    student = StudentModel(load_bundle(bundle))
    trainer = Trainer(student, config.training)
    for update in updates:
        trainer.apply(trainer.decode(encode_update(update)))
    return student


def start_process(config: DeviceConfig) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dslo_edge.cli", "run", "--config", str(config.source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_retained(broker, topic: str) -> bytes | None:
    received: list[bytes] = []
    protocol = mqtt.MQTTv5 if broker.kind == "mosquitto" else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)

    def on_message(_client, _userdata, message) -> None:
        # amqtt 0.12 also delivers other retained messages of the device.
        if message.topic == topic:
            received.append(message.payload)

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    return received[0] if received else None


def test_restart_restores_adapted_weights(mlp_pair, broker, tmp_path) -> None:
    config = write_config(tmp_path, mlp_pair.bundle, broker)
    updates = [make_update(20 + seed) for seed in range(6)]
    process = start_process(config)
    hub = hub_client(broker)
    try:
        wait_processed(hub, 0)
        for update in updates:
            hub.publish(encode_update(update))
        wait_processed(hub, len(updates))
    finally:
        hub.close()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=WAIT_S)
    assert process.returncode == 0, output
    assert read_retained(broker, config.topics.status) == b"offline"

    restarted = EdgeDaemon(config)
    restarted._restore()
    x = np.random.default_rng(30).random((4, 64), dtype=np.float32)
    expected = replay(mlp_pair.bundle, config, updates).infer(x)
    factory = StudentModel(load_bundle(mlp_pair.bundle)).infer(x)

    assert restarted.restored_from.startswith("checkpoint-")
    assert restarted.trainer.applied_updates == len(updates)
    np.testing.assert_array_equal(restarted.student.infer(x), expected)
    assert np.max(np.abs(restarted.student.infer(x) - factory)) > 1e-4


def test_daemon_keeps_consuming_after_broker_restart(running_daemon, broker) -> None:
    daemon, hub = running_daemon
    hub.publish(encode_update(make_update(40)))
    wait_processed(hub, 1)
    hub.close()

    broker.restart()
    hub = hub_client(broker)
    # The broker kept nothing, so the device's next metrics prove it reconnected.
    hub.wait_for_metrics(lambda m: m["processed"] == 1, WAIT_S)
    hub.publish(encode_update(make_update(41)))
    metrics = wait_processed(hub, 2)
    hub.close()

    assert metrics["applied"] == 2
    assert daemon.connected.is_set()
    assert daemon.subscribed.is_set()


def test_subscribed_is_cleared_when_connection_drops(running_daemon, broker) -> None:
    daemon, _hub = running_daemon
    set_while_connected = daemon.subscribed.wait(WAIT_S)

    broker.stop()
    deadline = time.monotonic() + WAIT_S
    while daemon.subscribed.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)

    assert set_while_connected
    assert not daemon.subscribed.is_set()
    assert not daemon.connected.is_set()


def test_rejected_subscription_is_logged(mlp_pair, broker, tmp_path, caplog) -> None:
    daemon = EdgeDaemon(write_config(tmp_path, mlp_pair.bundle, broker))
    topics = [(daemon.topics.updates, 1), (daemon.ota_topic, 1)]
    daemon._subscriptions, daemon._subscribe_mid = topics, 7
    granted = ReasonCode(PacketTypes.SUBACK, identifier=1)
    rejected = ReasonCode(PacketTypes.SUBACK, identifier=0x87)

    daemon._on_subscribed(None, None, 8, [granted, granted], None)
    other_mid = daemon.subscribed.is_set()
    with caplog.at_level("ERROR", logger="dslo_edge.daemon"):
        daemon._on_subscribed(None, None, 7, [granted, rejected], None)
    after_rejection = daemon.subscribed.is_set()
    daemon._on_subscribed(None, None, 7, [granted, granted], None)

    assert not other_mid
    assert not after_rejection
    assert daemon.subscribed.is_set()
    assert f"rejected the subscription to {daemon.ota_topic};" in caplog.text
    assert daemon.topics.updates not in caplog.text


def test_daemon_code_path_imports_no_tensorflow(mlp_pair, broker, tmp_path) -> None:
    config = write_config(tmp_path, mlp_pair.bundle, broker)
    payload_path = tmp_path / "update.bin"
    payload_path.write_bytes(encode_update(make_update(50)))
    protocol = 5 if broker.kind == "mosquitto" else 4
    script = textwrap.dedent(
        f"""
        import sys, time
        from dslo_edge.config import load_config
        from dslo_edge.daemon import EdgeDaemon
        from dslo_edge.hub import HubClient
        daemon = EdgeDaemon(load_config({str(config.source)!r}))
        daemon.start()
        hub = HubClient("127.0.0.1", {broker.port}, {DEVICE!r}, {protocol})
        hub.wait_for_metrics(lambda m: True, 30)
        hub.publish(open({str(payload_path)!r}, "rb").read())
        hub.wait_for_metrics(lambda m: m["applied"] == 1, 30)
        hub.close()
        daemon.stop()
        print("tensorflow" in sys.modules, "keras" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_stale_and_future_updates_are_dropped(running_daemon) -> None:
    daemon, hub = running_daemon
    now = time.time()

    hub.publish(encode_update(make_update(60, timestamp=now - 7200)))
    hub.publish(encode_update(make_update(61, timestamp=now + 3600)))
    hub.publish(encode_update(make_update(62)))
    metrics = wait_processed(hub, 3)

    assert metrics["rejected"] == {"stale": 1, "clock_skew": 1}
    assert metrics["applied"] == 1


def test_replayed_update_is_applied_once(running_daemon) -> None:
    daemon, hub = running_daemon
    payload = encode_update(make_update(70))

    hub.publish(payload)
    wait_processed(hub, 1)
    hub.publish(payload)
    metrics = wait_processed(hub, 2)

    assert metrics["applied"] == 1
    assert metrics["rejected"] == {"duplicate": 1}


def last_logged(log: Path) -> dict:
    """Return the last report in a metrics log."""
    return json.loads(log.read_text().splitlines()[-1])


def test_metrics_log_ends_with_final_counts(mlp_pair, broker, tmp_path) -> None:
    # No idle checkpoint, so only the report at the burst's end can log 30.
    config = write_config(
        tmp_path, mlp_pair.bundle, broker, training={"checkpoint_idle_s": 600.0}
    )
    daemon = EdgeDaemon(config)
    daemon.start()
    hub = hub_client(broker)
    try:
        wait_processed(hub, 0)
        for seed in range(30):
            hub.publish(encode_update(make_update(200 + seed, samples=1)))
        wait_processed(hub, 30)
        log = tmp_path / "state" / "metrics.jsonl"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and last_logged(log)["applied"] < 30:
            time.sleep(0.05)
        lines = log.read_text().splitlines()
    finally:
        hub.close()
        daemon.stop()

    assert json.loads(lines[-1])["applied"] == 30
    # A burst of 30 updates logs far fewer lines than updates.
    assert len(lines) < 15


def test_metrics_log_ends_with_report_sent_unlogged(mlp_pair, broker, tmp_path) -> None:
    config = write_config(
        tmp_path, mlp_pair.bundle, broker, training={"checkpoint_idle_s": 600.0}
    )
    log = tmp_path / "state" / "metrics.jsonl"
    daemon = EdgeDaemon(config)
    daemon.start()
    hub = hub_client(broker)
    try:
        wait_processed(hub, 0)
        hub.publish(encode_update(make_update(300, samples=1)))
        wait_processed(hub, 1)
        # The next update's report is past the MQTT rate limit, but the log
        # has just taken its one line a second, so the report goes out unlogged.
        time.sleep(METRICS_MIN_INTERVAL_S + 0.1)
        daemon._last_logged_at = time.monotonic()
        hub.publish(encode_update(make_update(301, samples=1)))
        wait_processed(hub, 2)
        # The idle trainer logs the report within about QUEUE_WAIT_S.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and last_logged(log)["processed"] < 2:
            time.sleep(0.05)
        last = last_logged(log)
    finally:
        hub.close()
        daemon.stop()

    assert last["processed"] == 2


def test_metrics_log_is_size_capped(mlp_pair, broker, tmp_path) -> None:
    config = write_config(
        tmp_path, mlp_pair.bundle, broker, logging={"max_bytes": 4096, "backups": 1}
    )
    daemon = EdgeDaemon(config)
    for _ in range(40):
        daemon._last_logged_at = float("-inf")  # the log takes one line a second
        daemon.publish_metrics()

    logs = sorted((tmp_path / "state").glob("metrics.jsonl*"))
    assert [p.name for p in logs] == ["metrics.jsonl", "metrics.jsonl.1"]
    assert all(p.stat().st_size <= 4096 + 4096 for p in logs)


def test_batched_daemon_applies_every_update_once(mlp_pair, broker, tmp_path) -> None:
    config = write_config(
        tmp_path,
        mlp_pair.bundle,
        broker,
        training={"batch_size": 32, "batch_wait_ms": 20.0},
    )
    daemon = EdgeDaemon(config)
    daemon.start()
    hub = hub_client(broker)
    try:
        wait_processed(hub, 0)
        for seed in range(12):
            hub.publish(encode_update(make_update(80 + seed)))
        # Same sample ids as an earlier update, new message id: applied too.
        hub.publish(encode_update(make_update(81)))
        metrics = wait_processed(hub, 13)
    finally:
        hub.close()
        daemon.stop()

    assert metrics["applied"] == 13
    assert metrics["samples_applied"] == 13 * 8
    assert daemon.trainer.applied_updates == 13


def burst_config(
    tmp_path: Path, bundle: Path, broker, checkpoint_every: int, queue_size: int
) -> DeviceConfig:
    """Return a config whose small queue a burst of updates fills."""
    if broker.kind != "mosquitto":
        pytest.skip("bursts need mosquitto's MQTT 5 session and flow control")
    training = {
        "checkpoint_every": checkpoint_every,
        "queue_size": queue_size,
        "checkpoint_idle_s": 0.2,
    }
    return write_config(tmp_path, bundle, broker, training=training)


def wait_all_acknowledged(hub: HubClient, count: int) -> dict:
    return hub.wait_for_metrics(
        lambda m: m["processed"] >= count and m["unacknowledged"] == 0, WAIT_S
    )


def test_backlog_defers_checkpoints(mlp_pair, broker, tmp_path) -> None:
    config = burst_config(tmp_path, mlp_pair.bundle, broker, 5, 64)
    offline = EdgeDaemon(config)
    offline.start()
    hub = hub_client(broker)
    try:
        wait_processed(hub, 0)
        offline.stop()
        # The broker keeps these for the device's session until it returns.
        for seed in range(150):
            hub.publish(encode_update(make_update(300 + seed, samples=4)))
        daemon = EdgeDaemon(config)
        daemon.start()
        try:
            metrics = wait_all_acknowledged(hub, 150)
        finally:
            daemon.stop()
    finally:
        hub.close()

    assert metrics["applied"] == 150
    assert daemon.trainer.applied_updates == 150
    # One checkpoint per 5 updates would be 30. In a burst the daemon saves
    # every 24 updates (half of 3/4 of the queue), which writes far fewer.
    assert metrics["checkpoints_written"] <= 15


def test_full_queue_slows_the_broker(mlp_pair, broker, tmp_path) -> None:
    config = burst_config(tmp_path, mlp_pair.bundle, broker, 4, 8)
    daemon = EdgeDaemon(config)
    daemon.start()
    hub = hub_client(broker)
    try:
        wait_processed(hub, 0)
        for seed in range(400):
            hub.publish(encode_update(make_update(800 + seed, samples=4)))
        metrics = wait_all_acknowledged(hub, 400)
    finally:
        hub.close()
        daemon.stop()

    assert metrics["applied"] == 400
    # The publisher outpaces the trainer, and the queue's 16 slots fill.
    # The network thread then waits for room, so nothing is left for
    # redelivery.
    assert metrics["deferred_for_redelivery"] == 0


def test_burst_gap_reports_released_acks(mlp_pair, broker, tmp_path) -> None:
    # The trainer's steps, run here without its thread, so the end of the
    # burst comes at a known point.
    daemon = EdgeDaemon(burst_config(tmp_path, mlp_pair.bundle, broker, 4, 8))
    try:
        for seed in range(4):
            payload = encode_update(make_update(900 + seed, samples=4))
            daemon.updates.put(Received(payload, seed + 1, 1, time.time()))
        for _ in range(4):
            daemon._take_and_train()
        daemon._in_burst = True
        daemon._on_burst_gap()
    finally:
        daemon._state_lock.release()

    log = (tmp_path / "state" / METRICS_LOG).read_text().splitlines()
    report = json.loads(log[-1])
    assert daemon.unacknowledged == 0
    assert report["applied"] == 4
    assert report["unacknowledged"] == 0


@pytest.mark.parametrize(
    ("checkpoint_every", "queue_size", "ack_window", "expected"),
    [
        (20, 256, None, 96),  # half of 3/4 of the receive maximum
        (20, 256, 100, 50),  # half of the window the broker stopped at
        (20, 256, 30, 20),  # never below checkpoint_every
        (5, 64, None, 24),
        (4, 8, None, 4),
    ],
)
def test_burst_checkpoint_interval(
    checkpoint_every: int, queue_size: int, ack_window: int | None, expected: int
) -> None:
    every = burst_checkpoint_every(checkpoint_every, queue_size, ack_window)

    assert every == expected
