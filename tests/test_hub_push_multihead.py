"""Scheduled pushes of the hub service for a student with several heads.

The worker labels the dataset with every head of the teacher and publishes
format version 3 updates, which a two-head daemon trains on. The runs are
claimed, stored and resumed like single-head runs.
"""

from __future__ import annotations

import dataclasses
import queue
import signal
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.errors import ConfigError
from dslo_edge.hub_config import TeacherSettings, load_hub_config
from dslo_edge.hub_multihead import MultiHeadTeacherModel, head_output_kinds
from dslo_edge.hub_service import HubWorker
from dslo_edge.hub_state import HubState
from dslo_edge.hub_teacher import TeacherRegistry
from dslo_edge.multihead_decode import decode_multi_head_update
from dslo_edge.multihead_protocol import MultiHeadUpdate
from dslo_edge.privacy import PrivacySettings
from tests.hub_fleet import start_worker
from tests.mqtt_proxy import PubackProxy
from tests.multihead_bundle import HEADS
from tests.test_daemon import DEVICE, hub_client, wait_processed, write_config
from tests.test_hub_push_batches import stored_rows, wait_for_rows
from tests.test_hub_push_resume import stop, wait_for_log, wait_for_updates
from tests.test_hub_service import device_updates, nightly_push_config, start_online

pytestmark = pytest.mark.slow

REQUESTS_OFF = {"requests": "enabled = false"}


def write_push_config(
    folder: Path, port: int, bundle: Path, devices: list[str], extra=None
) -> tuple[Path, np.ndarray]:
    """Write a nightly push of 40 samples in batches of 16 to ``devices``.

    Returns the config file and the samples.
    """
    x = np.random.default_rng(3).random((40, 64), dtype=np.float32)
    config = nightly_push_config(
        folder, port, bundle, x, {**REQUESTS_OFF, **(extra or {})}
    )
    names = ", ".join(f'"{device}"' for device in devices)
    config.write_text(
        config.read_text().replace('devices = ["kitchen"]', f"devices = [{names}]")
    )
    return config, x


def decoded(received: queue.Queue, count: int) -> list[MultiHeadUpdate]:
    return [decode_multi_head_update(received.get(timeout=30)) for _ in range(count)]


def teacher_outputs(bundle: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    loaded = load_bundle(bundle)
    teacher = MultiHeadTeacherModel(
        loaded.teacher_path, head_output_kinds(loaded.manifest)
    )
    return teacher.predict(x)


@pytest.mark.parametrize("hard_labels", [False, True], ids=["soft", "hard"])
def test_scheduled_push_trains_two_head_daemon(
    two_head_bundle, mosquitto, tmp_path, caplog, hard_labels
) -> None:
    # "ghost" never connects, so the broker drops its updates unread.
    folder = tmp_path / "hub"
    config, x = write_push_config(
        folder, mosquitto.port, two_head_bundle, [DEVICE, "ghost"]
    )
    rng = np.random.default_rng(4)
    head_y = {
        name: rng.integers(0, classes, len(x), dtype=np.int32)
        for name, classes in HEADS.items()
    }
    if hard_labels:
        arrays = {f"y_{name}": labels for name, labels in head_y.items()}
        np.savez(folder / "data.npz", x=x, **arrays)
        config.write_text(config.read_text() + "hard_labels = true\n")
    daemon = EdgeDaemon(write_config(tmp_path, two_head_bundle, mosquitto))
    daemon.start()
    device = hub_client(mosquitto)
    client, received = device_updates(mosquitto.port, DEVICE)
    worker = HubWorker(load_hub_config(config, "w1"))
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    try:
        wait_processed(device, 0)
        worker.start()
        updates = decoded(received, 3)
        metrics = wait_processed(device, 3)
        deadline = time.monotonic() + 30
        while worker.pushes.counters()["runs"] < 1:
            assert time.monotonic() < deadline, "the run did not end"
            time.sleep(0.1)
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()
        device.close()
        daemon.stop()

    expected = teacher_outputs(two_head_bundle, x)
    assert [update.sample_count for update in updates] == [16, 16, 8]
    assert {update.teacher_round for update in updates} == {1}
    np.testing.assert_array_equal(
        np.concatenate([update.inputs for update in updates]), x
    )
    for name, classes in HEADS.items():
        labels = np.concatenate([update.heads[name].labels for update in updates])
        assert labels.shape == (40, classes)
        np.testing.assert_allclose(labels, expected[name], rtol=0, atol=1e-6)
        assert {update.heads[name].label_kind for update in updates} == {
            "probabilities"
        }
        sent = [update.heads[name].hard_labels for update in updates]
        if hard_labels:
            np.testing.assert_array_equal(np.concatenate(sent), head_y[name])
        else:
            assert sent == [None, None, None]
    assert metrics["applied"] == 3
    assert metrics["samples_applied"] == 40
    assert metrics["rejected"] == {}
    assert metrics["teacher"]["shape"]["latest_round"] == 1.0
    counters = worker.pushes.counters()
    assert counters["updates"] == 3
    assert counters["skipped_devices"] == 1
    assert (
        "Push nightly to device ghost failed: the broker dropped all 3 updates "
        "unread, because no client subscribes to dslo/ghost/updates"
    ) in caplog.text


def test_killed_multi_head_push_resumes(two_head_bundle, mosquitto, tmp_path) -> None:
    devices = ["kitchen", "porch", "garage"]
    # The broker delivers porch's third update, but w1 never gets its PUBACK.
    proxy = PubackProxy(mosquitto.port, "dslo/porch/updates", acknowledged=2)
    folder = tmp_path / "hub"
    config, x = write_push_config(folder, proxy.port, two_head_bundle, devices)
    state_file = folder / "state.sqlite"
    subscribers = {name: device_updates(mosquitto.port, name) for name in devices}
    received = {name: queue_ for name, (_, queue_) in subscribers.items()}
    logs = [tmp_path / "w1-first.log", tmp_path / "w1-second.log"]
    try:
        first = start_worker(config, "w1", logs[0])
        try:
            wait_for_rows(state_file, "porch", [(0, 1), (1, 1), (2, 0)], first)
            wait_for_updates(received["porch"], 3)
        finally:
            stop(first, signal.SIGKILL)
        proxy.forward_all()
        first_run = {name: _drain(received[name]) for name in devices}

        second = start_worker(config, "w1", logs[1])
        try:
            resumed_log = wait_for_log(logs[1], "Push nightly sent", second)
            wait_for_updates(received["garage"], 3)
            time.sleep(0.5)
        finally:
            stop(second, signal.SIGTERM)
        resumed = {name: _drain(received[name]) for name in devices}
    finally:
        proxy.close()
        for client, _ in subscribers.values():
            client.disconnect()
            client.loop_stop()

    assert [len(payloads) for payloads in first_run.values()] == [3, 3, 0]
    assert resumed["kitchen"] == []
    # porch's third update again, byte for byte, so porch skips it by its id.
    assert resumed["porch"] == [first_run["porch"][2]]
    assert (
        "Push nightly resumes device porch after batch 3: skips 2 acknowledged "
        "before the stop and publishes 1 again unchanged"
    ) in resumed_log
    garage = [decode_multi_head_update(payload) for payload in resumed["garage"]]
    assert [update.sample_count for update in garage] == [16, 16, 8]
    expected = teacher_outputs(two_head_bundle, x)
    for name in HEADS:
        labels = np.concatenate([update.heads[name].labels for update in garage])
        np.testing.assert_allclose(labels, expected[name], rtol=0, atol=1e-6)
    state = HubState(state_file, "reader")
    try:
        left = state.take_unfinished_run("nightly", time.time())
    finally:
        state.close()
    assert left is None
    assert stored_rows(state_file, "porch") == []


def _drain(received: queue.Queue) -> list[bytes]:
    payloads = []
    while not received.empty():
        payloads.append(received.get())
    return payloads


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            {"requests": "enabled = true"},
            [
                "requests.enabled = true (the default) is invalid, because "
                "teacher.path {bundle} is a bundle whose student has several "
                "heads (digit, shape), and the hub serves label requests",
                "set enabled = false in the [requests] table",
            ],
        ),
        (
            {"privacy": "noise_multiplier = 8.0\nepsilon_budget = 20.0"},
            [
                "the [privacy] table is invalid, because the student has "
                "several heads (digit, shape)",
                "remove the [privacy] table",
            ],
        ),
        (
            {"push": "hard_labels = true"},
            [
                "[[push]] 'nightly': {folder}/data.npz has a single y, but the "
                "student has several heads; expected one label array per head "
                "of the student (y_digit, y_shape), written by "
                "numpy.savez(path, x=x, y_digit=..., y_shape=...), and no y",
            ],
        ),
        (
            {"teacher": 'output_kind = "probabilities"'},
            [
                "teacher.output_kind = 'probabilities' is invalid, because "
                "teacher.path {bundle} is a bundle whose student has several heads",
                "remove teacher.output_kind",
            ],
        ),
    ],
    ids=["requests", "privacy", "hard_labels", "output_kind"],
)
def test_multi_head_config_rejects(two_head_bundle, tmp_path, extra, expected) -> None:
    sections = dict(extra)
    push_lines = sections.pop("push", None)
    folder = tmp_path / "hub"
    config, x = write_push_config(folder, 1883, two_head_bundle, ["porch"], sections)
    if push_lines is not None:
        np.savez(folder / "data.npz", x=x, y=np.zeros(len(x), np.int32))
        config.write_text(config.read_text() + push_lines + "\n")

    with pytest.raises(ConfigError) as caught:
        load_hub_config(config, "w1")

    message = str(caught.value)
    assert message.startswith(f"{config}: ")
    for part in expected:
        assert part.format(bundle=two_head_bundle, folder=folder) in message


def test_registry_rejects_output_kind_for_heads(two_head_bundle, tmp_path) -> None:
    # A configuration built in code skips load_hub_config, and a bundle
    # swapped in later is not checked there, so the registry checks again.
    settings = TeacherSettings(two_head_bundle, output_kind="probabilities")
    state = HubState(tmp_path / "hub.sqlite", "w1")

    with pytest.raises(ConfigError) as caught:
        TeacherRegistry(settings, state)
    state.close()

    assert str(caught.value) == (
        "teacher.output_kind = 'probabilities' is invalid, because teacher.path "
        f"{two_head_bundle} is a bundle whose student has several heads "
        "(digit, shape) and its manifest names each head's teacher output kind; "
        "remove teacher.output_kind and restart the hub"
    )


def test_registry_class_count_needs_one_head(two_head_bundle, tmp_path) -> None:
    state = HubState(tmp_path / "hub.sqlite", "w1")
    registry = TeacherRegistry(TeacherSettings(two_head_bundle), state)

    with pytest.raises(ConfigError) as caught:
        _ = registry.class_count
    state.close()

    assert str(caught.value) == (
        f"the teacher at {two_head_bundle} has several heads, and label requests "
        "are served for single-head teachers only; set requests.enabled = false, "
        "so that the worker runs only the [[push]] schedules"
    )


def test_multi_head_teacher_file_names_bundle(two_head_bundle, tmp_path) -> None:
    # Only the manifest names the heads' output kinds, so the hub needs the
    # bundle directory and not the teacher.tflite of such a bundle.
    teacher = tmp_path / "teacher.tflite"
    teacher.write_bytes(load_bundle(two_head_bundle).teacher_path.read_bytes())
    extra = {"teacher": 'output_kind = "probabilities"'}
    config, _ = write_push_config(tmp_path / "hub", 1883, teacher, ["porch"], extra)

    with pytest.raises(ConfigError) as caught:
        load_hub_config(config, "w1")

    message = str(caught.value)
    assert "has no matching teacher signature" in message
    assert "'output_digit', 'output_shape'" in message
    assert "a student with several heads (digit, shape)" in message
    assert "name the bundle directory as the hub's teacher.path" in message
    assert "pass a teacher file that 'dslo-edge convert' wrote" not in message


def test_push_in_code_with_privacy_sends_nothing(two_head_bundle, tmp_path) -> None:
    config, _ = write_push_config(tmp_path / "hub", 1883, two_head_bundle, ["porch"])
    loaded = load_hub_config(config, "w1")
    # A HubConfig built in code is not checked like a loaded one.
    settings = PrivacySettings(noise_multiplier=8.0, epsilon_budget=20.0)
    worker = HubWorker(dataclasses.replace(loaded, privacy=settings))
    try:
        with pytest.raises(ConfigError, match=r"the \[privacy\] table is invalid"):
            worker.pushes.run_once(loaded.pushes[0])
    finally:
        worker.state.close()
        worker._lock.release()


def test_worker_without_requests_not_subscribed(
    two_head_bundle, mosquitto, tmp_path
) -> None:
    config, _ = write_push_config(
        tmp_path / "hub", mosquitto.port, two_head_bundle, ["porch"]
    )
    worker = HubWorker(load_hub_config(config, "w1"))
    reason_codes: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_publish = lambda _c, _u, _mid, code, _p: reason_codes.put(code.value)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        # The worker reports itself online after its subscriptions.
        start_online(worker, mosquitto.port)
        client.publish("dslo/porch/requests", b"DSLQ", qos=1)
        reason_code = reason_codes.get(timeout=10)
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()

    # 16: no matching subscribers, so no worker receives the request.
    assert reason_code == 16
    assert worker.counters["requests"] == 0
