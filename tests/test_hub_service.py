"""A hub worker in this process: teacher reload, pushes and bad requests."""

from __future__ import annotations

import queue
import shutil
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.hub import default_sample_ids
from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.label_protocol import request_properties
from dslo_edge.label_requests import RequestSettings
from dslo_edge.protocol import decode_update
from tests.hub_fleet import HubWatcher, SimulatedDevice, drain_inbox, write_hub_config


@pytest.fixture
def mosquitto(broker_factory):
    return broker_factory("mosquitto")


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


def test_scheduled_push_reaches_device(mlp_pair, mosquitto, tmp_path) -> None:
    data = tmp_path / "hub" / "data.npz"
    data.parent.mkdir()
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    np.savez(data, x=x)
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    push = (
        '\n[[push]]\nname = "nightly"\ndevices = ["kitchen"]\ndata = "data.npz"\n'
        "every_s = 3600\nbatch_size = 16\n"
    )
    config.write_text(config.read_text() + push)
    received: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, message: received.put(message.payload)
    client.connect("127.0.0.1", mosquitto.port)
    client.subscribe("dslo/kitchen/updates", qos=1)
    client.loop_start()
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


def test_foreign_response_topic_gets_no_labels(mlp_pair, mosquitto, tmp_path) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    worker = HubWorker(load_hub_config(config, "w1"))
    received: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, message: received.put(message.topic)
    client.connect("127.0.0.1", mosquitto.port)
    client.subscribe("dslo/+/labels", qos=1)
    client.loop_start()
    worker.start()
    try:
        time.sleep(0.5)
        client.publish(
            "dslo/intruder/requests",
            b"DSLQ",
            qos=1,
            properties=request_properties("dslo/victim/labels", b"r" * 16),
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
    assert counters["unanswerable"] == 1
    assert counters["rejected"] == 1
