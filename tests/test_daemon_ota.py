"""A model update over the air, applied by the running daemon."""

from __future__ import annotations

import io
import json
import logging
import os
import queue
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
import pytest

from dslo_edge.broker import Broker
from dslo_edge.checkpoint import list_checkpoints, load_latest_checkpoint
from dslo_edge.config import load_config, render_config
from dslo_edge.daemon import OTA_QUEUE_BYTES, EdgeDaemon
from dslo_edge.errors import BundleError
from dslo_edge.inference import inference_topics
from dslo_edge.label_protocol import decode_request
from dslo_edge.multihead import MultiHeadTrainer
from dslo_edge.multihead_protocol import encode_multi_head_update
from dslo_edge.ota import ota_topics, split_archive
from dslo_edge.ota_sender import pack_bundle, send_bundle
from dslo_edge.protocol import SoftLabelUpdate, Topics, encode_update, new_message_id
from dslo_edge.swap import KEPT_CHECKPOINTS, BundleStore, release_id
from dslo_edge.trainer import WEIGHT_PREFIX, Trainer
from dslo_edge.update_queue import UpdateQueue
from tests.multihead_bundle import make_multi_head_update

DEVICE = "ota-device"
REPO = Path(__file__).resolve().parents[1]


def update(seed: int, inputs: int = 64, classes: int = 10) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_update(
        SoftLabelUpdate(
            message_id=new_message_id(),
            teacher_version="t",
            teacher_round=1,
            timestamp=time.time(),
            sample_ids=[f"o{seed}-{i}" for i in range(8)],
            inputs=rng.random((8, inputs), dtype=np.float32),
            labels=rng.dirichlet(np.ones(classes), size=8).astype(np.float32),
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
        outcomes = daemon.status_report()["model_updates"]
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()

    assert statuses[-1]["state"] == "installed"
    assert outcomes == {"installed": 1, "rejected": {}, "rolled_back": {}}
    assert active.parent == tmp_path / "state" / "bundles"
    np.testing.assert_array_equal(swapped, adapted)
    restarted = EdgeDaemon(load_config(config_path))
    restarted._restore()
    assert restarted.bundle.path == active
    assert restarted.trainer.applied_updates == 4
    np.testing.assert_array_equal(restarted.student.infer(x), final)


def active_release(bundle: Path, state: Path) -> tuple[Path, Path]:
    """Install ``bundle`` as the active release in ``state``.

    Returns the release and a device config beside ``state`` whose
    device.bundle is ``bundle``.
    """
    archive = state.parent / "release.tar"
    archive.write_bytes(pack_bundle(bundle))
    store = BundleStore(state)
    release = store.install_archive(archive)
    store.activate(release)
    config_path = state.parent / "device.toml"
    config_path.write_text(render_config(DEVICE, bundle, state, 1883))
    return release, config_path


def test_start_names_release_over_config_bundle(mlp_pair, tmp_path, caplog) -> None:
    release, config_path = active_release(mlp_pair.bundle, tmp_path / "state")

    with caplog.at_level("INFO", logger="dslo_edge.daemon"):
        daemon = EdgeDaemon(load_config(config_path))

    assert daemon.bundle.path == release
    expected = (
        f"Device {DEVICE} runs the over-the-air release in {release}, not "
        f"device.bundle {mlp_pair.bundle}"
    )
    assert expected in caplog.text


def test_corrupt_release_names_the_fallback(mlp_pair, tmp_path) -> None:
    state = tmp_path / "state"
    release, config_path = active_release(mlp_pair.bundle, state)
    # A byte changed on the device's storage after the install.
    student = release / "student.tflite"
    data = bytearray(student.read_bytes())
    data[-1] ^= 0xFF
    student.write_bytes(bytes(data))

    with pytest.raises(BundleError) as caught:
        EdgeDaemon(load_config(config_path))

    message = str(caught.value)
    link = state / "bundles" / "active"
    assert f"this is the over-the-air release that {link} points to" in message
    assert "the daemon cannot start to receive another one" in message
    assert (
        f"remove {link} so that it starts from device.bundle {mlp_pair.bundle}, "
        "then send a new release with 'dslo-edge ota-send'"
    ) in message
    assert "ota-send', or" not in message

    # The step that the message gives first lets the daemon start.
    link.unlink()
    daemon = EdgeDaemon(load_config(config_path))
    daemon._state_lock.release()

    assert daemon.bundle.path == mlp_pair.bundle


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
        wait_until(daemon.subscribed.is_set)
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


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Convert a 32-8-5 MLP: another input shape and class count than mlp_pair."""
    keras = pytest.importorskip("keras")
    from converters.bundle import convert_bundle

    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(5, activation="softmax"),
        ]
    )
    bundle = tmp_path_factory.mktemp("small") / "bundle"
    convert_bundle(model, model, bundle)
    return bundle


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
    wait_until(daemon.subscribed.is_set)
    return daemon


def hub_client(broker: Broker) -> mqtt.Client:
    hub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    hub.connect(broker.host, broker.port)
    hub.loop_start()
    return hub


def push(hub: mqtt.Client, daemon: EdgeDaemon, payload: bytes) -> None:
    """Publish one update and wait until it is applied and checkpointed."""
    applied = daemon.metrics.applied
    hub.publish(Topics.for_device(DEVICE).updates, payload, qos=1).wait_for_publish()
    wait_until(lambda: daemon.metrics.applied == applied + 1)
    wait_until(lambda: daemon.unacknowledged == 0)


def checkpoint_files(state: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for _, path in list_checkpoints(state / "checkpoints")
    }


def test_ota_send_rejects_other_model_unless_allowed(
    mlp_pair, small_bundle, broker, tmp_path
) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    state = tmp_path / "state"
    hub = hub_client(broker)
    daemon = start_daemon(tmp_path, mlp_pair.bundle, broker)
    try:
        for seed in range(3):
            push(hub, daemon, update(seed))
        before = daemon.student.get_weights()
        checkpoints = checkpoint_files(state)

        rejected = ota_send(broker, small_bundle)

        weights_after_reject = daemon.student.get_weights()
        checkpoints_after_reject = checkpoint_files(state)
        bundle_after_reject = daemon.bundle.path
        installed_after_reject = sorted(os.listdir(state / "bundles"))
        push(hub, daemon, update(10))
        adapted = daemon.student.get_weights()

        allowed = ota_send(broker, small_bundle, "--allow-model-change")

        switched_shape = daemon.bundle.input_shape
        push(hub, daemon, update(11, inputs=32, classes=5))

        back = ota_send(broker, mlp_pair.bundle, "--allow-model-change")

        restored = daemon.student.get_weights()
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()

    assert rejected.returncode == 1, rejected.stderr
    assert "rejected transfer" in rejected.stderr
    assert ": model_mismatch: release " in rejected.stderr
    assert "has input 32 and 5 classes, but the running model has input 64" in (
        rejected.stderr
    )
    assert "--allow-model-change" in rejected.stderr
    assert bundle_after_reject == mlp_pair.bundle
    assert installed_after_reject == []
    assert checkpoints_after_reject == checkpoints
    assert set(weights_after_reject) == set(before)
    for name, value in before.items():
        np.testing.assert_array_equal(weights_after_reject[name], value)

    assert allowed.returncode == 0, allowed.stderr
    assert "installed release" in allowed.stdout
    assert switched_shape == (32,)
    old_checkpoint = load_latest_checkpoint(
        state / KEPT_CHECKPOINTS / release_id(mlp_pair.bundle)
    )
    assert old_checkpoint is not None
    for name, value in adapted.items():
        np.testing.assert_array_equal(
            old_checkpoint.tensors[WEIGHT_PREFIX + name], value
        )

    assert back.returncode == 0, back.stderr
    for name, value in adapted.items():
        np.testing.assert_array_equal(restored[name], value)


@pytest.fixture(scope="module")
def wider_bundle(mlp_pair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Convert a 64-24-10 student whose layers have mlp_pair's student's names.

    Its input shape and classes are mlp_pair's, but its hidden weights have
    another shape, so the running student's adapted values cannot carry over.
    """
    keras = pytest.importorskip("keras")
    from converters.bundle import convert_bundle

    hidden, output = (layer.name for layer in mlp_pair.student.layers)
    keras.utils.set_random_seed(12)
    student = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(24, activation="relu", name=hidden),
            keras.layers.Dense(10, activation="softmax", name=output),
        ]
    )
    bundle = tmp_path_factory.mktemp("wider") / "bundle"
    convert_bundle(mlp_pair.teacher, student, bundle)
    return bundle


def test_ota_send_rejects_student_of_other_weights(
    mlp_pair, wider_bundle, broker, tmp_path
) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    state = tmp_path / "state"
    hidden = mlp_pair.student.layers[0].name
    hub = hub_client(broker)
    daemon = start_daemon(tmp_path, mlp_pair.bundle, broker)
    try:
        for seed in range(3):
            push(hub, daemon, update(seed))
        adapted = daemon.student.get_weights()
        checkpoints = checkpoint_files(state)

        rejected = ota_send(broker, wider_bundle)

        weights_after_reject = daemon.student.get_weights()
        checkpoints_after_reject = checkpoint_files(state)
        bundle_after_reject = daemon.bundle.path

        allowed = ota_send(broker, wider_bundle, "--allow-model-change")

        switched = daemon.student.get_weights()
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()

    assert rejected.returncode == 1, rejected.stderr
    assert ": model_mismatch: release " in rejected.stderr
    assert f"{hidden}_kernel of shape (64, 24), not (64, 16)" in rejected.stderr
    assert "--allow-model-change" in rejected.stderr
    assert bundle_after_reject == mlp_pair.bundle
    assert checkpoints_after_reject == checkpoints
    for name, value in adapted.items():
        np.testing.assert_array_equal(weights_after_reject[name], value)

    assert allowed.returncode == 0, allowed.stderr
    assert switched[f"{hidden}_kernel"].shape == (64, 24)
    kept_checkpoint = load_latest_checkpoint(
        state / KEPT_CHECKPOINTS / release_id(mlp_pair.bundle)
    )
    assert kept_checkpoint is not None
    for name, value in adapted.items():
        kept_value = kept_checkpoint.tensors[WEIGHT_PREFIX + name]
        np.testing.assert_array_equal(kept_value, value)


def test_switch_replaces_request_reference(
    mlp_pair, small_bundle, broker, tmp_path, caplog
) -> None:
    if broker.kind != "mosquitto":
        return  # label requests need MQTT 5
    device_topics = Topics.for_device(DEVICE)
    infer_topic, _ = inference_topics(device_topics)
    requests_topic = f"dslo/{DEVICE}/requests"
    requests: queue.Queue[bytes] = queue.Queue()
    hub = hub_client(broker)
    hub.on_message = lambda _c, _u, message: requests.put(message.payload)
    hub.subscribe(requests_topic, qos=1)
    # "either" with max_confidence 1 requests labels for every input, and it
    # runs the reference teacher on every input as well.
    daemon = start_daemon(
        tmp_path,
        mlp_pair.bundle,
        broker,
        requests={"enabled": True, "rule": "either", "max_confidence": 1.0},
    )
    caplog.set_level("ERROR", logger="dslo_edge.daemon")
    rng = np.random.default_rng(3)
    try:
        switched = ota_send(broker, small_bundle, "--allow-model-change")
        buffer = io.BytesIO()
        np.savez(buffer, x=rng.random((2, 32), dtype=np.float32))
        hub.publish(infer_topic, buffer.getvalue(), qos=1).wait_for_publish(10)
        request = decode_request(requests.get(timeout=10), max_samples=32)
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()

    assert switched.returncode == 0, switched.stderr
    assert request.inputs.shape == (2, 32)
    assert daemon.inference.reference is not None
    assert daemon.inference.reference.predict(request.inputs).shape == (2, 5)
    assert "failed to handle an inference input" not in caplog.text


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
        other_key = tmp_path / "other.key"
        generate_key_file(other_key)
        wrong_key = ota_send(broker, mlp_pair.bundle, "--hmac-key-file", str(other_key))
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
    assert wrong_key.returncode == 1, wrong_key.stderr
    assert (
        ": bad_signature: HMAC signature does not match for topic "
        f"dslo/{DEVICE}/ota; the hub may be using another device's key; send it "
        "again with --hmac-key-file set to this device's key, the file that its "
        "security.hmac_key_file names\n"
    ) in wrong_key.stderr
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


# Multi-head bundles


def multi_head_update(seed: int) -> bytes:
    return encode_multi_head_update(make_multi_head_update(seed, id_prefix="ota"))


def status_listener(broker: Broker) -> tuple[mqtt.Client, list[dict]]:
    """Subscribe to the device's OTA status topic and collect every status."""
    statuses: list[dict] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda _c, _u, message: statuses.append(
        json.loads(message.payload)
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe(ota_topics(Topics.for_device(DEVICE))[1], qos=1)
    assert subscribed.wait(10)
    return client, statuses


def link_targets(state: Path) -> dict[str, str]:
    bundles = state / "bundles"
    return {
        name: os.readlink(bundles / name)
        for name in ("active", "previous")
        if (bundles / name).is_symlink()
    }


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value)


def test_same_multi_head_bundle_installs_again(
    two_head_bundle, broker, tmp_path
) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    hub = hub_client(broker)
    daemon = start_daemon(
        tmp_path, two_head_bundle, broker, **{"training.tasks.shape": {"weight": 0.5}}
    )
    try:
        for seed in range(3):
            push(hub, daemon, multi_head_update(seed))
        adapted = daemon.student.get_weights()

        sent = ota_send(broker, two_head_bundle)

        installed = daemon.student.get_weights()
        bundle_path = daemon.bundle.path
        push(hub, daemon, multi_head_update(3))
        trainer = daemon.trainer
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()

    release = release_id(two_head_bundle)
    assert sent.returncode == 0, sent.stderr
    assert f"device {DEVICE} installed release {release}" in sent.stdout
    assert bundle_path == tmp_path / "state" / "bundles" / release
    assert_same_weights(installed, adapted)
    assert isinstance(trainer, MultiHeadTrainer)
    assert trainer.tasks["shape"].weight == 0.5
    assert trainer.applied_updates == 4


def test_task_table_blocks_switch_to_one_head(
    two_head_bundle, mlp_pair, broker, tmp_path
) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    state = tmp_path / "state"
    listener, statuses = status_listener(broker)
    hub = hub_client(broker)
    daemon = start_daemon(
        tmp_path, two_head_bundle, broker, **{"training.tasks.shape": {"weight": 0.5}}
    )
    try:
        installed = ota_send(broker, two_head_bundle)
        for seed in range(3):
            push(hub, daemon, multi_head_update(seed))
        links = link_targets(state)
        releases = sorted(os.listdir(state / "bundles"))
        checkpoints = checkpoint_files(state)
        adapted = daemon.student.get_weights()

        rejected = ota_send(broker, mlp_pair.bundle, "--allow-model-change")

        links_after = link_targets(state)
        releases_after = sorted(os.listdir(state / "bundles"))
        checkpoints_after = checkpoint_files(state)
        weights_after = daemon.student.get_weights()
        bundle_after = daemon.bundle.path
        statuses_after = len(statuses)
        # The broker would deliver an unacknowledged chunk again after a reconnect.
        connects = daemon.connection.connects
        daemon.connection.request_reconnect()
        wait_until(lambda: daemon.connection.connects > connects)
        time.sleep(2.0)
        statuses_after_reconnect = len(statuses)

        push(hub, daemon, multi_head_update(3))
        again = ota_send(broker, two_head_bundle)
        final = daemon.student.get_weights()
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()
        listener.loop_stop()
        listener.disconnect()

    assert installed.returncode == 0, installed.stderr
    assert rejected.returncode == 1, rejected.stderr
    assert ": config_mismatch: release " in rejected.stderr
    assert "[training.tasks.shape] names head 'shape'" in rejected.stderr
    assert "Change the device config first" in rejected.stderr
    status = statuses[statuses_after - 1]
    assert status["state"] == "rejected"
    assert status["reason"] == "config_mismatch"
    assert statuses_after_reconnect == statuses_after
    assert links_after == links
    assert links["active"] == release_id(two_head_bundle)
    assert releases_after == releases
    assert checkpoints_after == checkpoints
    assert not (state / KEPT_CHECKPOINTS).exists()
    assert bundle_after == state / "bundles" / release_id(two_head_bundle)
    assert_same_weights(weights_after, adapted)
    assert again.returncode == 0, again.stderr
    assert "installed release" in again.stdout

    restarted = EdgeDaemon(load_config(tmp_path / "device.toml"))
    restarted._restore()
    assert restarted.bundle.path == state / "bundles" / release_id(two_head_bundle)
    assert restarted.restored_from.startswith("checkpoint-")
    assert restarted.trainer.applied_updates == 4
    assert_same_weights(restarted.student.get_weights(), final)


def test_switch_between_one_and_two_heads(
    two_head_bundle, mlp_pair, broker, tmp_path
) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    state = tmp_path / "state"
    hub = hub_client(broker)
    daemon = start_daemon(tmp_path, two_head_bundle, broker)
    try:
        for seed in range(2):
            push(hub, daemon, multi_head_update(seed))
        adapted = daemon.student.get_weights()

        to_one = ota_send(broker, mlp_pair.bundle, "--allow-model-change")

        one_head_trainer = daemon.trainer
        push(hub, daemon, update(20))
        one_head_applied = daemon.trainer.applied_updates

        back = ota_send(broker, two_head_bundle, "--allow-model-change")

        restored = daemon.student.get_weights()
        push(hub, daemon, multi_head_update(2))
        two_head_trainer = daemon.trainer
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()

    assert to_one.returncode == 0, to_one.stderr
    assert f"installed release {release_id(mlp_pair.bundle)}" in to_one.stdout
    assert isinstance(one_head_trainer, Trainer)
    assert one_head_applied == 3
    kept = load_latest_checkpoint(
        state / KEPT_CHECKPOINTS / release_id(two_head_bundle)
    )
    assert kept is not None
    for name, value in adapted.items():
        np.testing.assert_array_equal(kept.tensors[WEIGHT_PREFIX + name], value)

    assert back.returncode == 0, back.stderr
    assert f"installed release {release_id(two_head_bundle)}" in back.stdout
    assert_same_weights(restored, adapted)
    assert isinstance(two_head_trainer, MultiHeadTrainer)
    assert two_head_trainer.applied_updates == 4


def test_unwritable_checkpoint_rolls_switch_back(mlp_pair, broker, tmp_path) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    state = tmp_path / "state"
    hub = hub_client(broker)
    daemon = start_daemon(tmp_path, mlp_pair.bundle, broker)
    try:
        for seed in range(2):
            push(hub, daemon, update(seed))
        adapted = daemon.student.get_weights()
        # A file where the checkpoint directory was makes every save fail.
        (state / "checkpoints").rename(state / "checkpoints.aside")
        (state / "checkpoints").write_text("not a directory")

        failed = ota_send(broker, mlp_pair.bundle)

        links = link_targets(state)
        releases = sorted(os.listdir(state / "bundles"))
        bundle_after = daemon.bundle.path
        weights_after = daemon.student.get_weights()
        (state / "checkpoints").unlink()
        (state / "checkpoints.aside").rename(state / "checkpoints")
        push(hub, daemon, update(2))
        applied = daemon.trainer.applied_updates
        outcomes = daemon.status_report()["model_updates"]
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()

    assert failed.returncode == 1, failed.stderr
    assert "rolled back" in failed.stderr
    assert outcomes == {
        "installed": 0,
        "rejected": {},
        "rolled_back": {"state_dir_write_failed": 1},
    }
    assert (
        f": state_dir_write_failed: cannot write a checkpoint of release "
        f"{release_id(mlp_pair.bundle)} to {state / 'checkpoints'}: File exists "
        f"(EEXIST) on {state / 'checkpoints'}; a file is where "
        f"{state / 'checkpoints'} or a folder in it belongs: move the file away, "
        "then send the release again\n"
    ) in failed.stderr
    assert links == {}
    assert releases == []
    assert bundle_after == mlp_pair.bundle
    assert_same_weights(weights_after, adapted)
    assert applied == 3


@pytest.mark.parametrize(
    ("folder", "role"),
    [
        ("bundles", "the folder of over-the-air releases"),
        ("ota", "the folder of incoming over-the-air transfers"),
    ],
)
def test_state_folder_file_rejects_update(
    mlp_pair, broker, tmp_path, caplog, folder: str, role: str
) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    state = tmp_path / "state"
    daemon = start_daemon(tmp_path, mlp_pair.bundle, broker)
    try:
        # A file appears where the daemon would create the folder.
        (state / folder).write_text("not a folder")
        with caplog.at_level(logging.WARNING):
            failed = ota_send(broker, mlp_pair.bundle)
        problems = [
            record for record in caplog.records if record.levelno >= logging.WARNING
        ]
        file_after = (state / folder).read_text()
        (state / folder).unlink()
        installed = ota_send(broker, mlp_pair.bundle)
        bundle_after = daemon.bundle.path
    finally:
        daemon.stop()

    detail = (
        f"{state / folder} in device.state_dir is a file, expected {role}; "
        "move the file away, then send the release again"
    )
    assert failed.returncode == 1, failed.stderr
    assert f"state_dir_invalid: {detail}" in failed.stderr
    # One line for the transfer, not one for each of its chunks.
    assert len(problems) == 1
    assert problems[0].levelno == logging.ERROR
    assert detail in problems[0].getMessage()
    assert problems[0].exc_info is None
    assert file_after == "not a folder"
    assert installed.returncode == 0, installed.stderr
    assert bundle_after.parent == state / "bundles"


def test_malformed_transfer_logs_one_line(mlp_pair, broker, tmp_path, caplog) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    daemon = start_daemon(tmp_path, mlp_pair.bundle, broker)
    listener, statuses = status_listener(broker)
    hub = hub_client(broker)
    chunk_topic = ota_topics(Topics.for_device(DEVICE))[0]
    # Chunks of a sender with format version 2, which this device cannot read.
    chunks = [
        chunk[:4] + b"\x02" + chunk[5:]
        for chunk in split_archive(pack_bundle(mlp_pair.bundle), 8192)
    ]
    try:
        with caplog.at_level(logging.WARNING):
            for chunk in chunks:
                hub.publish(chunk_topic, chunk, qos=1).wait_for_publish(10)
            wait_until(lambda: len(statuses) == len(chunks))
        bundle_after = daemon.bundle.path
        outcomes = daemon.status_report()["model_updates"]
    finally:
        daemon.stop()
        for client in (hub, listener):
            client.loop_stop()
            client.disconnect()

    problems = [
        record for record in caplog.records if record.levelno >= logging.WARNING
    ]
    transfer = chunks[0][5:21].hex()
    assert len(chunks) == 7
    assert len(problems) == 1
    assert (
        problems[0]
        .getMessage()
        .startswith(
            f"Rejected model transfer {transfer} (malformed): chunk starts with "
            "b'DSLB' version 2, expected b'DSLB' version 1"
        )
    )
    assert {status["reason"] for status in statuses} == {"malformed"}
    # Seven rejected chunks of one transfer count once.
    assert outcomes == {"installed": 0, "rejected": {"malformed": 1}, "rolled_back": {}}
    assert bundle_after == mlp_pair.bundle


def start_daemon_process(config: Path, log: Path) -> subprocess.Popen:
    """Start ``dslo-edge run`` in a process that file permissions apply to.

    Root ignores file permissions, so as root the daemon runs without the
    capabilities that override them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
    """
    command = [sys.executable, "-m", "dslo_edge.cli", "run", "--config", str(config)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root ignores file permissions, and setpriv is missing")
        capabilities = "--bounding-set=-dac_override,-dac_read_search"
        command = [setpriv, "--inh-caps=-all", capabilities, *command]
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "wb") as stream:
        return subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, env=environment
        )


def online_event(broker: Broker) -> tuple[mqtt.Client, threading.Event]:
    """Subscribe to the device's status topic; the event is set on "online"."""
    online = threading.Event()
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_subscribe = lambda *_: subscribed.set()

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        if message.payload == b"online":
            online.set()

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe(Topics.for_device(DEVICE).status, qos=1)
    assert subscribed.wait(10)
    return client, online


@pytest.mark.parametrize(
    ("folder", "action"),
    [("ota", "store the transfer in"), ("bundles", "unpack the release into")],
)
def test_unwritable_state_folder_rejects_update(
    mlp_pair, mosquitto, tmp_path, folder: str, action: str
) -> None:
    state = tmp_path / "state"
    (state / folder).mkdir(parents=True)
    (state / folder).chmod(0o555)
    config = tmp_path / "device.toml"
    config.write_text(render_config(DEVICE, mlp_pair.bundle, state, mosquitto.port))
    log = tmp_path / "daemon.log"
    watcher, online = online_event(mosquitto)
    daemon = start_daemon_process(config, log)
    try:
        assert online.wait(60), log.read_text()

        failed = ota_send(mosquitto, mlp_pair.bundle)

        running_after_failure = daemon.poll() is None
        (state / folder).chmod(0o755)
        installed = ota_send(mosquitto, mlp_pair.bundle)
    finally:
        daemon.terminate()
        daemon.wait(30)
        watcher.loop_stop()
        watcher.disconnect()
        (state / folder).chmod(0o755)

    output = log.read_text()
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert failed.returncode == 1, failed.stderr
    assert f"error: device {DEVICE} rejected transfer " in failed.stderr
    assert (
        f": state_dir_write_failed: cannot {action} {state / folder}: "
        f"Permission denied (EACCES) on {state / folder}/"
    ) in failed.stderr
    assert f"write access to {state / folder}, for example with 'chown -R " in (
        failed.stderr
    )
    assert failed.stderr.endswith(", then send the release again\n")
    assert len(errors) == 1, output
    assert f"cannot {action} {state / folder}: Permission denied" in errors[0]
    assert "Traceback" not in output
    assert running_after_failure
    assert installed.returncode == 0, installed.stderr
    assert f"device {DEVICE} installed release {release_id(mlp_pair.bundle)}" in (
        installed.stdout
    )


def test_label_requests_block_switch_to_two_heads(
    mlp_pair, two_head_bundle, broker, tmp_path
) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    state = tmp_path / "state"
    daemon = start_daemon(tmp_path, mlp_pair.bundle, broker, requests={"enabled": True})
    try:
        weights = daemon.student.get_weights()

        rejected = ota_send(broker, two_head_bundle, "--allow-model-change")

        weights_after = daemon.student.get_weights()
        bundle_after = daemon.bundle.path
        trainer = daemon.trainer
    finally:
        daemon.stop()

    assert rejected.returncode == 1, rejected.stderr
    assert ": config_mismatch: release " in rejected.stderr
    assert "requests.enabled = true needs a single-head student" in rejected.stderr
    assert link_targets(state) == {}
    assert sorted(os.listdir(state / "bundles")) == []
    assert bundle_after == mlp_pair.bundle
    assert isinstance(trainer, Trainer)
    assert_same_weights(weights_after, weights)


def test_full_chunk_queue_reconnects_for_rest(
    mlp_pair, broker, tmp_path, caplog
) -> None:
    if broker.kind != "mosquitto":
        return  # the daemon's default protocol here is MQTT 5
    new_bundle = tmp_path / "new-bundle"
    shutil.copytree(mlp_pair.bundle, new_bundle)
    listener, statuses = status_listener(broker)
    daemon = start_daemon(tmp_path, mlp_pair.bundle, broker)
    # The trainer empties the queue once per loop, so a queue of 4 fills at once.
    daemon.ota_chunks = UpdateQueue(4, OTA_QUEUE_BYTES)
    hub = hub_client(broker)
    try:
        with caplog.at_level(logging.INFO):
            transfer = send_bundle(
                hub, Topics.for_device(DEVICE), new_bundle, chunk_bytes=4096
            )
            # Each reconnect brings at least 4 more chunks, so on a loaded
            # machine the 13 chunks may take several slow rounds.
            wait_until(lambda: statuses, timeout=120)
    finally:
        daemon.stop()
        hub.loop_stop()
        hub.disconnect()
        listener.loop_stop()
        listener.disconnect()

    messages = [record.getMessage() for record in caplog.records]
    assert statuses[-1]["state"] == "installed"
    assert statuses[-1]["transfer"] == transfer
    assert daemon.bundle.path.parent == tmp_path / "state" / "bundles"
    full = [
        text
        for text in messages
        if text.startswith(f"Device {DEVICE} model update chunk queue is full")
    ]
    assert full
    assert full[0].startswith(
        f"Device {DEVICE} model update chunk queue is full (4 of at most 4 chunks, "
    )
    assert full[0].endswith(
        f" of at most {OTA_QUEUE_BYTES} bytes); leaving chunks for "
        "redelivery after the queue drains"
    )
    assert (
        f"Device {DEVICE} reconnects to receive the updates it left queued"
    ) in messages
    # A reconnect that the daemon requests is no failure, so no backoff.
    assert not [text for text in messages if "unavailable" in text]
    # Chunks sent again after the last reconnect start no second transfer.
    receiving = [text for text in messages if text.startswith("Receiving model")]
    assert receiving == [
        f"Receiving model transfer {transfer}: 51200 bytes in 13 chunks"
    ]
