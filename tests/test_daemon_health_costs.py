"""Probe-set rollback, energy figures and the training budget in the daemon."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from dslo_edge.bundle import load_bundle
from dslo_edge.config import load_config, render_config
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.health import HealthGuard
from dslo_edge.hub import HubClient
from dslo_edge.models import StudentModel
from dslo_edge.protocol import SoftLabelUpdate, encode_update, new_message_id

DEVICE = "health-device"


def bundle_with_probe(source: Path, folder: Path) -> Path:
    """Copy a bundle and add a probe set labelled by its own factory student."""
    bundle = folder / "bundle"
    shutil.copytree(source, bundle)
    x = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    y = np.argmax(StudentModel(load_bundle(bundle)).infer(x), axis=1)
    np.savez(bundle / "probe.npz", x=x, y=y)
    return bundle


def start(
    tmp_path: Path, bundle: Path, broker, **sections
) -> tuple[EdgeDaemon, HubClient]:
    protocol = "5" if broker.kind == "mosquitto" else "3.1.1"
    path = tmp_path / "device.toml"
    path.write_text(
        render_config(
            DEVICE,
            bundle,
            tmp_path / "state",
            broker.port,
            protocol=protocol,
            learning_rate=5.0,
            overrides=sections,
        )
    )
    daemon = EdgeDaemon(load_config(path))
    daemon.start()
    hub_protocol = mqtt.MQTTv5 if broker.kind == "mosquitto" else mqtt.MQTTv311
    hub = HubClient(broker.host, broker.port, DEVICE, hub_protocol)
    hub.wait_for_metrics(lambda m: True, 30)
    return daemon, hub


def one_class_update(seed: int, label: int = 0) -> bytes:
    """An update that labels every sample as one class: harmful at a high rate."""
    rng = np.random.default_rng(seed)
    labels = np.full((16, 10), 1e-4, dtype=np.float32)
    labels[:, label] = 1 - 9e-4
    return encode_update(
        SoftLabelUpdate(
            message_id=new_message_id(),
            teacher_version="bad-teacher",
            teacher_round=1,
            timestamp=time.time(),
            sample_ids=[f"b{seed}-{i}" for i in range(16)],
            inputs=rng.random((16, 64), dtype=np.float32),
            labels=labels,
            label_kind="probabilities",
            hard_labels=np.full(16, label, dtype=np.int32),
        )
    )


def test_probe_drop_rolls_back_to_factory(mlp_pair, broker, tmp_path) -> None:
    bundle = bundle_with_probe(mlp_pair.bundle, tmp_path)
    daemon, hub = start(
        tmp_path,
        bundle,
        broker,
        health={"probe_every": 2, "max_accuracy_drop": 0.2},
        training={"checkpoint_every": 50},
    )
    factory = daemon.student.get_weights()
    try:
        for seed in range(6):
            hub.publish(one_class_update(seed))
        metrics = hub.wait_for_metrics(lambda m: m["processed"] >= 6, 30)
    finally:
        hub.close()
        daemon.stop()

    assert metrics["rollbacks"] >= 1
    assert "probe accuracy fell" in metrics["last_rollback"]
    assert metrics["probe_accuracy"] is not None
    restored = EdgeDaemon(daemon.config)
    restored._restore()
    assert restored.health.last_accuracy >= 0.8
    weights = restored.student.get_weights()
    changed = [n for n in factory if not np.array_equal(weights[n], factory[n])]
    # At most the updates after the last rollback remain.
    assert metrics["applied_total"] < 6 or changed == []


def test_non_finite_weights_are_a_problem(mlp_pair) -> None:
    student = StudentModel(load_bundle(mlp_pair.bundle))
    weights = student.get_weights()
    name = next(iter(weights))
    weights[name] = weights[name].copy()
    weights[name].flat[0] = np.nan

    problem = HealthGuard(None, 0.1).problem(student, weights)

    assert problem == f"non-finite values in weights {name}"


def test_metrics_report_energy_from_profile(mlp_pair, broker, tmp_path) -> None:
    path = tmp_path / "device.toml"
    daemon, hub = start(
        tmp_path,
        mlp_pair.bundle,
        broker,
        device={"profile": "generic-x86_64", "battery_wh": 50.0},
    )
    try:
        for seed in range(5):
            hub.publish(one_class_update(100 + seed, label=seed))
        metrics = hub.wait_for_metrics(lambda m: m["applied"] >= 5, 30)
    finally:
        hub.close()
        daemon.stop()
    del path

    energy = metrics["energy"]
    assert energy["source"] == "profile generic-x86_64 power model (CPU time)"
    assert energy["estimated"] is True
    assert energy["updates"] == 5
    assert energy["joules_per_update"] > 0
    assert energy["battery"]["capacity_wh"] == 50.0
    assert energy["battery"]["percent_per_1000_updates"] > 0
    assert metrics["training"]["paused"] is False


def test_energy_budget_pauses_training(mlp_pair, broker, tmp_path) -> None:
    daemon, hub = start(
        tmp_path,
        mlp_pair.bundle,
        broker,
        device={"profile": "generic-x86_64"},
        budget={"energy_budget_j_per_hour": 1e-9},
    )
    try:
        hub.publish(one_class_update(200))
        hub.wait_for_metrics(lambda m: m["applied"] == 1, 30)
        for seed in range(3):
            hub.publish(one_class_update(201 + seed))
        metrics = hub.wait_for_metrics(lambda m: m["training"]["paused"], 30)
        # The pause may come before the broker delivers all three updates.
        deadline = time.monotonic() + 30
        while daemon.updates.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Training stays paused, so none of them is applied in this time.
        time.sleep(1.5)
        held = daemon.updates.qsize()
        applied = daemon.metrics.applied
    finally:
        hub.close()
        daemon.stop()

    assert "energy" in metrics["training"]["reason"]
    assert applied == 1
    assert held == 3


def test_energy_budget_survives_restart(mlp_pair, broker, tmp_path) -> None:
    sections = {
        "device": {"profile": "generic-x86_64"},
        "budget": {"energy_budget_j_per_hour": 1e-9},
    }
    daemon, hub = start(tmp_path, mlp_pair.bundle, broker, **sections)
    try:
        hub.publish(one_class_update(210))
        hub.wait_for_metrics(lambda m: m["applied"] == 1, 30)
    finally:
        hub.close()
        daemon.stop()

    # The same state_dir: the budget spent before the stop still counts.
    restarted, hub = start(tmp_path, mlp_pair.bundle, broker, **sections)
    try:
        hub.publish(one_class_update(211))
        deadline = time.monotonic() + 30
        while restarted.updates.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)
        held = restarted.updates.qsize()
        applied = restarted.metrics.applied
        decision = restarted.costs.decision()
    finally:
        hub.close()
        restarted.stop()

    assert decision.paused
    assert decision.codes == ("energy",)
    assert applied == 0
    assert held == 1


def test_weight_blow_up_rolls_back_without_probe(mlp_pair, broker, tmp_path) -> None:
    daemon, hub = start(tmp_path, mlp_pair.bundle, broker)
    factory = daemon.student.get_weights()
    rng = np.random.default_rng(300)
    update = SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="t",
        teacher_round=1,
        timestamp=time.time(),
        sample_ids=[f"huge-{i}" for i in range(8)],
        # Finite and under max_abs_input, but far outside any real sensor.
        inputs=np.full((8, 64), 9e5, dtype=np.float32),
        labels=rng.dirichlet(np.ones(10), size=8).astype(np.float32),
        label_kind="probabilities",
    )
    try:
        hub.publish(encode_update(update))
        metrics = hub.wait_for_metrics(lambda m: m["rollbacks"] >= 1, 30)
        weights = daemon.student.get_weights()
    finally:
        hub.close()
        daemon.stop()

    assert "weight norm grew" in metrics["last_rollback"]
    for name, value in factory.items():
        np.testing.assert_array_equal(weights[name], value)
