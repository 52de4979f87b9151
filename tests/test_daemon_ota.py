"""A model update over the air, applied by the running daemon."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from dslo_edge.broker import Broker
from dslo_edge.config import load_config, render_config
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.ota import ota_topics
from dslo_edge.ota_sender import send_bundle
from dslo_edge.protocol import SoftLabelUpdate, Topics, encode_update, new_message_id
from dslo_edge.swap import release_id

DEVICE = "ota-device"
REPO = Path(__file__).resolve().parents[1]


def update(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_update(
        SoftLabelUpdate(
            message_id=new_message_id(),
            teacher_version="t",
            teacher_round=1,
            timestamp=time.time(),
            sample_ids=[f"o{seed}-{i}" for i in range(8)],
            inputs=rng.random((8, 64), dtype=np.float32),
            labels=rng.dirichlet(np.ones(10), size=8).astype(np.float32),
            label_kind="probabilities",
        )
    )


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_ota_swaps_bundle_and_keeps_adapted_weights(mlp_pair, broker, tmp_path) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    config_path = tmp_path / "device.toml"
    config_path.write_text(
        render_config(DEVICE, mlp_pair.bundle, tmp_path / "state", broker.port)
    )
    new_bundle = tmp_path / "new-bundle"
    shutil.copytree(mlp_pair.bundle, new_bundle)
    topics = Topics.for_device(DEVICE)
    statuses: list[dict] = []
    hub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    hub.on_subscribe = lambda *_: subscribed.set()
    online = threading.Event()

    def on_message(_client, _userdata, message) -> None:
        if message.topic == topics.status:
            if message.payload == b"online":
                online.set()
        else:
            statuses.append(json.loads(message.payload))

    hub.on_message = on_message
    hub.connect(broker.host, broker.port)
    hub.loop_start()
    hub.subscribe([(ota_topics(topics)[1], 1), (topics.status, 1)])
    assert subscribed.wait(10)

    daemon = EdgeDaemon(load_config(config_path))
    daemon.start()
    x = np.random.default_rng(5).random((4, 64), dtype=np.float32)
    try:
        # The device publishes "online" after subscribing, on the same connection.
        assert online.wait(30)
        for seed in range(3):
            hub.publish(topics.updates, update(seed), qos=1).wait_for_publish()
        wait_until(lambda: daemon.metrics.applied == 3)
        adapted = daemon.student.infer(x)

        send_bundle(hub, topics, new_bundle, chunk_bytes=4096)
        wait_until(lambda: statuses)
        swapped = daemon.student.infer(x)
        active = daemon.bundle.path
        hub.publish(topics.updates, update(10), qos=1).wait_for_publish()
        wait_until(lambda: daemon.metrics.applied == 4)
        final = daemon.student.infer(x)
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()

    assert statuses[-1]["state"] == "installed"
    assert active.parent == tmp_path / "state" / "bundles"
    np.testing.assert_array_equal(swapped, adapted)
    restarted = EdgeDaemon(load_config(config_path))
    restarted._restore()
    assert restarted.bundle.path == active
    assert restarted.trainer.applied_updates == 4
    np.testing.assert_array_equal(restarted.student.infer(x), final)


def test_device_with_key_rejects_unsigned_bundle(mlp_pair, broker, tmp_path) -> None:
    from dslo_edge.signing import generate_key_file, load_key

    if broker.kind != "mosquitto":
        return
    key_file = tmp_path / "device.key"
    generate_key_file(key_file)
    config_path = tmp_path / "device.toml"
    config_path.write_text(
        render_config(
            DEVICE,
            mlp_pair.bundle,
            tmp_path / "state",
            broker.port,
            overrides={"security": {"hmac_key_file": str(key_file)}},
        )
    )
    topics = Topics.for_device(DEVICE)
    statuses: list[dict] = []
    subscribed = threading.Event()
    hub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    hub.on_subscribe = lambda *_: subscribed.set()
    hub.on_message = lambda _c, _u, m: statuses.append(json.loads(m.payload))
    hub.connect(broker.host, broker.port)
    hub.loop_start()
    hub.subscribe(ota_topics(topics)[1], qos=1)
    assert subscribed.wait(10)
    daemon = EdgeDaemon(load_config(config_path))
    daemon.start()
    factory_path = daemon.bundle.path
    try:
        wait_until(daemon.connected.is_set)
        time.sleep(0.3)
        send_bundle(hub, topics, mlp_pair.bundle, chunk_bytes=4096)
        wait_until(lambda: statuses)
        rejected = list(statuses)
        statuses.clear()
        send_bundle(
            hub, topics, mlp_pair.bundle, chunk_bytes=4096, hmac_key=load_key(key_file)
        )
        wait_until(lambda: any(s["state"] == "installed" for s in statuses))
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()

    assert rejected[0]["state"] == "rejected"
    assert rejected[0]["reason"] == "unsigned"
    assert daemon.bundle.path != factory_path


# The ota-send command against a running daemon


def ota_send(
    broker: Broker, bundle: Path, *options: str
) -> subprocess.CompletedProcess:
    """Run ``dslo-edge ota-send`` in its own process, as an operator would."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    command = [
        sys.executable,
        "-m",
        "dslo_edge.cli",
        "ota-send",
        str(bundle),
        "--device",
        DEVICE,
        "--broker",
        f"mqtt://{broker.host}:{broker.port}",
        "--chunk-size",
        "8192",
        *options,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=environment
    )


def start_daemon(tmp_path: Path, bundle: Path, broker: Broker, **overrides: Any):
    config_path = tmp_path / "device.toml"
    config_path.write_text(
        render_config(
            DEVICE, bundle, tmp_path / "state", broker.port, overrides=overrides
        )
    )
    daemon = EdgeDaemon(load_config(config_path))
    daemon.start()
    wait_until(daemon.connected.is_set)
    return daemon


def test_ota_send_exit_status_follows_device(mlp_pair, broker, tmp_path) -> None:
    from dslo_edge.signing import generate_key_file

    if broker.kind != "mosquitto":
        return
    key_file = tmp_path / "device.key"
    generate_key_file(key_file)
    daemon = start_daemon(
        tmp_path,
        mlp_pair.bundle,
        broker,
        security={"hmac_key_file": str(key_file)},
    )
    try:
        unsigned = ota_send(broker, mlp_pair.bundle)
        unsigned_bundle = daemon.bundle.path
        signed = ota_send(broker, mlp_pair.bundle, "--hmac-key-file", str(key_file))
        signed_bundle = daemon.bundle.path
    finally:
        daemon.stop()

    # A subscriber that connects after the transfer still reads its outcome.
    retained: list[mqtt.MQTTMessage] = []
    late = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    late.on_message = lambda _c, _u, message: retained.append(message)
    late.connect(broker.host, broker.port)
    late.loop_start()
    late.subscribe(ota_topics(Topics.for_device(DEVICE))[1], qos=1)
    try:
        wait_until(lambda: retained, timeout=10)
    finally:
        late.loop_stop()
        late.disconnect()

    assert unsigned.returncode == 1, unsigned.stderr
    assert f"error: device {DEVICE} rejected transfer " in unsigned.stderr
    assert ": unsigned: update is not signed" in unsigned.stderr
    assert unsigned_bundle == mlp_pair.bundle
    release = release_id(mlp_pair.bundle)
    assert signed.returncode == 0, signed.stderr
    assert f"device {DEVICE} installed release {release}" in signed.stdout
    assert signed_bundle == tmp_path / "state" / "bundles" / release
    transfer = re.search(r"as transfer ([0-9a-f]{32})", signed.stdout)
    assert transfer is not None
    status = json.loads(retained[0].payload)
    assert retained[0].retain
    assert status["state"] == "installed"
    assert status["transfer"] == transfer.group(1)
