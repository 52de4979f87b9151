"""`dslo-edge push --hard-labels` with -1 labels, for samples without a hard label.

A real mosquitto on 127.0.0.1 carries the updates to a real daemon. The
tests decode the published payloads and record the hard labels each train
step of the daemon's student receives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dslo_edge.bundle import load_bundle
from dslo_edge.cli import main
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.models import TeacherModel
from dslo_edge.multihead_decode import decode_multi_head_update
from dslo_edge.protocol import decode_update
from tests.multihead_bundle import HEADS
from tests.test_daemon import DEVICE as HEADS_DEVICE
from tests.test_daemon import write_config
from tests.test_hub_service import device_updates
from tests.test_push_command import (
    run_push,
    start_daemon,
    wait_for_count,
    watch_updates,
)

pytestmark = pytest.mark.slow

SAMPLES = 24
BATCH = 8
MESSAGES = SAMPLES // BATCH
# Rows of the first batch without a hard label. The second batch has a label
# for every sample and the third batch for none.
MISSING_IN_FIRST = [1, 4, 6]


def record_hard_labels(student) -> list[tuple[np.ndarray, np.ndarray]]:
    """Wrap a single-head student's train_step and return its (soft, hard) inputs."""
    steps: list[tuple[np.ndarray, np.ndarray]] = []
    original = student.train_step

    def train_step(x, soft, hard, alpha, temperature, learning_rate):
        steps.append((np.array(soft), np.array(hard)))
        return original(x, soft, hard, alpha, temperature, learning_rate)

    student.train_step = train_step
    return steps


def labels_unlike_teacher(bundle: Path, x: np.ndarray) -> np.ndarray:
    """Return a label per row that differs from the teacher's argmax, -1 in some.

    A label that differs from the argmax shows whether the device trained on
    it or on its argmax fallback.
    """
    teacher = TeacherModel(load_bundle(bundle).teacher_path, "probabilities")
    labels = (teacher.predict(x).argmax(axis=1) + 1) % 10
    labels[MISSING_IN_FIRST] = -1
    labels[2 * BATCH :] = -1
    return labels.astype(np.int32)


@pytest.mark.parametrize("fallback", ["argmax", "mask"])
def test_minus_one_labels_train_with_fallback(
    mlp_pair, broker_factory, tmp_path: Path, fallback: str
) -> None:
    broker = broker_factory("mosquitto")
    x = np.random.default_rng(7).random((SAMPLES, 64), dtype=np.float32)
    labels = labels_unlike_teacher(mlp_pair.bundle, x)
    data = tmp_path / "partly-labelled.npz"
    np.savez(data, x=x, y=labels)
    training = {"hard_label_fallback": fallback}
    daemon = start_daemon(mlp_pair.bundle, broker, tmp_path, training=training)
    steps = record_hard_labels(daemon.trainer.student)
    watcher, received = watch_updates(broker.port)
    try:
        result = run_push(mlp_pair.bundle, data, broker.url, "--hard-labels")
        wait_for_count(received, MESSAGES)
        applied = daemon.metrics.applied
        rejected = dict(daemon.metrics.rejected)
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        daemon.stop()

    assert result.exit_code == 0, result.output
    assert "applied 3, rejected 0 of this push" in result.output
    assert applied == MESSAGES
    assert rejected == {}

    sent = [decode_update(payload).hard_labels for payload in received]
    assert len(sent) == MESSAGES
    assert sent[0] is not None
    assert sent[0].tolist() == labels[:BATCH].tolist()
    assert sent[1] is not None
    assert sent[1].tolist() == labels[BATCH : 2 * BATCH].tolist()
    # A batch of only -1 labels goes out without a hard label array.
    assert sent[2] is None

    soft = np.concatenate([step[0] for step in steps])
    trained = np.concatenate([step[1] for step in steps])
    labelled = labels >= 0
    assert len(trained) == SAMPLES
    assert trained[labelled].tolist() == labels[labelled].tolist()
    assert np.all(trained[labelled] != soft[labelled].argmax(axis=1))
    if fallback == "argmax":
        expected = soft[~labelled].argmax(axis=1).tolist()
    else:
        expected = [-1] * int((~labelled).sum())
    assert trained[~labelled].tolist() == expected


def record_head_hard_labels(student) -> list[dict[str, tuple[np.ndarray, ...]]]:
    """Wrap a multi-head student's train_step and return each head's (soft, hard)."""
    steps: list[dict[str, tuple[np.ndarray, ...]]] = []
    original = student.train_step

    def train_step(x, targets, weights, learning_rate):
        steps.append(
            {
                name: (np.array(target.soft), np.array(target.hard))
                for name, target in targets.items()
            }
        )
        return original(x, targets, weights, learning_rate)

    student.train_step = train_step
    return steps


def test_head_without_labels_trains_on_argmax(
    two_head_bundle: Path, broker_factory, tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    x = np.random.default_rng(8).random((SAMPLES, 64), dtype=np.float32)
    digit = np.arange(SAMPLES, dtype=np.int32) % HEADS["digit"]
    digit[MISSING_IN_FIRST] = -1
    # Every shape label is -1, so the file has no hard label for that head.
    shape = np.full(SAMPLES, -1, dtype=np.int32)
    data = tmp_path / "samples.npz"
    np.savez(data, x=x, y_digit=digit, y_shape=shape)
    daemon = EdgeDaemon(write_config(tmp_path, two_head_bundle, broker))
    daemon.start()
    steps = record_head_hard_labels(daemon.trainer.student)
    client, received = device_updates(broker.port, HEADS_DEVICE)
    arguments = ["push", "--bundle", str(two_head_bundle), "--data", str(data)]
    arguments += ["--device", HEADS_DEVICE, "--broker", broker.url]
    arguments += ["--batch-size", str(BATCH), "--hard-labels"]
    try:
        result = CliRunner().invoke(main, arguments)
        applied = daemon.metrics.applied
        rejected = dict(daemon.metrics.rejected)
    finally:
        client.disconnect()
        client.loop_stop()
        daemon.stop()

    assert result.exit_code == 0, result.output
    assert applied == MESSAGES
    assert rejected == {}

    updates = [
        decode_multi_head_update(received.get(timeout=5)) for _ in range(MESSAGES)
    ]
    sent_digit = [update.heads["digit"].hard_labels for update in updates]
    assert all(batch is not None for batch in sent_digit)
    assert np.concatenate(sent_digit).tolist() == digit.tolist()
    assert [update.heads["shape"].hard_labels for update in updates] == [None] * 3

    digit_soft = np.concatenate([step["digit"][0] for step in steps])
    digit_trained = np.concatenate([step["digit"][1] for step in steps])
    labelled = digit >= 0
    assert digit_trained[labelled].tolist() == digit[labelled].tolist()
    assert (
        digit_trained[~labelled].tolist()
        == digit_soft[~labelled].argmax(axis=1).tolist()
    )
    shape_soft = np.concatenate([step["shape"][0] for step in steps])
    shape_trained = np.concatenate([step["shape"][1] for step in steps])
    assert shape_trained.tolist() == shape_soft.argmax(axis=1).tolist()
