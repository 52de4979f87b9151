"""Scheduled pushes send a data file's y as hard labels only when asked to."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.errors import ConfigError
from dslo_edge.hub_config import HubConfig, load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.hub_state import HubState
from dslo_edge.privacy import PrivacySettings
from dslo_edge.protocol import SoftLabelUpdate, decode_update
from tests.hub_fleet import subscribed_client, write_hub_config

X = np.random.default_rng(0).random((20, 64), dtype=np.float32)
Y = np.arange(20, dtype=np.int32) % 10


def push_config(
    folder: Path, port: int, teacher: Path, push_keys: str = "", extra=None
) -> Path:
    """Write x and y to data.npz and a config that pushes it to device kitchen."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "data.npz", x=X, y=Y)
    config = write_hub_config(folder, port, teacher, extra)
    push = (
        '\n[[push]]\nname = "nightly"\ndevices = ["kitchen"]\ndata = "data.npz"\n'
        f"every_s = 3600\nbatch_size = 16\n{push_keys}"
    )
    config.write_text(config.read_text() + push)
    return config


@contextmanager
def connected(worker: HubWorker, port: int) -> Iterator[queue.Queue]:
    """Connect the worker's client without starting it; yield kitchen's updates."""
    client: mqtt.Client
    client, received = subscribed_client(
        port, "dslo/kitchen/updates", lambda message: message.payload
    )
    worker.connection.client.connect("127.0.0.1", port)
    worker.connection.client.loop_start()
    try:
        yield received
    finally:
        worker.connection.client.disconnect()
        worker.connection.client.loop_stop()
        client.disconnect()
        client.loop_stop()
        worker.state.close()


def run_push(worker: HubWorker, port: int, count: int) -> list[SoftLabelUpdate]:
    """Run the worker's push once and return the first ``count`` updates."""
    assert worker.pushes is not None
    [schedule] = worker.config.pushes
    with connected(worker, port) as received:
        worker.pushes.run_once(schedule)
        return [decode_update(received.get(timeout=15)) for _ in range(count)]


def test_private_push_sends_no_hard_labels(mlp_pair, mosquitto, tmp_path) -> None:
    privacy = {"privacy": "noise_multiplier = 8.0\nepsilon_budget = 8.0"}
    folder = tmp_path / "hub"
    config = push_config(folder, mosquitto.port, mlp_pair.bundle, extra=privacy)
    worker = HubWorker(load_hub_config(config, "w1"))

    updates = run_push(worker, mosquitto.port, 2)

    assert [update.hard_labels for update in updates] == [None, None]
    assert [update.label_kind for update in updates] == ["probabilities"] * 2
    state = HubState(folder / "state.sqlite", "check")
    try:
        assert state.releases("kitchen") == {8.0: 20}
    finally:
        state.close()


def test_push_leaves_y_unsent_by_default(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    folder = tmp_path / "hub"
    config = push_config(folder, mosquitto.port, mlp_pair.bundle)
    caplog.set_level(logging.WARNING, logger="dslo_edge.hub_config")
    worker = HubWorker(load_hub_config(config, "w1"))

    updates = run_push(worker, mosquitto.port, 2)

    assert [update.hard_labels for update in updates] == [None, None]
    assert [r.getMessage() for r in caplog.records] == [
        f"Push nightly sends no hard labels, but {folder / 'data.npz'} has a y "
        f"array; set hard_labels = true in its [[push]] table in {config} to "
        "send y as hard labels"
    ]


def test_push_sends_hard_labels_when_asked(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    folder = tmp_path / "hub"
    config = push_config(
        folder, mosquitto.port, mlp_pair.bundle, push_keys="hard_labels = true\n"
    )
    caplog.set_level(logging.WARNING, logger="dslo_edge.hub_config")
    worker = HubWorker(load_hub_config(config, "w1"))

    updates = run_push(worker, mosquitto.port, 2)

    assert updates[0].hard_labels is not None
    assert updates[1].hard_labels is not None
    assert updates[0].hard_labels.tolist() == Y[:16].tolist()
    assert updates[1].hard_labels.tolist() == Y[16:].tolist()
    assert caplog.records == []


def test_push_sends_minus_one_labels(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    config = push_config(
        folder, mosquitto.port, mlp_pair.bundle, push_keys="hard_labels = true\n"
    )
    labels = Y.copy()
    labels[[2, 5]] = -1
    # The second batch, rows 16 to 19, has no hard label at all.
    labels[16:] = -1
    np.savez(folder / "data.npz", x=X, y=labels)
    worker = HubWorker(load_hub_config(config, "w1"))

    updates = run_push(worker, mosquitto.port, 2)

    assert updates[0].hard_labels is not None
    assert updates[0].hard_labels.tolist() == labels[:16].tolist()
    assert updates[1].hard_labels is None


def test_changed_file_without_y_keeps_old_samples(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    folder = tmp_path / "hub"
    config = push_config(
        folder, mosquitto.port, mlp_pair.bundle, push_keys="hard_labels = true\n"
    )
    worker = HubWorker(load_hub_config(config, "w1"))
    assert worker.pushes is not None
    [schedule] = worker.config.pushes
    caplog.set_level(logging.ERROR, logger="dslo_edge.hub_pushes")

    with connected(worker, mosquitto.port) as received:
        worker.pushes.run_once(schedule)
        first = [decode_update(received.get(timeout=15)) for _ in range(2)]
        np.savez(folder / "new.npz", x=X[:4])
        os.replace(folder / "new.npz", folder / "data.npz")
        worker.pushes.run_once(schedule)
        second = [decode_update(received.get(timeout=15)) for _ in range(2)]

    assert [u.sample_ids for u in second] == [u.sample_ids for u in first]
    assert second[0].hard_labels is not None
    assert second[0].hard_labels.tolist() == Y[:16].tolist()
    assert [r.getMessage() for r in caplog.records] == [
        "Push nightly cannot use the changed data file: hard_labels = true "
        "needs a 'y' array (one class index per sample) in "
        f"{folder / 'data.npz'}, which has none; add y to the file or remove "
        "hard_labels from this [[push]] table; sending the 20 samples read from "
        "it before, and reading it again at the next run"
    ]


def test_built_private_config_sends_nothing(mlp_pair, mosquitto, tmp_path) -> None:
    config = push_config(
        tmp_path / "hub",
        mosquitto.port,
        mlp_pair.bundle,
        push_keys="hard_labels = true\n",
    )
    loaded: HubConfig = load_hub_config(config, "w1")
    # A configuration built in code skips the checks of load_hub_config.
    private = dataclasses.replace(
        loaded, privacy=PrivacySettings(noise_multiplier=8.0, epsilon_budget=8.0)
    )
    worker = HubWorker(private)
    assert worker.pushes is not None
    [schedule] = private.pushes

    with connected(worker, mosquitto.port) as received:
        with pytest.raises(ConfigError) as caught:
            worker.pushes.run_once(schedule)
        sent = received.qsize()

    assert "hard_labels = true is invalid with a [privacy] table" in str(caught.value)
    assert sent == 0
