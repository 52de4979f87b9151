"""Per-head probe accuracy of a converted two-head student, in the health
check, the bundle checks and a running daemon."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.errors import BundleError
from dslo_edge.health import HealthGuard, check_bundle_probe, load_bundle_probe
from dslo_edge.inspect import format_report, inspect_bundle
from dslo_edge.multihead_model import load_student
from dslo_edge.multihead_protocol import (
    HeadLabels,
    MultiHeadUpdate,
    encode_multi_head_update,
)
from dslo_edge.ota_sender import pack_bundle
from dslo_edge.protocol import new_message_id
from dslo_edge.swap import BundleStore, release_id
from tests.multihead_bundle import HEADS, INPUT_SIZE
from tests.test_daemon_health_costs import DEVICE, start

pytestmark = pytest.mark.slow

PROBE_ROWS = 64
REPO = Path(__file__).resolve().parents[1]


def probe_inputs() -> np.ndarray:
    return np.random.default_rng(0).random((PROBE_ROWS, INPUT_SIZE), dtype=np.float32)


def factory_predictions(bundle: Path) -> dict[str, np.ndarray]:
    """Return the class that the bundle's own student predicts, per head."""
    outputs = load_student(load_bundle(bundle)).infer(probe_inputs())
    return {head: np.argmax(outputs[head], axis=1) for head in HEADS}


def copy_with_probe(source: Path, folder: Path, **labels: np.ndarray) -> Path:
    """Copy a bundle and write a probe.npz with ``probe_inputs`` and ``labels``."""
    bundle = folder / "bundle"
    shutil.copytree(source, bundle)
    np.savez(bundle / "probe.npz", x=probe_inputs(), **labels)
    return bundle


def self_labelled(source: Path, folder: Path) -> Path:
    """Copy a bundle with a probe set that its factory student gets all right."""
    labels = factory_predictions(source)
    return copy_with_probe(
        source, folder, y_digit=labels["digit"], y_shape=labels["shape"]
    )


def test_accuracy_is_measured_per_head(two_head_bundle: Path, tmp_path) -> None:
    labels = factory_predictions(two_head_bundle)
    shape = labels["shape"].copy()
    # A quarter of the shape labels disagree with the student.
    shape[:16] = (shape[:16] + 1) % HEADS["shape"]
    bundle = copy_with_probe(
        two_head_bundle, tmp_path, y_digit=labels["digit"], y_shape=shape
    )
    guard = HealthGuard(load_bundle_probe(load_bundle(bundle)), 0.1)

    accuracy = guard.accuracy(load_student(load_bundle(bundle)))

    assert guard.last_head_accuracy == {"digit": 1.0, "shape": 0.75}
    assert accuracy == pytest.approx(0.875)
    assert guard.last_accuracy == pytest.approx(0.875)


def test_fall_of_one_head_is_a_problem(two_head_bundle: Path, tmp_path) -> None:
    bundle = self_labelled(two_head_bundle, tmp_path)
    student = load_student(load_bundle(bundle))
    guard = HealthGuard(load_bundle_probe(load_bundle(bundle)), 0.1)
    guard.accuracy(student)
    guard.accept(student.get_weights())
    rare = int(np.argmin(np.bincount(factory_predictions(bundle)["shape"])))
    share = float(np.mean(factory_predictions(bundle)["shape"] == rare))
    weights = student.get_weights()
    # Only the shape head changes: it now predicts its rarest class everywhere.
    # The weight norm stays well under 10 times its baseline.
    weights["shape_kernel"] = np.zeros_like(weights["shape_kernel"])
    weights["shape_bias"] = np.zeros(HEADS["shape"], dtype=np.float32)
    weights["shape_bias"][rare] = 1.0
    student.set_weights(weights)

    problem = guard.problem(student, student.get_weights())

    assert guard.last_head_accuracy == {"digit": 1.0, "shape": pytest.approx(share)}
    assert problem == (
        f"probe accuracy fell on head 'shape' to {share:.3f} from 1.000, more "
        "than the allowed 0.100"
    )


def test_fall_within_max_drop_is_accepted(two_head_bundle: Path, tmp_path) -> None:
    bundle = self_labelled(two_head_bundle, tmp_path)
    student = load_student(load_bundle(bundle))
    guard = HealthGuard(load_bundle_probe(load_bundle(bundle)), 0.9)
    guard.accuracy(student)
    guard.accept(student.get_weights())
    weights = student.get_weights()
    weights["shape_kernel"] = np.zeros_like(weights["shape_kernel"])
    weights["shape_bias"] = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    student.set_weights(weights)

    problem = guard.problem(student, student.get_weights())

    assert problem is None
    assert guard.last_head_accuracy["shape"] < 1.0
    assert guard.baseline_heads == {"digit": 1.0, "shape": 1.0}


def test_single_label_probe_is_rejected_by_checks(
    two_head_bundle: Path, tmp_path
) -> None:
    labels = factory_predictions(two_head_bundle)
    bundle = copy_with_probe(two_head_bundle, tmp_path, y=labels["digit"])

    with pytest.raises(BundleError) as caught:
        check_bundle_probe(load_bundle(bundle))

    message = str(caught.value)
    assert f"probe set {bundle / 'probe.npz'} has arrays ['x', 'y']" in message
    assert "save each head's labels as y_<head>" in message
    assert "numpy.savez(path, x=x, y_digit=..., y_shape=...)" in message


def test_daemon_starts_without_single_label_probe(
    two_head_bundle: Path, broker, tmp_path, caplog
) -> None:
    """A device upgraded with such a probe set, which earlier versions ignored."""
    labels = factory_predictions(two_head_bundle)
    bundle = copy_with_probe(two_head_bundle, tmp_path, y=labels["digit"])

    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon, hub = start(tmp_path, bundle, broker)
    try:
        metrics = hub.wait_for_metrics(lambda m: True, 30)
    finally:
        hub.close()
        daemon.stop()

    assert daemon.health.probe is None
    assert metrics["probe_accuracy_heads"] is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "checks the student's weights without its probe set" in text
        and "has arrays ['x', 'y']" in text
        and "save each head's labels as y_<head>" in text
        for text in warnings
    ), warnings


def test_old_release_probe_is_left_out(
    two_head_bundle: Path, broker, tmp_path, caplog
) -> None:
    bundle = self_labelled(two_head_bundle, tmp_path)
    state = tmp_path / "state"
    archive = tmp_path / "release.tar"
    archive.write_bytes(pack_bundle(bundle))
    store = BundleStore(state)
    release = store.install_archive(archive)
    store.activate(release)
    # Earlier versions installed a multi-head release with a single y.
    np.savez(release / "probe.npz", x=probe_inputs(), y=np.zeros(PROBE_ROWS))

    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon, hub = start(tmp_path, bundle, broker)
    hub.close()
    daemon.stop()

    assert daemon.bundle.path == release
    assert daemon.health.probe is None
    assert any(
        f"probe set {release / 'probe.npz'} has arrays ['x', 'y']" in r.getMessage()
        for r in caplog.records
    )


def test_extra_single_label_is_rejected(two_head_bundle: Path, tmp_path) -> None:
    labels = factory_predictions(two_head_bundle)
    bundle = copy_with_probe(
        two_head_bundle,
        tmp_path,
        y=labels["digit"],
        y_digit=labels["digit"],
        y_shape=labels["shape"],
    )

    with pytest.raises(BundleError) as caught:
        check_bundle_probe(load_bundle(bundle))

    message = str(caught.value)
    assert message.startswith(
        f"probe set {bundle / 'probe.npz'} has y, which a student with several "
        "heads does not read, so remove it; expected an .npz with x and one "
        "label array per head (y_digit, y_shape)"
    )
    assert "numpy.savez(path, x=x, y_digit=..., y_shape=...)" in message


def test_bad_head_labels_reject_bundle(two_head_bundle: Path, tmp_path) -> None:
    labels = factory_predictions(two_head_bundle)
    shape = labels["shape"].copy()
    shape[5] = HEADS["shape"]
    bundle = copy_with_probe(
        two_head_bundle, tmp_path, y_digit=labels["digit"], y_shape=shape
    )

    with pytest.raises(BundleError) as caught:
        check_bundle_probe(load_bundle(bundle))

    assert "has y_shape labels 0..3, but head 'shape' has 3 classes" in str(
        caught.value
    )


def test_inspect_lists_probe_heads(two_head_bundle: Path, tmp_path) -> None:
    bundle = self_labelled(two_head_bundle, tmp_path)

    report = inspect_bundle(bundle)

    assert report["probe"] == {
        "file": "probe.npz",
        "samples": PROBE_ROWS,
        "used": True,
        "heads": ["digit", "shape"],
    }
    assert (
        "probe set: probe.npz, 64 samples with labels for the heads digit, shape"
        in format_report(report)
    )


def one_class_update(seed: int, digit: int, shape: int) -> bytes:
    """Return an update that labels every sample as one class per head."""
    rng = np.random.default_rng(seed)
    heads = {}
    for head, label in (("digit", digit), ("shape", shape)):
        labels = np.full((16, HEADS[head]), 1e-4, dtype=np.float32)
        labels[:, label] = 1 - 1e-4 * (HEADS[head] - 1)
        heads[head] = HeadLabels(labels, hard_labels=np.full(16, label, np.int32))
    return encode_multi_head_update(
        MultiHeadUpdate(
            message_id=new_message_id(),
            teacher_version="bad-teacher",
            teacher_round=1,
            timestamp=time.time(),
            sample_ids=[f"h{seed}-{i}" for i in range(16)],
            inputs=rng.random((16, INPUT_SIZE), dtype=np.float32),
            heads=heads,
        )
    )


def test_daemon_rolls_back_when_one_head_falls(
    two_head_bundle: Path, broker, tmp_path
) -> None:
    bundle = self_labelled(two_head_bundle, tmp_path)
    predicted = factory_predictions(bundle)
    # The digit head is pushed to the class it already predicts most, so its
    # accuracy stays near that share or above. The shape head is
    # pushed to its rarest class, so its accuracy falls to about that share.
    digit = int(np.argmax(np.bincount(predicted["digit"])))
    shape = int(np.argmin(np.bincount(predicted["shape"])))
    digit_share = float(np.mean(predicted["digit"] == digit))
    assert digit_share >= 0.8
    daemon, hub = start(
        tmp_path,
        bundle,
        broker,
        health={"probe_every": 2, "max_accuracy_drop": 0.3},
        training={"checkpoint_every": 50},
    )
    factory = daemon.student.get_weights()
    first = hub.wait_for_metrics(lambda m: True, 30)
    try:
        for seed in range(6):
            hub.publish(one_class_update(seed, digit, shape))
        # With no unsaved update left, the check after the last one has run.
        metrics = hub.wait_for_metrics(
            lambda m: m["processed"] >= 6 and m["unsaved"] == 0, 30
        )
        weights = daemon.student.get_weights()
    finally:
        hub.close()
        daemon.stop()

    assert first["probe_accuracy_heads"] == {"digit": 1.0, "shape": 1.0}
    assert first["probe_accuracy"] == 1.0
    assert metrics["rollbacks"] >= 1
    reason = metrics["last_rollback"]
    fallen = re.fullmatch(
        r"probe accuracy fell on head 'shape' to ([0-9.]+) from 1\.000, "
        r"more than the allowed 0\.300",
        reason,
    )
    assert fallen is not None, reason
    assert float(fallen.group(1)) < 0.7
    # The rollback restored the factory weights, which the probe set fits.
    assert metrics["probe_accuracy_heads"] == {"digit": 1.0, "shape": 1.0}
    for name, value in factory.items():
        np.testing.assert_array_equal(weights[name], value)


def test_pack_rejects_single_label_probe(two_head_bundle: Path, tmp_path) -> None:
    labels = factory_predictions(two_head_bundle)
    bundle = copy_with_probe(two_head_bundle, tmp_path, y=labels["shape"])

    with pytest.raises(BundleError) as caught:
        pack_bundle(bundle)

    assert "a single y fits only a single-head student" in str(caught.value)


def ota_send(broker, bundle: Path) -> subprocess.CompletedProcess:
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
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=environment
    )


def test_swap_rolls_back_fallen_head_first(
    two_head_bundle: Path, broker, tmp_path
) -> None:
    bundle = self_labelled(two_head_bundle, tmp_path)
    predicted = factory_predictions(bundle)
    digit = int(np.argmax(np.bincount(predicted["digit"])))
    shape = int(np.argmin(np.bincount(predicted["shape"])))
    # Checks run only before saves, and no save comes before the swap.
    daemon, hub = start(
        tmp_path,
        bundle,
        broker,
        health={"probe_every": 0, "max_accuracy_drop": 0.3},
        training={"checkpoint_every": 50},
    )
    factory = daemon.student.get_weights()
    try:
        for seed in range(2):
            hub.publish(one_class_update(10 + seed, digit, shape))
        before = hub.wait_for_metrics(lambda m: m["processed"] >= 2, 30)

        sent = ota_send(broker, bundle)

        after = hub.wait_for_metrics(lambda m: m["rollbacks"] >= 1, 30)
        weights = daemon.student.get_weights()
        guard = daemon.health
    finally:
        hub.close()
        daemon.stop()

    assert before["rollbacks"] == 0
    assert before["unsaved"] == 2
    assert sent.returncode == 0, sent.stderr
    assert f"installed release {release_id(bundle)}" in sent.stdout
    assert after["rollbacks"] == 1
    assert after["last_rollback"].startswith("probe accuracy fell on head 'shape'")
    # The release carried over the rolled-back weights, not the harmful ones.
    for name, value in factory.items():
        np.testing.assert_array_equal(weights[name], value)
    assert guard.baseline_heads == {"digit": 1.0, "shape": 1.0}


def test_release_extra_y_keeps_head_probe(
    two_head_bundle: Path, broker, tmp_path, caplog
) -> None:
    bundle = self_labelled(two_head_bundle, tmp_path)
    state = tmp_path / "state"
    archive = tmp_path / "release.tar"
    archive.write_bytes(pack_bundle(bundle))
    store = BundleStore(state)
    release = store.install_archive(archive)
    store.activate(release)
    labels = factory_predictions(two_head_bundle)
    # Earlier versions installed and read such a release, ignoring its y.
    np.savez(
        release / "probe.npz",
        x=probe_inputs(),
        y=np.zeros(PROBE_ROWS),
        y_digit=labels["digit"],
        y_shape=labels["shape"],
    )

    with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
        daemon, hub = start(tmp_path, bundle, broker)
    hub.close()
    daemon.stop()

    assert daemon.bundle.path == release
    assert daemon.health.probe is not None
    assert set(daemon.health.probe.labels) == set(HEADS)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "ignores y in its probe set" in text
        and f"probe set {release / 'probe.npz'} has y" in text
        for text in warnings
    ), warnings
