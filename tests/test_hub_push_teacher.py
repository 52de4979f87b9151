"""Scheduled pushes label with the loaded teacher, not the file on disk."""

from __future__ import annotations

import queue
import shutil
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.models import TeacherModel
from dslo_edge.protocol import decode_update
from tests.hub_fleet import (
    HubWatcher,
    subscribed_client,
    wait_online,
    write_hub_config,
)


@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Convert a second 64-input teacher and one that takes 32 inputs."""
    keras = pytest.importorskip("keras")
    from converters.bundle import convert_teacher

    keras.utils.set_random_seed(11)
    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for name, inputs in (("same-shape", 64), ("other-shape", 32)):
        model = keras.Sequential(
            [keras.Input((inputs,)), keras.layers.Dense(10, activation="softmax")]
        )
        paths.append(convert_teacher(model, folder / f"{name}.tflite"))
    return paths[0], paths[1]


def updates_client(port: int) -> tuple[mqtt.Client, queue.Queue]:
    """Subscribe to kitchen's updates and wait for the confirmation."""
    return subscribed_client(
        port, "dslo/kitchen/updates", lambda message: message.payload
    )


def write_config(folder: Path, port: int, teacher: Path, x: np.ndarray) -> Path:
    """Write a config that pushes x to kitchen hourly and polls the teacher hourly."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "data.npz", x=x)
    extra = {"teacher": 'output_kind = "probabilities"'}
    config = write_hub_config(folder, port, teacher, extra)
    text = config.read_text().replace("reload_poll_s = 0.5", "reload_poll_s = 3600")
    push = (
        '\n[[push]]\nname = "nightly"\ndevices = ["kitchen"]\ndata = "data.npz"\n'
        "every_s = 3600\nbatch_size = 16\n"
    )
    config.write_text(text + push)
    return config


def test_push_ignores_rejected_teacher_file(
    mlp_pair, other_teachers, mosquitto, tmp_path
) -> None:
    same_shape, other_shape = other_teachers
    teacher = tmp_path / "teacher.tflite"
    shutil.copy(load_bundle(mlp_pair.bundle).teacher_path, teacher)
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    config = write_config(tmp_path / "hub", mosquitto.port, teacher, x)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = updates_client(mosquitto.port)
    watcher = HubWatcher(mosquitto.port)
    try:
        worker.start()
        wait_online(watcher, ["w1"])
        assert worker.pushes is not None
        deadline = time.monotonic() + 15
        while worker.pushes.runs == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.pushes.runs == 1
        # The first run's three updates come from the first teacher.
        for _ in range(3):
            received.get(timeout=10)

        shutil.copy(same_shape, teacher)
        assert worker.teacher.reload_if_changed(force=True)
        loaded = worker.teacher.current
        # Copied over in place and rejected, so the loaded version stays.
        shutil.copy(other_shape, teacher)
        assert not worker.teacher.reload_if_changed(force=True)
        worker.pushes.run_once(worker.config.pushes[0])
        updates = [decode_update(received.get(timeout=10)) for _ in range(3)]
    finally:
        worker.stop()
        watcher.close()
        client.disconnect()
        client.loop_stop()

    expected = TeacherModel(same_shape, "probabilities").predict(x)
    assert worker.teacher.current.identity == loaded.identity
    assert [update.teacher_version for update in updates] == [loaded.version] * 3
    assert [update.teacher_round for update in updates] == [2, 2, 2]
    labels = np.concatenate([update.labels for update in updates])
    assert labels.shape == (40, 10)
    np.testing.assert_allclose(labels, expected, rtol=1e-6)
