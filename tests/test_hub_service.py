"""A hub worker in this process: teacher reload, pushes and bad requests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from dslo_edge import hub_push_batches
from dslo_edge.broker import Broker, find_mosquitto
from dslo_edge.bundle import load_bundle
from dslo_edge.cli import EXIT_CONFIG, main
from dslo_edge.connection import packet_size_limit
from dslo_edge.errors import ConfigError
from dslo_edge.hub import default_sample_ids
from dslo_edge.hub_batch import Incoming
from dslo_edge.hub_config import (
    HubConfig,
    PushSchedule,
    TeacherSettings,
    load_hub_config,
)
from dslo_edge.hub_service import HubWorker, _takeover_fix
from dslo_edge.hub_state import HubState
from dslo_edge.hub_teacher import TeacherRegistry
from dslo_edge.label_protocol import (
    LabelRequest,
    encode_request,
    request_properties,
    user_properties,
)
from dslo_edge.label_requests import RequestSettings
from dslo_edge.privacy import epsilon_spent
from dslo_edge.protocol import decode_update
from dslo_edge.repeat_log import RepeatLimiter
from dslo_edge.signing import generate_key_file, load_key, verify
from tests.hub_fleet import (
    HubWatcher,
    SimulatedDevice,
    drain_inbox,
    subscribed_client,
    wait_online,
    write_hub_config,
)


def start_online(worker: HubWorker, port: int) -> None:
    """Start the worker and wait until it reports itself online (subscribed)."""
    watcher = HubWatcher(port)
    try:
        worker.start()
        wait_online(watcher, [worker.config.worker_id])
    finally:
        watcher.close()


def serve_one_request(device: SimulatedDevice, inbox: queue.Queue) -> int:
    """Send requests until one is labelled; return the teacher round it had."""
    rounds: list[int] = []
    original = device.trainer.apply

    def apply(update):
        rounds.append(update.teacher_round)
        return original(update)

    device.trainer.apply = apply
    deadline = time.monotonic() + 15
    while not rounds and time.monotonic() < deadline:
        device.step()
        drain_inbox(inbox, timeout=0.3)
    device.trainer.apply = original
    assert rounds, "no request was labelled within 15 s"
    return rounds[-1]


def test_new_teacher_file_bumps_round(mlp_pair, mosquitto, tmp_path) -> None:
    teacher = tmp_path / "teacher.tflite"
    shutil.copy(load_bundle(mlp_pair.bundle).teacher_path, teacher)
    extra = {"teacher": 'output_kind = "probabilities"'}
    config = write_hub_config(tmp_path / "hub", mosquitto.port, teacher, extra)
    worker = HubWorker(load_hub_config(config, "w1"))
    watcher = HubWatcher(mosquitto.port)
    inbox: queue.Queue = queue.Queue()
    device = None
    worker.start()
    try:
        watcher.wait_for(lambda w: (w.teacher or {}).get("round") == 1)
        device = SimulatedDevice(
            0, load_bundle(mlp_pair.bundle), mosquitto.port, inbox, RequestSettings()
        )
        assert serve_one_request(device, inbox) == 1
        # Trailing bytes change the file's sha256 but not the model.
        with teacher.open("ab") as stream:
            stream.write(b"\0" * 16)
        watcher.wait_for(lambda w: (w.teacher or {}).get("round") == 2)
        assert watcher.teacher["version"].startswith("teacher-")
        assert serve_one_request(device, inbox) == 2
    finally:
        if device is not None:
            device.close()
        worker.stop()
        watcher.close()


def nightly_push_config(
    folder: Path, port: int, teacher: Path, x: np.ndarray, extra=None
) -> Path:
    """Write x to data.npz and a hub config that pushes it to device kitchen."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "data.npz", x=x)
    config = write_hub_config(folder, port, teacher, extra)
    push = (
        '\n[[push]]\nname = "nightly"\ndevices = ["kitchen"]\ndata = "data.npz"\n'
        "every_s = 3600\nbatch_size = 16\n"
    )
    config.write_text(config.read_text() + push)
    return config


def device_updates(port: int, device: str) -> tuple[mqtt.Client, queue.Queue]:
    """Subscribe to a device's updates and return the client and a payload queue."""
    return subscribed_client(
        port, f"dslo/{device}/updates", lambda message: message.payload
    )


def kitchen_updates(port: int) -> tuple[mqtt.Client, queue.Queue]:
    """Subscribe to device kitchen's updates and return the client and its queue."""
    return device_updates(port, "kitchen")


def worker_with_teacher_copy(bundle: Path, tmp_path: Path) -> tuple[Path, HubWorker]:
    """Return a copy of the bundle's teacher and a worker that serves it."""
    teacher = tmp_path / "teacher.tflite"
    shutil.copy(load_bundle(bundle).teacher_path, teacher)
    extra = {"teacher": 'output_kind = "probabilities"'}
    config = write_hub_config(tmp_path / "hub", 1883, teacher, extra)
    return teacher, HubWorker(load_hub_config(config, "w1"))


def copy_bundle_with_new_teacher(bundle: Path, target: Path) -> str:
    """Copy a bundle whose teacher has trailing bytes; return the new sha256."""
    shutil.copytree(bundle, target)
    teacher = target / "teacher.tflite"
    with teacher.open("ab") as stream:
        stream.write(b"\0" * 16)
    content = teacher.read_bytes()
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["teacher"]["sha256"] = hashlib.sha256(content).hexdigest()
    manifest["teacher"]["bytes"] = len(content)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return manifest["teacher"]["sha256"]


def test_bundle_symlink_swap_loads_teacher(mlp_pair, tmp_path) -> None:
    first = tmp_path / "bundle-v1"
    shutil.copytree(mlp_pair.bundle, first)
    second_sha256 = copy_bundle_with_new_teacher(mlp_pair.bundle, tmp_path / "v2")
    link = tmp_path / "bundle"
    link.symlink_to(first.name)
    config = write_hub_config(tmp_path / "hub", 1883, link)
    worker = HubWorker(load_hub_config(config, "w1"))
    first_version = worker.teacher.current

    # rename(2) cannot replace a directory that has files, so a bundle is
    # swapped by replacing a symbolic link to it.
    with pytest.raises(OSError):
        os.rename(tmp_path / "v2", first)
    (tmp_path / "bundle.tmp").symlink_to("v2")
    os.replace(tmp_path / "bundle.tmp", link)
    loaded = worker.teacher.reload_if_changed(force=True)
    worker.state.close()

    assert loaded is True
    assert first_version.round == 1
    assert worker.teacher.current.identity == second_sha256
    assert worker.teacher.current.round == 2
    assert worker.teacher.current.version == f"bundle-{second_sha256[:12]}"


def test_removed_bundle_is_named_missing(mlp_pair, tmp_path, caplog) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(mlp_pair.bundle, bundle)
    config = write_hub_config(tmp_path / "hub", 1883, bundle)
    worker = HubWorker(load_hub_config(config, "w1"))
    first_version = worker.teacher.current

    shutil.rmtree(bundle)
    with caplog.at_level(logging.WARNING, logger="dslo_edge.hub_teacher"):
        loaded = worker.teacher.reload_if_changed(force=True)
    worker.state.close()

    assert loaded is False
    assert worker.teacher.current == first_version
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith(
        f"Teacher at {bundle} is not loadable (teacher.path {bundle} does not "
        "exist; put the bundle directory or teacher file back"
    )
    assert "output_kind" not in messages[0]


def copy_teacher_only(bundle: Path, target: Path) -> Path:
    """Copy a bundle without its student file, as a hub would hold it."""
    shutil.copytree(bundle, target)
    (target / "student.tflite").unlink()
    return target


def test_bundle_without_student_serves_teacher(mlp_pair, tmp_path) -> None:
    first = copy_teacher_only(mlp_pair.bundle, tmp_path / "v1")
    second_sha256 = copy_bundle_with_new_teacher(first, tmp_path / "v2")
    link = tmp_path / "bundle"
    link.symlink_to(first.name)
    x = np.random.default_rng(5).random((4, 64), dtype=np.float32)
    config = nightly_push_config(tmp_path / "hub", 1883, link, x)
    worker = HubWorker(load_hub_config(config, "w1"))
    first_version = worker.teacher.current
    labels = worker.teacher.predict(x)

    (tmp_path / "bundle.tmp").symlink_to("v2")
    os.replace(tmp_path / "bundle.tmp", link)
    loaded = worker.teacher.reload_if_changed(force=True)
    worker.state.close()

    manifest = json.loads((first / "manifest.json").read_text())
    assert not (first / "student.tflite").exists()
    assert first_version.identity == manifest["teacher"]["sha256"]
    assert labels.shape == (4, 10)
    assert np.allclose(labels.sum(axis=1), 1.0, atol=1e-5)
    assert loaded is True
    assert worker.teacher.current.identity == second_sha256


def test_bundle_without_student_checks_teacher(mlp_pair, tmp_path) -> None:
    bundle = copy_teacher_only(mlp_pair.bundle, tmp_path / "bundle")
    with open(bundle / "teacher.tflite", "ab") as teacher:
        teacher.write(b"x")
    config = write_hub_config(tmp_path / "hub", 1883, bundle)

    result = CliRunner().invoke(main, ["hub", "--config", str(config)])

    assert result.exit_code == EXIT_CONFIG
    assert f"checksum mismatch for {bundle / 'teacher.tflite'}" in result.output
    assert "student.tflite" not in result.output


def swap_to_logits_bundle(
    mlp_pair, logits_teacher: Path, tmp_path: Path, extra=None
) -> HubWorker:
    """Start a worker on a bundle link, then point the link at a logits bundle."""
    first = tmp_path / "bundle-v1"
    shutil.copytree(mlp_pair.bundle, first)
    shutil.copytree(mlp_pair.bundle, tmp_path / "v2")
    content = logits_teacher.read_bytes()
    (tmp_path / "v2" / "teacher.tflite").write_bytes(content)
    manifest_path = tmp_path / "v2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["teacher"]["output_kind"] = "logits"
    manifest["teacher"]["sha256"] = hashlib.sha256(content).hexdigest()
    manifest["teacher"]["bytes"] = len(content)
    manifest_path.write_text(json.dumps(manifest))
    link = tmp_path / "bundle"
    link.symlink_to(first.name)
    config = write_hub_config(tmp_path / "hub", 1883, link, extra)
    worker = HubWorker(load_hub_config(config, "w1"))
    (tmp_path / "bundle.tmp").symlink_to("v2")
    os.replace(tmp_path / "bundle.tmp", link)
    return worker


def test_registry_needs_kind_for_model_file(logits_teacher, tmp_path) -> None:
    # load_hub_config rejects this too, but a configuration built in code
    # reaches the registry unchecked.
    state = HubState(tmp_path / "hub.sqlite", "w1")

    with pytest.raises(ConfigError) as caught:
        TeacherRegistry(TeacherSettings(logits_teacher), state)
    state.close()

    assert str(caught.value) == (
        f"missing teacher.output_kind, which teacher.path {logits_teacher} needs "
        "because it is a model file, not a bundle whose manifest names the kind; "
        "set it to 'probabilities' or 'logits'"
    )


def test_swapped_bundle_output_kind_checked(
    mlp_pair, logits_teacher, tmp_path, caplog
) -> None:
    extra = {"teacher": 'output_kind = "probabilities"'}
    worker = swap_to_logits_bundle(mlp_pair, logits_teacher, tmp_path, extra)
    first = worker.teacher.current
    caplog.set_level("WARNING", logger="dslo_edge.hub_teacher")

    loaded = worker.teacher.reload_if_changed(force=True)
    time.sleep(0.6)  # write_hub_config sets reload_poll_s = 0.5.
    loaded_again = worker.teacher.reload_if_changed()
    worker.state.close()

    assert loaded is False
    assert loaded_again is False
    assert worker.teacher.current == first
    assert worker.teacher.current.output_kind == "probabilities"
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert (
        f"teacher.output_kind = 'probabilities' contradicts the bundle "
        f"{tmp_path / 'bundle'}, whose manifest says its teacher outputs 'logits'"
    ) in messages[0]
    assert f"keeping {first.version}" in messages[0]


def test_swapped_bundle_brings_its_output_kind(
    mlp_pair, logits_teacher, tmp_path
) -> None:
    worker = swap_to_logits_bundle(mlp_pair, logits_teacher, tmp_path)
    first = worker.teacher.current

    loaded = worker.teacher.reload_if_changed(force=True)
    worker.state.close()

    assert first.output_kind == "probabilities"
    assert loaded is True
    assert worker.teacher.current.output_kind == "logits"
    assert json.loads(worker.teacher.current.announcement())["output_kind"] == (
        "logits"
    )


def test_teacher_for_another_model_is_not_loaded(mlp_pair, tmp_path, caplog) -> None:
    keras = pytest.importorskip("keras")
    from converters.bundle import convert_teacher

    teacher, worker = worker_with_teacher_copy(mlp_pair.bundle, tmp_path)
    first = worker.teacher.current
    five_classes = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(5, activation="softmax")]
    )
    convert_teacher(five_classes, teacher)
    caplog.set_level("ERROR", logger="dslo_edge.hub_teacher")

    loaded = worker.teacher.reload_if_changed(force=True)

    assert loaded is False
    assert worker.teacher.current == first
    assert worker.teacher.predict(np.zeros((2, 64), np.float32)).shape == (2, 10)
    assert "takes inputs (64,) and gives 5 classes, but" in caplog.text
    assert f"keeping {first.version}" in caplog.text


def test_logits_file_under_probabilities_not_loaded(
    mlp_pair, logits_teacher, tmp_path, caplog
) -> None:
    teacher, worker = worker_with_teacher_copy(mlp_pair.bundle, tmp_path)
    first = worker.teacher.current
    shutil.copy(logits_teacher, teacher)
    caplog.set_level("WARNING", logger="dslo_edge.hub_teacher")

    loaded = worker.teacher.reload_if_changed(force=True)
    worker.state.close()

    assert loaded is False
    assert worker.teacher.current == first
    assert (
        f"teacher.path {teacher} computes its 'output' output with a "
        "FULLY_CONNECTED op, so it outputs logits, but teacher.output_kind is "
        "'probabilities'"
    ) in caplog.text
    assert f"keeping {first.version}" in caplog.text


def test_logits_file_under_probabilities_stops_start(logits_teacher, tmp_path) -> None:
    teacher = tmp_path / "teacher.tflite"
    shutil.copy(logits_teacher, teacher)
    extra = {"teacher": 'output_kind = "probabilities"'}
    config = write_hub_config(tmp_path / "hub", 1883, teacher, extra)

    # The worker is only built, never started, so it connects to no broker.
    with pytest.raises(ConfigError) as caught:
        HubWorker(load_hub_config(config, "w1"))

    message = str(caught.value)
    assert f"teacher.path {teacher} computes its 'output' output" in message
    assert "but teacher.output_kind is 'probabilities'" in message
    assert message.endswith(
        "; set teacher.output_kind = 'logits' if this file is the teacher, or "
        "use a teacher whose last Keras layer ends in softmax"
    )


def with_unknown_opcode(content: bytes) -> bytes:
    """Return a copy of a model whose last op names an opcode it does not list."""
    flatbuffers = pytest.importorskip("flatbuffers")
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    model = schema.ModelT.InitFromPackedBuf(content, 0)
    model.subgraphs[0].operators[-1].opcodeIndex = len(model.operatorCodes)
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_corrupt_teacher_file_stops_start(logits_teacher, tmp_path) -> None:
    teacher = tmp_path / "teacher.tflite"
    teacher.write_bytes(with_unknown_opcode(logits_teacher.read_bytes()))
    extra = {"teacher": 'output_kind = "logits"'}
    config = write_hub_config(tmp_path / "hub", 1883, teacher, extra)

    with pytest.raises(ConfigError) as caught:
        HubWorker(load_hub_config(config, "w1"))

    message = str(caught.value)
    assert f"cannot load teacher.path {teacher}" in message
    assert "the interpreter cannot load the model" in message


def test_corrupt_teacher_file_is_not_loaded(mlp_pair, tmp_path, caplog) -> None:
    teacher, worker = worker_with_teacher_copy(mlp_pair.bundle, tmp_path)
    first = worker.teacher.current
    teacher.write_bytes(with_unknown_opcode(teacher.read_bytes()))
    caplog.set_level("WARNING", logger="dslo_edge.hub_teacher")

    loaded = worker.teacher.reload_if_changed(force=True)
    worker.state.close()

    assert loaded is False
    assert worker.teacher.current == first
    assert "the interpreter cannot load the model" in caplog.text
    assert f"keeping {first.version}" in caplog.text


def test_student_file_as_teacher_is_not_loaded(mlp_pair, tmp_path, caplog) -> None:
    teacher, worker = worker_with_teacher_copy(mlp_pair.bundle, tmp_path)
    first = worker.teacher.current
    shutil.copy(load_bundle(mlp_pair.bundle).student_path, teacher)
    caplog.set_level("WARNING", logger="dslo_edge.hub_teacher")

    loaded = worker.teacher.reload_if_changed(force=True)

    assert loaded is False
    assert worker.teacher.current == first
    assert worker.teacher.class_count == 10
    assert "has no matching teacher signature" in caplog.text
    assert "outputs 'logits', 'probabilities'" in caplog.text
    assert f"keeping {first.version}" in caplog.text


@pytest.mark.parametrize("model", ["student", "no infer signature"])
def test_teacher_without_signature_stops_start(mlp_pair, tmp_path, model: str) -> None:
    teacher = tmp_path / "teacher.tflite"
    if model == "student":
        shutil.copy(load_bundle(mlp_pair.bundle).student_path, teacher)
        found = "its 'infer' signature has inputs 'x' and outputs 'logits'"
    else:
        tf = pytest.importorskip("tensorflow")
        converter = tf.lite.TFLiteConverter.from_keras_model(mlp_pair.teacher)
        teacher.write_bytes(converter.convert())
        found = "its signatures: serving_default"
    extra = {"teacher": 'output_kind = "probabilities"'}
    config = write_hub_config(tmp_path / "hub", 1883, teacher, extra)

    result = CliRunner().invoke(main, ["hub", "--config", str(config)])

    assert result.exit_code == EXIT_CONFIG
    assert isinstance(result.exception, SystemExit)
    assert result.output.startswith(
        f"error: {config}: teacher.path {teacher} has no matching teacher signature"
    )
    assert found in result.output


def test_broken_teacher_is_logged_once(mlp_pair, tmp_path, caplog) -> None:
    teacher, worker = worker_with_teacher_copy(mlp_pair.bundle, tmp_path)
    first = worker.teacher.current
    caplog.set_level("WARNING", logger="dslo_edge.hub_teacher")

    def poll_three_times() -> list[bool]:
        results = []
        for _ in range(3):
            # write_hub_config sets reload_poll_s = 0.5.
            time.sleep(0.6)
            results.append(worker.teacher.reload_if_changed())
        return results

    teacher.write_bytes(b"not a model")
    first_polls = poll_three_times()
    teacher.write_bytes(b"another broken model")
    second_polls = poll_three_times()

    assert first_polls == [False, False, False]
    assert second_polls == [False, False, False]
    assert worker.teacher.current == first
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert all("is not loadable" in message for message in warnings)
    assert all(f"keeping {first.version}" in message for message in warnings)
    assert worker.teacher.reload_if_changed(force=True) is False
    assert len(caplog.records) == 3


def test_scheduled_push_reaches_device(mlp_pair, mosquitto, tmp_path) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    config = nightly_push_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle, x)
    client, received = kitchen_updates(mosquitto.port)
    worker = HubWorker(load_hub_config(config, "w1"))
    worker.start()
    try:
        updates = [decode_update(received.get(timeout=15)) for _ in range(3)]
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()
    assert [u.sample_count for u in updates] == [16, 16, 8]
    assert updates[0].sample_ids[:2] == default_sample_ids(x[:2])
    assert {u.teacher_round for u in updates} == {1}
    assert worker.pushes is not None
    assert worker.pushes.counters()["runs"] == 1


def test_push_log_counts_one_sample(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    config = load_hub_config(
        nightly_push_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle, x),
        "w1",
    )
    worker = HubWorker(config)
    assert worker.pushes is not None
    [schedule] = config.pushes
    client, received = kitchen_updates(mosquitto.port)
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    worker.connection.client.connect("127.0.0.1", mosquitto.port)
    worker.connection.client.loop_start()
    try:
        worker.pushes.run_once(schedule)
        update = decode_update(received.get(timeout=15))
    finally:
        worker.connection.client.disconnect()
        worker.connection.client.loop_stop()
        client.disconnect()
        client.loop_stop()
        worker.state.close()

    [summary] = push_summaries(caplog)
    assert summary.startswith("Push nightly sent 1 sample in all (dataset 1)")
    assert summary.endswith("to 1 of 1 device")
    assert update.sample_count == 1


def test_spent_budget_shows_in_push_log(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    # With noise multiplier 8, the RDP accountant gives epsilon 2.17 for 16
    # releases and 3.19 for 32, so only the first batch of 16 fits in 2.5.
    privacy = {"privacy": "noise_multiplier = 8.0\nepsilon_budget = 2.5"}
    config = nightly_push_config(
        tmp_path / "hub", mosquitto.port, mlp_pair.bundle, x, privacy
    )
    client, received = kitchen_updates(mosquitto.port)
    worker = HubWorker(load_hub_config(config, "w1"))
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    worker.start()
    try:
        first = decode_update(received.get(timeout=15))
        deadline = time.monotonic() + 15
        while not push_summaries(caplog) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()

    [summary] = push_summaries(caplog)
    assert summary.startswith("Push nightly sent 16 samples in all (dataset 40)")
    assert summary.endswith("to 1 of 1 device, 1 of them only part of the dataset")
    assert first.sample_count == 16
    assert received.empty()
    assert worker.pushes is not None
    assert worker.pushes.counters() == {
        "runs": 1,
        "updates": 1,
        "skipped_devices": 0,
        "cut_short_devices": 1,
        "republished_updates": 0,
        "stale_republished_updates": 0,
    }


def small_budget_worker(mlp_pair, mosquitto, tmp_path) -> tuple:
    """Return the config and a worker whose nightly push to kitchen fits 16 samples.

    With noise multiplier 8, the RDP accountant gives epsilon 2.17 for 16
    releases and 3.19 for 32, so only the first batch fits in 2.5.
    """
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    privacy = {"privacy": "noise_multiplier = 8.0\nepsilon_budget = 2.5"}
    config = load_hub_config(
        nightly_push_config(
            tmp_path / "hub", mosquitto.port, mlp_pair.bundle, x, privacy
        ),
        "w1",
    )
    return config, HubWorker(config)


def test_spent_budget_logged_hourly(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    config, worker = small_budget_worker(mlp_pair, mosquitto, tmp_path)
    assert worker.pushes is not None
    now = [0.0]
    worker.pushes._budget_log = RepeatLimiter(3600.0, 16, clock=lambda: now[0])
    caplog.set_level("WARNING", logger="dslo_edge.hub_pushes")
    [schedule] = config.pushes
    # The first batch of 16 fits in the budget, so the first run sends it.
    client, _received = kitchen_updates(mosquitto.port)
    worker.connection.client.connect("127.0.0.1", mosquitto.port)
    worker.connection.client.loop_start()
    try:
        for minute in range(4):
            now[0] = minute * 60.0
            worker.pushes.run_once(schedule)
        now[0] = 3600.0
        worker.pushes.run_once(schedule)
    finally:
        worker.connection.client.disconnect()
        worker.connection.client.loop_stop()
        client.disconnect()
        client.loop_stop()

    stops = [r.getMessage() for r in caplog.records if "stopped" in r.getMessage()]
    assert len(stops) == 2
    assert stops[0].startswith(
        "Push nightly to device kitchen stopped: labelling 16 more"
    )
    assert "more stopped runs" not in stops[0]
    assert "(3 more stopped runs since the last line)" in stops[1]
    # The first run sent a batch before the budget ran out, the others none.
    assert worker.pushes.counters()["skipped_devices"] == 4
    assert worker.pushes.counters()["cut_short_devices"] == 1


def test_empty_push_runs_logged_hourly(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    config, worker = small_budget_worker(mlp_pair, mosquitto, tmp_path)
    assert worker.pushes is not None
    now = [0.0]
    worker.pushes._empty_run_log = RepeatLimiter(3600.0, 16, clock=lambda: now[0])
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    [schedule] = config.pushes
    client, received = kitchen_updates(mosquitto.port)
    worker.connection.client.connect("127.0.0.1", mosquitto.port)
    worker.connection.client.loop_start()
    try:
        # The first run sends one batch of 16, then the budget is spent.
        for minute in (0, 1, 2, 3, 60, 61):
            now[0] = minute * 60.0
            worker.pushes.run_once(schedule)
        first = decode_update(received.get(timeout=15))
        time.sleep(0.5)
    finally:
        worker.connection.client.disconnect()
        worker.connection.client.loop_stop()
        client.disconnect()
        client.loop_stop()
        worker.state.close()

    summaries = push_summaries(caplog)
    assert len(summaries) == 3
    assert summaries[0].startswith("Push nightly sent 16 samples in all (dataset 40)")
    assert summaries[0].endswith("to 1 of 1 device, 1 of them only part of the dataset")
    assert summaries[1].startswith("Push nightly sent 0 samples in all (dataset 40)")
    assert summaries[1].endswith("to 0 of 1 device")
    assert summaries[2].endswith(
        "to 0 of 1 device (3 more runs sent nothing since the last line)"
    )
    assert first.sample_count == 16
    assert received.empty()
    assert worker.pushes.counters() == {
        "runs": 6,
        "updates": 1,
        "skipped_devices": 5,
        "cut_short_devices": 1,
        "republished_updates": 0,
        "stale_republished_updates": 0,
    }


def write_keys(folder: Path) -> Path:
    """Write a keys folder: kitchen's key is too short, porch's is valid."""
    keys = folder / "keys"
    keys.mkdir(parents=True)
    (keys / "kitchen.key").write_text("short\n")
    generate_key_file(keys / "porch.key")
    return keys


def push_to_porch_and(device: str, mlp_pair, mosquitto, tmp_path, caplog) -> tuple:
    """Run a signed push to ``device`` and porch, which has a valid key.

    Returns:
        The keys folder, the stopped worker, the queue of payloads that
        ``device`` received, and porch's verified updates.
    """
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    folder = tmp_path / "hub"
    keys = write_keys(folder)
    extra = {"hub": 'keys_dir = "keys"'}
    config = nightly_push_config(folder, mosquitto.port, mlp_pair.bundle, x, extra)
    config.write_text(
        config.read_text().replace(
            'devices = ["kitchen"]', f'devices = ["{device}", "porch"]'
        )
    )
    other_client, other = device_updates(mosquitto.port, device)
    porch_client, porch = device_updates(mosquitto.port, "porch")
    worker = HubWorker(load_hub_config(config, "w1"))
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    worker.start()
    try:
        signed = [porch.get(timeout=15) for _ in range(3)]
        deadline = time.monotonic() + 15
        while not push_summaries(caplog) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop()
        for client in (other_client, porch_client):
            client.disconnect()
            client.loop_stop()

    key = load_key(keys / "porch.key")
    updates = [decode_update(verify(key, "dslo/porch/updates", p)) for p in signed]
    return keys, worker, other, updates


def test_bad_key_skips_only_its_device(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    keys, worker, kitchen, updates = push_to_porch_and(
        "kitchen", mlp_pair, mosquitto, tmp_path, caplog
    )
    assert [u.sample_count for u in updates] == [16, 16, 8]
    assert kitchen.empty()
    [error] = push_errors(caplog)
    assert error.startswith("Push nightly to device kitchen failed: HMAC key in ")
    [summary] = push_summaries(caplog)
    assert summary.startswith("Push nightly sent 40 samples in all (dataset 40)")
    assert summary.endswith("to 1 of 2 devices")
    assert worker.pushes is not None
    assert worker.pushes.counters()["skipped_devices"] == 1


def test_missing_key_logged_hourly(mlp_pair, tmp_path, caplog) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    folder = tmp_path / "hub"
    (folder / "keys").mkdir(parents=True)
    extra = {"hub": 'keys_dir = "keys"'}
    config = load_hub_config(
        nightly_push_config(folder, 1883, mlp_pair.bundle, x, extra), "w1"
    )
    worker = HubWorker(config)
    assert worker.pushes is not None
    now = [0.0]
    worker.pushes._failure_log = RepeatLimiter(3600.0, 16, clock=lambda: now[0])
    caplog.set_level("ERROR", logger="dslo_edge.hub_pushes")
    [schedule] = config.pushes

    # Nothing is published, because kitchen has no key file.
    for seconds in (0.0, 60.0, 120.0, 3600.0):
        now[0] = seconds
        worker.pushes.run_once(schedule)

    errors = push_errors(caplog)
    assert len(errors) == 2
    assert errors[0].startswith("Push nightly to device kitchen failed: no HMAC key")
    assert "more failed runs" not in errors[0]
    assert errors[1].endswith("(2 more failed runs since the last line)")
    assert worker.pushes.counters()["skipped_devices"] == 4


def test_push_failure_after_success_logged(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    folder = tmp_path / "hub"
    keys = folder / "keys"
    keys.mkdir(parents=True)
    extra = {"hub": 'keys_dir = "keys"'}
    config = load_hub_config(
        nightly_push_config(folder, mosquitto.port, mlp_pair.bundle, x, extra), "w1"
    )
    [schedule] = config.pushes
    kitchen_client, kitchen = kitchen_updates(mosquitto.port)
    worker = HubWorker(config)
    assert worker.pushes is not None
    now = [0.0]
    worker.pushes._failure_log = RepeatLimiter(3600.0, 16, clock=lambda: now[0])
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    worker.start()
    try:
        # The scheduled run fails, because kitchen has no key file yet.
        deadline = time.monotonic() + 15
        while not push_summaries(caplog) and time.monotonic() < deadline:
            time.sleep(0.1)
        generate_key_file(keys / "kitchen.key")
        now[0] = 60.0
        worker.pushes.run_once(schedule)
        received = [kitchen.get(timeout=15) for _ in range(3)]
        (keys / "kitchen.key").unlink()
        now[0] = 120.0
        worker.pushes.run_once(schedule)
    finally:
        worker.stop()
        kitchen_client.disconnect()
        kitchen_client.loop_stop()

    errors = push_errors(caplog)
    assert len(received) == 3
    assert len(errors) == 2
    assert errors[0].startswith("Push nightly to device kitchen failed: no HMAC key")
    assert errors[1] == errors[0]
    assert worker.pushes.counters()["skipped_devices"] == 2


def test_push_skips_device_without_key(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    keys, worker, garage, updates = push_to_porch_and(
        "garage", mlp_pair, mosquitto, tmp_path, caplog
    )
    assert [u.sample_count for u in updates] == [16, 16, 8]
    assert garage.empty()
    [error] = push_errors(caplog)
    assert error == (
        f"Push nightly to device garage failed: no HMAC key garage.key in {keys}; "
        "add the device's key so the hub can sign its labels"
    )
    [summary] = push_summaries(caplog)
    assert summary.endswith("to 1 of 2 devices")


def private_push_to_kitchen_and_garage(
    folder: Path, port: int, bundle: Path, x: np.ndarray
) -> HubConfig:
    """Load a hub config whose private nightly push sends to kitchen and garage."""
    privacy = {"privacy": "noise_multiplier = 8.0\nepsilon_budget = 20.0"}
    config = nightly_push_config(folder / "hub", port, bundle, x, privacy)
    config.write_text(
        config.read_text().replace(
            'devices = ["kitchen"]', 'devices = ["kitchen", "garage"]'
        )
    )
    return load_hub_config(config, "w1")


def run_push_once(
    worker: HubWorker, schedule: PushSchedule, port: int, kitchen: queue.Queue
) -> list:
    """Connect the worker to the broker, run the push once, then disconnect.

    Returns the three updates that kitchen's subscriber received.
    """
    worker.connection.client.connect("127.0.0.1", port)
    worker.connection.client.loop_start()
    try:
        worker.pushes.run_once(schedule)  # type: ignore[union-attr]
        return [kitchen.get(timeout=15) for _ in range(3)]
    finally:
        worker.connection.client.disconnect()
        worker.connection.client.loop_stop()


def test_push_refunds_device_without_session(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    loaded = private_push_to_kitchen_and_garage(
        tmp_path, mosquitto.port, mlp_pair.bundle, x
    )
    [schedule] = loaded.pushes
    # Only kitchen subscribes: garage never connected, so it has no session.
    client, received = kitchen_updates(mosquitto.port)
    worker = HubWorker(loaded)
    assert worker.pushes is not None
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    try:
        kitchen = run_push_once(worker, schedule, mosquitto.port, received)
        releases = {
            device: worker.state.releases(device) for device in ("kitchen", "garage")
        }
    finally:
        client.disconnect()
        client.loop_stop()
        worker.state.close()

    assert len(kitchen) == 3
    assert releases == {"kitchen": {8.0: 40}, "garage": {8.0: 0}}
    [error] = push_errors(caplog)
    assert error == (
        "Push nightly to device garage failed: the broker dropped all 3 updates "
        "unread, because no client subscribes to dslo/garage/updates (the device "
        "never connected, its session expired, the broker restarted without "
        "persistence, or its id in push.devices or the hub's mqtt.topic_prefix "
        "differs from the device config); took back the "
        "privacy charge of 40 samples"
    )
    [summary] = push_summaries(caplog)
    assert summary.startswith("Push nightly sent 40 samples in all (dataset 40)")
    assert summary.endswith("to 1 of 2 devices")
    assert worker.pushes.counters() == {
        "runs": 1,
        "updates": 3,
        "skipped_devices": 1,
        "cut_short_devices": 0,
        "republished_updates": 0,
        "stale_republished_updates": 0,
    }


def test_push_refunds_updates_acl_rejects(mlp_pair, tmp_path, caplog) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not found on PATH or at /usr/sbin/mosquitto")
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    folder = tmp_path / "broker"
    folder.mkdir()
    (folder / "acl").write_text("topic readwrite #\ntopic deny dslo/garage/updates\n")
    broker = Broker.start(
        kind="mosquitto",
        workdir=folder,
        config_text=(
            "listener {port} 127.0.0.1\nallow_anonymous true\nacl_file {workdir}/acl\n"
        ),
    )
    loaded = private_push_to_kitchen_and_garage(
        tmp_path, broker.port, mlp_pair.bundle, x
    )
    [schedule] = loaded.pushes
    kitchen_client, kitchen = kitchen_updates(broker.port)
    garage_client, garage = device_updates(broker.port, "garage")
    worker = HubWorker(loaded)
    assert worker.pushes is not None
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    try:
        received = run_push_once(worker, schedule, broker.port, kitchen)
        releases = {
            device: worker.state.releases(device) for device in ("kitchen", "garage")
        }
    finally:
        for client in (kitchen_client, garage_client):
            client.disconnect()
            client.loop_stop()
        worker.state.close()
        broker.stop()

    assert len(received) == 3
    assert garage.empty()
    assert releases == {"kitchen": {8.0: 40}, "garage": {8.0: 0}}
    [error] = push_errors(caplog)
    assert error == (
        "Push nightly to device garage failed: the broker rejected all 3 updates "
        "to dslo/garage/updates with reason code 135 (Not authorized), which "
        "mosquitto sends when its ACL does not let the hub's MQTT user publish "
        "there; grant that user write access to the devices' updates topics; "
        "took back the privacy charge of 40 samples"
    )
    [summary] = push_summaries(caplog)
    assert summary.endswith("to 1 of 2 devices")
    assert worker.pushes.counters() == {
        "runs": 1,
        "updates": 3,
        "skipped_devices": 1,
        "cut_short_devices": 0,
        "republished_updates": 0,
        "stale_republished_updates": 0,
    }


def test_oversized_push_update_is_not_sent(mlp_pair, tmp_path, caplog) -> None:
    pytest.importorskip("dp_accounting")
    broker = start_size_limited_broker(tmp_path)
    x = np.random.default_rng(0).random((70, 64), dtype=np.float32)
    extra = {
        "requests": "max_payload_bytes = 20000",
        "privacy": "noise_multiplier = 10.0\nepsilon_budget = 100.0",
    }
    config = nightly_push_config(
        tmp_path / "hub", broker.port, mlp_pair.bundle, x, extra
    )
    config.write_text(config.read_text().replace("batch_size = 16", "batch_size = 70"))
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(broker.port, "dslo/+/labels")
    updates_client, updates = kitchen_updates(broker.port)
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    try:
        start_online(worker, broker.port)
        deadline = time.monotonic() + 15
        while not push_errors(caplog) and time.monotonic() < deadline:
            time.sleep(0.1)
        send_request(client, "garage", b"g" * 16)
        reply = received.get(timeout=10)
        releases = worker.state.releases("kitchen")
    finally:
        worker.stop()
        for subscriber in (client, updates_client):
            subscriber.disconnect()
            subscriber.loop_stop()
        broker.stop()

    [error] = push_errors(caplog)
    prefix = "Push nightly to device kitchen failed: the update for samples 0 to 69 is "
    assert error.startswith(prefix)
    assert int(error[len(prefix) :].split(" ")[0]) > 20000
    assert error.endswith(
        " bytes, above requests.max_payload_bytes of 20000, so it was neither "
        "charged nor sent; lower batch_size of push nightly below 70"
    )
    assert updates.empty()
    assert releases == {}
    # The worker stays connected and serves label requests.
    assert user_properties(reply.properties)["status"] == "ok"


def test_push_thread_survives_unexpected_error(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    config = nightly_push_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle, x)
    config.write_text(config.read_text().replace("every_s = 3600", "every_s = 1"))
    loaded = load_hub_config(config, "w1")
    # MQTT's message expiry is a 32-bit field, so paho raises struct.error on
    # publish. The config check rejects this value, so it is set after the
    # check, to stand in for any bug in a push run.
    schedule = dataclasses.replace(loaded.pushes[0], expiry_s=2**32)
    worker = HubWorker(dataclasses.replace(loaded, pushes=(schedule,)))
    caplog.set_level("ERROR", logger="dslo_edge.hub_pushes")
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while len(push_errors(caplog)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.pushes is not None
        alive = worker.pushes.is_alive()
    finally:
        worker.stop()

    errors = push_errors(caplog)
    assert len(errors) >= 2
    assert errors[0] == "Push nightly failed unexpectedly; the next run is in 1 s"
    assert alive


def push_summaries(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "dslo_edge.hub_pushes" and record.levelname == "INFO"
    ]


def test_foreign_response_topic_gets_no_labels(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(
        mosquitto.port, "dslo/+/labels", lambda message: message.topic
    )
    caplog.set_level("WARNING", logger="dslo_edge.hub_batch")
    start_online(worker, mosquitto.port)
    try:
        for index in range(5):
            request_id = bytes([index]) * 16
            client.publish(
                "dslo/intruder/requests",
                b"DSLQ",
                qos=1,
                properties=request_properties("dslo/victim/labels", request_id),
            )
        client.publish(
            "dslo/broken/requests",
            b"DSLQ",
            qos=1,
            properties=request_properties("dslo/broken/labels", b"r" * 16),
        )
        assert received.get(timeout=10) == "dslo/broken/labels"
        time.sleep(0.5)
        assert received.empty()
        counters = worker.counters
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()
    assert counters["unanswerable"] == 5
    assert counters["rejected"] == 1
    ignored = [r.getMessage() for r in caplog.records if "Ignoring" in r.getMessage()]
    # The first of the intruder's requests is logged, the other four counted.
    assert len(ignored) == 1
    assert ignored[0].startswith("Ignoring a request from intruder with response ")


def push_errors(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "dslo_edge.hub_pushes" and record.levelname == "ERROR"
    ]


@pytest.fixture(scope="module")
def relu_teacher(tmp_path_factory: pytest.TempPathFactory):
    """A 64-32-10 ReLU teacher: inputs of 3e38 make its probabilities NaN.

    The tanh teacher of ``mlp_pair`` saturates instead.
    """
    keras = pytest.importorskip("keras")
    from converters.bundle import convert_teacher

    keras.utils.set_random_seed(3)
    teacher = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    path = tmp_path_factory.mktemp("relu-teacher") / "teacher.tflite"
    return convert_teacher(teacher, path)


def test_teacher_overflow_stops_scheduled_push(
    relu_teacher, mosquitto, tmp_path, caplog
) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    x[25] = 3e38
    extra = {"teacher": 'output_kind = "probabilities"'}
    config = nightly_push_config(
        tmp_path / "hub", mosquitto.port, relu_teacher, x, extra
    )
    client, received = kitchen_updates(mosquitto.port)
    worker = HubWorker(load_hub_config(config, "w1"))
    caplog.set_level("ERROR", logger="dslo_edge.hub_pushes")
    worker.start()
    try:
        deadline = time.monotonic() + 15
        while not push_errors(caplog) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()

    [message] = push_errors(caplog)
    ids = default_sample_ids(x)
    assert message.startswith("Push nightly failed: the teacher gave NaN or infinite")
    assert f"for sample {ids[25]!r} (1 of 40 samples labelled together)" in message
    assert "input magnitude is 3e+38" in message
    assert "nothing was sent" in message
    assert received.empty()
    assert worker.pushes is not None
    assert worker.pushes.counters() == {
        "runs": 0,
        "updates": 0,
        "skipped_devices": 0,
        "cut_short_devices": 0,
        "republished_updates": 0,
        "stale_republished_updates": 0,
    }


def send_request(client: mqtt.Client, device: str, request_id: bytes) -> None:
    """Publish a label request for samples a and b as ``device``."""
    inputs = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    request = LabelRequest(request_id, time.time(), ["a", "b"], inputs)
    client.publish(
        f"dslo/{device}/requests",
        encode_request(request),
        qos=1,
        properties=request_properties(f"dslo/{device}/labels", request_id),
    )


def ask_for_labels(config, port: int, request: LabelRequest) -> tuple:
    """Start a worker, send ``request`` for device kitchen, return (reply, counters)."""
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(port, "dslo/+/labels")
    start_online(worker, port)
    try:
        client.publish(
            "dslo/kitchen/requests",
            encode_request(request),
            qos=1,
            properties=request_properties("dslo/kitchen/labels", request.request_id),
        )
        return received.get(timeout=10), worker.counters
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()


def test_teacher_overflow_rejects_label_request(
    relu_teacher, mosquitto, tmp_path
) -> None:
    extra = {"teacher": 'output_kind = "probabilities"'}
    config = write_hub_config(tmp_path / "hub", mosquitto.port, relu_teacher, extra)
    inputs = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    inputs[1] = 3e38
    request = LabelRequest(b"q" * 16, time.time(), ["a", "b", "c"], inputs)

    reply, counters = ask_for_labels(config, mosquitto.port, request)

    assert user_properties(reply.properties)["status"] == "rejected"
    text = reply.payload.decode()
    assert "NaN or infinite labels for sample 'b' (1 of 3 samples" in text
    assert "input magnitude is 3e+38" in text
    assert counters["rejected"] == 1
    assert counters["answered"] == 0


def test_rejected_labels_cost_no_privacy(relu_teacher, mosquitto, tmp_path) -> None:
    pytest.importorskip("dp_accounting")
    extra = {
        "teacher": 'output_kind = "probabilities"',
        "privacy": "noise_multiplier = 2.0\nepsilon_budget = 50",
    }
    config = write_hub_config(tmp_path / "hub", mosquitto.port, relu_teacher, extra)
    inputs = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    overflowing = inputs.copy()
    overflowing[1] = 3e38
    rejected = LabelRequest(b"n" * 16, time.time(), ["a", "b", "c"], overflowing)
    released = LabelRequest(b"r" * 16, time.time(), ["d", "e"], inputs[:2])

    first, _ = ask_for_labels(config, mosquitto.port, rejected)
    second, _ = ask_for_labels(config, mosquitto.port, released)
    # The device sends the rejected request again, as after a lost reply.
    repeat, _ = ask_for_labels(config, mosquitto.port, rejected)

    assert user_properties(first.properties)["status"] == "rejected"
    assert user_properties(second.properties)["status"] == "ok"
    assert user_properties(repeat.properties)["status"] == "rejected"
    settings = load_hub_config(config, "w1").privacy
    assert settings is not None
    state = HubState(tmp_path / "hub" / "state.sqlite", "check")
    try:
        releases = state.releases("kitchen")
        epsilon = state.epsilon("kitchen", settings)
    finally:
        state.close()
    # Only the two samples of the released request are charged.
    assert releases == {2.0: 2}
    assert epsilon == pytest.approx(epsilon_spent({2.0: 2}, settings.delta))
    assert epsilon < epsilon_spent({2.0: 5}, settings.delta)


def start_size_limited_broker(tmp_path: Path) -> Broker:
    """Start mosquitto with message_size_limit 20000, or skip without it.

    mosquitto 2.0.11 closes the connection of an MQTT 5 client that
    publishes a payload above this limit.
    """
    if find_mosquitto() is None:
        pytest.skip("mosquitto not found on PATH or at /usr/sbin/mosquitto")
    folder = tmp_path / "broker"
    folder.mkdir()
    return Broker.start(
        kind="mosquitto",
        workdir=folder,
        config_text=(
            "listener {port} 127.0.0.1\nallow_anonymous true\n"
            "message_size_limit 20000\n"
        ),
    )


def test_broker_drops_request_over_packet_limit(mlp_pair, mosquitto, tmp_path) -> None:
    extra = {"requests": "max_payload_bytes = 20000"}
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle, extra)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/+/labels")
    inputs = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    small = LabelRequest(b"S" * 16, time.time(), ["a", "b"], inputs)
    requests = [
        # Over the worker's packet limit: the broker never sends it.
        ("kitchen", b"L" * packet_size_limit(20000), b"L" * 16),
        ("garage", encode_request(small), small.request_id),
    ]
    try:
        start_online(worker, mosquitto.port)
        for device, payload, request_id in requests:
            client.publish(
                f"dslo/{device}/requests",
                payload,
                qos=1,
                properties=request_properties(f"dslo/{device}/labels", request_id),
            ).wait_for_publish(10)
        reply = received.get(timeout=10)
        # A reply to kitchen would have come first.
        time.sleep(0.5)
        counters = worker.counters
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()

    assert reply.topic == "dslo/garage/labels"
    assert user_properties(reply.properties)["status"] == "ok"
    assert received.empty()
    assert counters["rejected"] == 0
    assert counters["answered"] == 1


def test_oversized_response_is_rejected_and_refunded(mlp_pair, tmp_path) -> None:
    pytest.importorskip("dp_accounting")
    broker = start_size_limited_broker(tmp_path)
    extra = {
        "requests": "max_payload_bytes = 20000",
        "privacy": "noise_multiplier = 10.0\nepsilon_budget = 100.0",
    }
    config = write_hub_config(tmp_path / "hub", broker.port, mlp_pair.bundle, extra)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(broker.port, "dslo/+/labels")
    inputs = np.random.default_rng(0).random((70, 64), dtype=np.float32)
    ids = [f"s{index}" for index in range(70)]
    large = LabelRequest(b"L" * 16, time.time(), ids, inputs)
    small = LabelRequest(b"S" * 16, time.time(), ids[:2], inputs[:2])
    try:
        start_online(worker, broker.port)
        replies = []
        for device, request in [("kitchen", large), ("garage", small)]:
            client.publish(
                f"dslo/{device}/requests",
                encode_request(request),
                qos=1,
                properties=request_properties(
                    f"dslo/{device}/labels", request.request_id
                ),
            )
            replies.append(received.get(timeout=10))
        releases = {
            device: worker.state.releases(device) for device in ("kitchen", "garage")
        }
        counters = worker.counters
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()
        broker.stop()

    assert len(encode_request(large)) < 20000
    large_reply, small_reply = replies
    assert large_reply.topic == "dslo/kitchen/labels"
    assert user_properties(large_reply.properties)["status"] == "rejected"
    assert large_reply.payload.decode().startswith(
        "labels for the 70 samples of the request make a response of "
    )
    assert large_reply.payload.decode().endswith(
        "above the hub's requests.max_payload_bytes of 20000; ask for fewer "
        "samples per request"
    )
    # The worker stays connected and serves the next device.
    assert small_reply.topic == "dslo/garage/labels"
    assert user_properties(small_reply.properties)["status"] == "ok"
    # The labels that were not sent cost no privacy.
    assert releases == {"kitchen": {10.0: 0}, "garage": {10.0: 2}}
    assert counters["rejected"] == 1
    assert counters["answered"] == 1


def test_repeated_sample_id_rejects_label_request(
    mlp_pair, mosquitto, tmp_path
) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    inputs = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    request = LabelRequest(b"d" * 16, time.time(), ["a", "b", "a"], inputs)

    reply, counters = ask_for_labels(config, mosquitto.port, request)

    assert user_properties(reply.properties)["status"] == "rejected"
    assert reply.payload.decode().startswith("sample id 'a' occurs more than once")
    assert counters["rejected"] == 1
    assert counters["teacher_calls"] == 0


def test_duplicate_worker_id_is_named(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    # Two state files stand for two machines: with one state file, the second
    # worker fails at start on its worker lock.
    first, second = (
        HubWorker(
            load_hub_config(
                write_hub_config(tmp_path / machine, mosquitto.port, mlp_pair.bundle),
                "w1",
            )
        )
        for machine in ("machine-a", "machine-b")
    )
    start_online(first, mosquitto.port)
    second.start()
    try:
        deadline = time.monotonic() + 15
        while first.connection.takeovers == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        second.stop()
        first.stop()

    assert first.connection.takeovers >= 1
    taken_over = [r.getMessage() for r in caplog.records if "taken over" in r.message]
    assert taken_over
    assert (
        "another worker probably runs with worker id w1 on another machine or "
        "with another hub.state_file" in taken_over[0]
    )
    assert "give each worker its own --worker-id" in taken_over[0]


def test_takeover_fix_names_client_id(tmp_path) -> None:
    teacher = tmp_path / "teacher.tflite"
    teacher.write_bytes(b"model")
    extra = {"teacher": 'output_kind = "probabilities"'}
    own_ids = write_hub_config(tmp_path / "own", 1883, teacher, extra)
    client_id = {**extra, "mqtt": 'client_id = "hub"'}
    shared_id = write_hub_config(tmp_path / "shared", 1883, teacher, client_id)

    own = _takeover_fix(load_hub_config(own_ids, "w1"))
    shared = _takeover_fix(load_hub_config(shared_id, "w1"))

    assert own == (
        "another worker probably runs with worker id w1 on another machine or "
        "with another hub.state_file: give each worker its own --worker-id"
    )
    assert shared.startswith(f"{shared_id} sets mqtt.client_id = 'hub', ")
    assert "leave mqtt.client_id unset" in shared
    assert "worker id w1" not in shared


def test_key_added_or_replaced_while_running(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    keys = write_keys(folder)
    extra = {"hub": 'keys_dir = "keys"'}
    config = write_hub_config(folder, mosquitto.port, mlp_pair.bundle, extra)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/+/labels")
    start_online(worker, mosquitto.port)
    replies = []
    try:
        for device, request_id in (("garage", b"g" * 16), ("kitchen", b"k" * 16)):
            send_request(client, device, request_id)
            replies.append(received.get(timeout=10))
        generate_key_file(keys / "garage.key")
        (keys / "kitchen.key").unlink()
        generate_key_file(keys / "kitchen.key")
        for device, request_id in (("garage", b"G" * 16), ("kitchen", b"K" * 16)):
            send_request(client, device, request_id)
            replies.append(received.get(timeout=10))
        old_kitchen_key = load_key(keys / "kitchen.key")
        # A replaced key file is read again, not taken from the cache.
        (keys / "kitchen.key").unlink()
        generate_key_file(keys / "kitchen.key")
        send_request(client, "kitchen", b"L" * 16)
        replaced = received.get(timeout=10)
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()

    statuses = [user_properties(reply.properties)["status"] for reply in replies]
    assert statuses == ["rejected", "rejected", "ok", "ok"]
    new_kitchen_key = load_key(keys / "kitchen.key")
    assert new_kitchen_key != old_kitchen_key
    update = decode_update(
        verify(new_kitchen_key, "dslo/kitchen/labels", replaced.payload)
    )
    assert update.sample_ids == ["a", "b"]
    assert replies[0].payload.decode().startswith("no HMAC key garage.key in ")
    assert (
        replies[1]
        .payload.decode()
        .startswith("the hub cannot use the device's HMAC key: ")
    )
    signed_with = (
        ("garage", load_key(keys / "garage.key")),
        ("kitchen", old_kitchen_key),
    )
    for reply, (device, key) in zip(replies[2:], signed_with, strict=True):
        update = decode_update(verify(key, f"dslo/{device}/labels", reply.payload))
        assert update.sample_ids == ["a", "b"]


def test_missing_key_is_logged_once(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    folder = tmp_path / "hub"
    keys = write_keys(folder)
    extra = {"hub": 'keys_dir = "keys"'}
    config = write_hub_config(folder, mosquitto.port, mlp_pair.bundle, extra)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/+/labels")
    start_online(worker, mosquitto.port)
    statuses = []
    try:
        with caplog.at_level("ERROR", logger="dslo_edge.hub_batch"):
            for request_id in (b"g" * 16, b"G" * 16):
                send_request(client, "garage", request_id)
                reply = received.get(timeout=10)
                statuses.append(user_properties(reply.properties)["status"])
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()

    assert statuses == ["rejected", "rejected"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        f"Cannot sign labels for device garage: no HMAC key garage.key in {keys}; "
        "add the device's key so the hub can sign its labels"
    ]


def test_bad_key_rejects_only_its_request(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    keys = write_keys(folder)
    extra = {"hub": 'keys_dir = "keys"'}
    config = write_hub_config(folder, mosquitto.port, mlp_pair.bundle, extra)
    # A long batch wait puts both requests into one batch.
    text = config.read_text()
    config.write_text(text.replace("batch_wait_s = 0.02", "batch_wait_s = 1.0"))
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/+/labels")
    start_online(worker, mosquitto.port)
    try:
        for device, request_id in (("kitchen", b"k" * 16), ("porch", b"p" * 16)):
            send_request(client, device, request_id)
        replies = {}
        for _ in range(2):
            message = received.get(timeout=10)
            replies[message.topic.split("/")[1]] = message
        counters = worker.counters
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()

    kitchen = replies["kitchen"]
    assert user_properties(kitchen.properties)["status"] == "rejected"
    assert kitchen.payload.decode().startswith(
        "the hub cannot use the device's HMAC key: HMAC key in "
    )
    porch = replies["porch"]
    assert user_properties(porch.properties)["status"] == "ok"
    key = load_key(keys / "porch.key")
    update = decode_update(verify(key, "dslo/porch/labels", porch.payload))
    assert update.sample_ids == ["a", "b"]
    assert counters["rejected"] == 1
    assert counters["answered"] == 1
    assert counters["teacher_calls"] == 1


def test_top_k_not_below_class_count_stops_start(mlp_pair, tmp_path) -> None:
    extra = {"requests": "top_k = 10"}
    config = write_hub_config(tmp_path / "hub", 1883, mlp_pair.bundle, extra)

    result = CliRunner().invoke(main, ["hub", "--config", str(config)])

    assert result.exit_code == EXIT_CONFIG
    assert (
        "requests.top_k = 10 is invalid for a teacher with 10 classes; expected 0 "
        "(all probabilities) or 1..9" in result.output
    )


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            lambda text: text[:-1],
            "contains hex text that does not decode (63 hex digits; expected an "
            "even number, with no space inside a pair), so the key may be cut "
            "short; copy the whole file that 'dslo-edge keygen' wrote, or ",
        ),
        (
            lambda text: "g" + text[1:],
            "looks like hex text, but character 1 is 'g', which is not a hex "
            "digit, so the key is damaged; expected 64 hex digits as 'dslo-edge "
            "keygen' writes them, so ",
        ),
    ],
    ids=["cut short", "damaged"],
)
def test_bad_hex_key_rejects_request(
    mlp_pair, mosquitto, tmp_path, damage, problem: str
) -> None:
    folder = tmp_path / "hub"
    keys = write_keys(folder)
    hex_key = (keys / "porch.key").read_text().strip()
    (keys / "porch.key").write_text(damage(hex_key) + "\n")
    extra = {"hub": 'keys_dir = "keys"'}
    config = write_hub_config(folder, mosquitto.port, mlp_pair.bundle, extra)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/+/labels")
    start_online(worker, mosquitto.port)
    try:
        send_request(client, "porch", b"p" * 16)
        reply = received.get(timeout=10)
        counters = worker.counters
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()

    assert user_properties(reply.properties)["status"] == "rejected"
    assert reply.payload.decode() == (
        "the hub cannot use the device's HMAC key: HMAC key file "
        f"{keys / 'porch.key'} {problem}make a new key with 'dslo-edge keygen "
        "KEYFILE' and copy it to both the device (security.hmac_key_file) and "
        "the hub (keys_dir/DEVICE.key)"
    )
    assert counters["rejected"] == 1
    assert counters["answered"] == 0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            "00112233445566778899aabbccddeeff\n",
            bytes.fromhex("00112233445566778899aabbccddeeff"),
        ),
        (
            "0011 2233 4455 6677 8899 aabb ccdd eeff",
            bytes.fromhex("00112233445566778899aabbccddeeff"),
        ),
        ("a raw passphrase of some length", b"a raw passphrase of some length"),
    ],
)
def test_key_file_hex_or_raw(tmp_path, text: str, key: bytes) -> None:
    path = tmp_path / "device.key"
    path.write_text(text)

    assert load_key(path) == key


def test_push_waits_for_broker_outage(
    mlp_pair, broker_factory, tmp_path, caplog
) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    broker = broker_factory("mosquitto")
    config = nightly_push_config(tmp_path / "hub", broker.port, mlp_pair.bundle, x)
    text = config.read_text().replace(
        'devices = ["kitchen"]', 'devices = ["kitchen", "porch"]'
    )
    config.write_text(text)
    worker = HubWorker(load_hub_config(config, "w1"))
    assert worker.pushes is not None
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    broker.stop()
    worker.start()
    try:
        # The scheduler checks every second, so a due run was looked at twice.
        time.sleep(2.5)
        runs_while_down = worker.pushes.counters()["runs"]
        broker_factory("mosquitto", port=broker.port)
        client, received = subscribed_client(
            broker.port, "dslo/+/updates", lambda message: message.topic
        )
        topics = [received.get(timeout=15) for _ in range(6)]
        client.disconnect()
        client.loop_stop()
    finally:
        worker.stop()

    assert runs_while_down == 0
    assert sorted(set(topics)) == ["dslo/kitchen/updates", "dslo/porch/updates"]
    assert topics.count("dslo/porch/updates") == 3
    assert worker.pushes.counters()["runs"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert (
        messages.count(
            "Scheduled pushes wait for the broker connection; runs that fall due "
            "meanwhile start when the worker reconnects"
        )
        == 1
    )
    assert "Scheduled pushes resume: the broker connection is back" in messages
    assert not [m for m in messages if "failed" in m]


def wait_for_queued_publishes(client: mqtt.Client, count: int) -> None:
    """Wait until paho has ``count`` QoS 1 messages not yet acknowledged."""
    deadline = time.monotonic() + 30
    # paho has no public call that returns whether QoS 1 messages wait.
    while len(client._out_messages) < count:
        assert time.monotonic() < deadline, f"{count} publishes were not queued in 30 s"
        time.sleep(0.01)


def test_push_waits_for_reconnect_mid_run(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    config = nightly_push_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle, x)
    worker = HubWorker(load_hub_config(config, "w1"))
    assert worker.pushes is not None
    [schedule] = worker.config.pushes
    client, received = kitchen_updates(mosquitto.port)
    caplog.set_level("ERROR", logger="dslo_edge.hub_pushes")

    # The run publishes while the worker is disconnected, as after a broker
    # restart, so paho queues the updates and sends them once it connects.
    run = threading.Thread(target=worker.pushes.run_once, args=(schedule,))
    run.start()
    wait_for_queued_publishes(worker.connection.client, 3)
    worker.connection.client.connect("127.0.0.1", mosquitto.port)
    worker.connection.client.loop_start()
    try:
        run.join(20)
        updates = [decode_update(received.get(timeout=15)) for _ in range(3)]
    finally:
        worker.connection.client.disconnect()
        worker.connection.client.loop_stop()
        client.disconnect()
        client.loop_stop()
        worker.state.close()

    assert not run.is_alive()
    assert [u.sample_count for u in updates] == [16, 16, 8]
    assert push_errors(caplog) == []
    assert worker.pushes.counters() == {
        "runs": 1,
        "updates": 3,
        "skipped_devices": 0,
        "cut_short_devices": 0,
        "republished_updates": 0,
        "stale_republished_updates": 0,
    }


def test_push_wait_ends_when_worker_stops(mlp_pair, tmp_path, caplog) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    config = nightly_push_config(tmp_path / "hub", 1883, mlp_pair.bundle, x)
    text = config.read_text().replace(
        'devices = ["kitchen"]', 'devices = ["kitchen", "porch"]'
    )
    config.write_text(text)
    worker = HubWorker(load_hub_config(config, "w1"))
    assert worker.pushes is not None
    [schedule] = worker.config.pushes
    caplog.set_level("ERROR", logger="dslo_edge.hub_pushes")

    # The worker never connects, so the run would wait 30 s for kitchen's
    # acknowledgements, and 30 s more for porch's.
    run = threading.Thread(target=worker.pushes.run_once, args=(schedule,))
    run.start()
    wait_for_queued_publishes(worker.connection.client, 3)
    started = time.monotonic()
    worker.pushes.stop()
    run.join(5)
    stopped_after = time.monotonic() - started
    worker.state.close()

    assert not run.is_alive()
    assert stopped_after < 2.0
    [error] = push_errors(caplog)
    assert error.startswith(
        "Push nightly to device kitchen failed: 3 of 3 updates were not "
        "acknowledged by the broker (stopped waiting, because the worker is "
        "stopping)"
    )
    assert worker.pushes.counters() == {
        "runs": 1,
        "updates": 0,
        "skipped_devices": 1,
        "cut_short_devices": 0,
        "republished_updates": 0,
        "stale_republished_updates": 0,
    }


def test_push_disconnected_tries_every_device(
    mlp_pair, tmp_path, caplog, monkeypatch
) -> None:
    monkeypatch.setattr(hub_push_batches, "PUBLISH_TIMEOUT_S", 1.0)
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    config = nightly_push_config(tmp_path / "hub", 1883, mlp_pair.bundle, x)
    text = config.read_text().replace(
        'devices = ["kitchen"]', 'devices = ["kitchen", "porch"]'
    )
    config.write_text(text)
    worker = HubWorker(load_hub_config(config, "w1"))
    assert worker.pushes is not None
    [schedule] = worker.config.pushes
    caplog.set_level("ERROR", logger="dslo_edge.hub_pushes")

    # The worker never connected, so paho queues each publish and reports
    # that the client is not connected.
    worker.pushes.run_once(schedule)

    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 2
    for error, device in zip(errors, ("kitchen", "porch"), strict=True):
        assert error == (
            f"Push nightly to device {device} failed: 3 of 3 updates were not "
            "acknowledged by the broker (timed out after 1 s without a broker "
            "connection); paho sends the queued ones if the worker reconnects "
            "before it stops"
        )
    assert worker.pushes.counters() == {
        "runs": 1,
        "updates": 0,
        "skipped_devices": 2,
        "cut_short_devices": 0,
        "republished_updates": 0,
        "stale_republished_updates": 0,
    }
    worker.state.close()


def wait_until_stopped(pid: int) -> None:
    """Wait until process ``pid`` is stopped by SIGSTOP (state T in /proc)."""
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.01)


def test_push_failing_midway_counts_sent(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    config = load_hub_config(
        nightly_push_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle, x),
        "w1",
    )
    [schedule] = config.pushes
    kitchen_client, kitchen = kitchen_updates(mosquitto.port)
    worker = HubWorker(config)
    assert worker.pushes is not None
    client = worker.connection.client
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    caplog.set_level("INFO", logger="dslo_edge.hub_pushes")
    try:
        worker.pushes.run_once(schedule)
        first_run = [kitchen.get(timeout=15) for _ in range(3)]
        # With the broker stopped no acknowledgement arrives, so paho queues
        # the first 2 of the 3 updates and rejects the third. The broker then
        # resumes and acknowledges those 2. paho sets the limit only between
        # connections.
        client.disconnect()
        client.loop_stop()
        client.max_queued_messages_set(2)
        # On connecting, the worker publishes its status and its teacher at
        # QoS 1. Those count against the queue limit until the broker
        # acknowledges them, so the broker is stopped only after that.
        connected = threading.Event()
        on_connect = client.on_connect

        def on_connect_then_mark(*arguments: Any) -> None:
            on_connect(*arguments)
            connected.set()

        client.on_connect = on_connect_then_mark
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        assert connected.wait(10), "the hub client did not reconnect"
        deadline = time.monotonic() + 10
        # paho has no public call that returns whether QoS 1 messages wait.
        while client._out_messages:
            assert time.monotonic() < deadline, "the broker did not acknowledge"
            time.sleep(0.01)
        os.kill(mosquitto.pid, signal.SIGSTOP)
        resume = threading.Timer(1.0, os.kill, (mosquitto.pid, signal.SIGCONT))
        try:
            wait_until_stopped(mosquitto.pid)
            resume.start()
            worker.pushes.run_once(schedule)
        finally:
            resume.join()
            os.kill(mosquitto.pid, signal.SIGCONT)
        second_run = [kitchen.get(timeout=15) for _ in range(2)]
    finally:
        client.disconnect()
        client.loop_stop()
        kitchen_client.disconnect()
        kitchen_client.loop_stop()
        worker.state.close()

    assert len(first_run) == 3
    assert [decode_update(payload).sample_count for payload in second_run] == [16, 16]
    assert kitchen.empty()
    [error] = push_errors(caplog)
    assert error.startswith(
        "Push nightly to device kitchen failed: 1 of 3 updates were not "
        "acknowledged by the broker (paho's outgoing queue was full, so it did not "
        "keep a message)"
    )
    summaries = push_summaries(caplog)
    assert len(summaries) == 2
    assert summaries[1].startswith("Push nightly sent 32 samples in all (dataset 40)")
    assert summaries[1].endswith("to 1 of 1 device, 1 of them only part of the dataset")
    assert worker.pushes.counters() == {
        "runs": 2,
        "updates": 5,
        "skipped_devices": 0,
        "cut_short_devices": 1,
        "republished_updates": 0,
        "stale_republished_updates": 0,
    }


def test_rejected_requests_logged_once_a_minute(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    worker = HubWorker(load_hub_config(config, "w1"))
    now = [0.0]
    worker.labeller._rejected_log = RepeatLimiter(60.0, 16, clock=lambda: now[0])
    client, received = subscribed_client(mosquitto.port, "dslo/+/labels")
    caplog.set_level("WARNING", logger="dslo_edge.hub_batch")
    start_online(worker, mosquitto.port)
    statuses = []
    try:
        # Inputs of 60 values, but the teacher takes 64: a device whose
        # bundle is of another model.
        for index, minute in enumerate((0.0, 0.1, 0.2, 1.5)):
            now[0] = minute * 60.0
            request_id = bytes([index]) * 16
            inputs = np.zeros((2, 60), np.float32)
            request = LabelRequest(request_id, time.time(), ["a", "b"], inputs)
            client.publish(
                "dslo/garage/requests",
                encode_request(request),
                qos=1,
                properties=request_properties("dslo/garage/labels", request_id),
            )
            reply = received.get(timeout=10)
            statuses.append(user_properties(reply.properties)["status"])
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()

    assert statuses == ["rejected"] * 4
    warnings = [r.getMessage() for r in caplog.records if "Rejected" in r.getMessage()]
    problem = "inputs have shape (60,) per sample, the teacher expects (64,)"
    assert warnings == [
        f"Rejected a label request from device garage (shape_mismatch): {problem}",
        f"Rejected a label request from device garage (shape_mismatch): {problem} "
        "(2 more rejected requests since the last line)",
    ]


def test_push_reads_changed_data_file(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    rng = np.random.default_rng(0)
    first_x = rng.random((40, 64), dtype=np.float32)
    second_x = rng.random((24, 64), dtype=np.float32)
    folder = tmp_path / "hub"
    config = nightly_push_config(folder, mosquitto.port, mlp_pair.bundle, first_x)
    worker = HubWorker(load_hub_config(config, "w1"))
    assert worker.pushes is not None
    [schedule] = worker.config.pushes
    client, received = kitchen_updates(mosquitto.port)
    caplog.set_level("ERROR", logger="dslo_edge.hub_pushes")

    def replace_data(**arrays) -> None:
        np.savez(folder / "new.npz", **arrays)
        os.replace(folder / "new.npz", folder / "data.npz")

    def run_and_receive(count: int) -> list[str]:
        worker.pushes.run_once(schedule)
        updates = [decode_update(received.get(timeout=10)) for _ in range(count)]
        return [sample_id for update in updates for sample_id in update.sample_ids]

    worker.connection.client.connect("127.0.0.1", mosquitto.port)
    worker.connection.client.loop_start()
    try:
        first_ids = run_and_receive(3)
        replace_data(x=second_x)
        second_ids = run_and_receive(2)
        # Inputs of another shape, as from a dataset of another model.
        replace_data(x=second_x[:, :60])
        kept_ids = run_and_receive(2)
    finally:
        worker.connection.client.disconnect()
        worker.connection.client.loop_stop()
        client.disconnect()
        client.loop_stop()
        worker.state.close()

    assert first_ids == default_sample_ids(first_x)
    assert second_ids == default_sample_ids(second_x)
    assert kept_ids == second_ids
    errors = [r.getMessage() for r in caplog.records]
    assert errors == [
        "Push nightly cannot use the changed data file: "
        f"{folder / 'data.npz'}: x has samples of shape (60,), but the teacher "
        "takes (64,); sending the 24 samples read from it before, and reading "
        "it again at the next run"
    ]


def test_unreadable_key_file_is_named(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    keys = write_keys(folder)
    (keys / "garage.key").mkdir()
    (keys / "shed.key").symlink_to(tmp_path / "secrets" / "shed.key")
    extra = {"hub": 'keys_dir = "keys"'}
    config = write_hub_config(folder, mosquitto.port, mlp_pair.bundle, extra)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/+/labels")
    start_online(worker, mosquitto.port)
    replies = {}
    try:
        for device in ("garage", "shed", "attic"):
            send_request(client, device, device[0].encode() * 16)
            reply = received.get(timeout=10)
            replies[device] = reply.payload.decode()
    finally:
        worker.stop()
        client.disconnect()
        client.loop_stop()

    prefix = "the hub cannot use the device's HMAC key: cannot read the HMAC key file "
    assert replies["garage"] == (
        f"{prefix}{keys / 'garage.key'}: [Errno 21] Is a directory: "
        f"'{keys / 'garage.key'}'"
    )
    assert replies["shed"] == (
        f"{prefix}{keys / 'shed.key'}: [Errno 2] No such file or directory: "
        f"'{keys / 'shed.key'}'"
    )
    assert replies["attic"] == (
        f"no HMAC key attic.key in {keys}; add the device's key so the hub can "
        "sign its labels"
    )


def test_stop_line_lists_counters(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    worker = HubWorker(load_hub_config(config, "w1"))
    caplog.set_level("INFO", logger="dslo_edge.hub_service")
    start_online(worker, mosquitto.port)
    worker.stop()

    [line] = [m for m in caplog.messages if m.startswith("Hub worker w1 stopped")]
    assert line.startswith("Hub worker w1 stopped: requests 0, answered 0, ")
    assert line.endswith(", largest_batch 0")
    assert "{" not in line


def test_connection_lost_mid_batch_warns(
    mlp_pair, broker_factory, tmp_path, caplog
) -> None:
    broker = broker_factory("mosquitto")
    config = write_hub_config(tmp_path / "hub", broker.port, mlp_pair.bundle)
    # The first reconnect comes at least 0.5 s after the broker is back, so
    # the device below subscribes before paho sends the queued response.
    text = config.read_text().replace("reconnect_min_s = 0.2", "reconnect_min_s = 1.0")
    config.write_text(text)
    worker = HubWorker(load_hub_config(config, "w1"))
    caplog.set_level("INFO", logger="dslo_edge.hub_service")
    start_online(worker, broker.port)
    acks = []
    try:
        broker.stop()
        deadline = time.monotonic() + 10
        while worker.connection.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        inputs = np.random.default_rng(0).random((2, 64), dtype=np.float32)
        request = LabelRequest(b"k" * 16, time.time(), ["a", "b"], inputs)
        worker.incoming.put(
            Incoming(
                device="kitchen",
                payload=encode_request(request),
                response_topic="dslo/kitchen/labels",
                correlation=request.request_id,
                redelivered=False,
                ack=lambda: acks.append(request.request_id),
                received_at=time.monotonic(),
            )
        )
        deadline = time.monotonic() + 10
        while not serve_warnings(caplog) and time.monotonic() < deadline:
            time.sleep(0.05)
        broker_factory("mosquitto", port=broker.port)
        client, received = subscribed_client(broker.port, "dslo/kitchen/labels")
        try:
            reply = received.get(timeout=15)
        finally:
            client.disconnect()
            client.loop_stop()
    finally:
        worker.stop()

    [warning] = serve_warnings(caplog)
    assert warning.exc_info is None
    assert warning.getMessage() == (
        "Hub worker w1 did not finish serving 1 requests: the broker connection "
        "was lost while 1 responses were sent; paho keeps the unsent ones queued "
        "and sends them when the worker reconnects, unless it stops first. The "
        "requests stay unacknowledged, so the broker sends them again if it kept "
        "the session, and they get their stored responses"
    )
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []
    assert user_properties(reply.properties)["status"] == "ok"
    assert reply.properties.CorrelationData == b"k" * 16
    assert decode_update(reply.payload).sample_ids == ["a", "b"]
    assert acks == []


def serve_warnings(caplog) -> list:
    return [
        record
        for record in caplog.records
        if record.name == "dslo_edge.hub_service"
        and "did not finish serving" in record.getMessage()
    ]
