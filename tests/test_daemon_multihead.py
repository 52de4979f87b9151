"""The daemon trains a two-head student from updates sent through mosquitto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.models import StudentModel
from dslo_edge.multihead import MultiHeadTrainer
from dslo_edge.multihead_protocol import encode_multi_head_update
from dslo_edge.protocol import encode_update
from tests.multihead_bundle import make_multi_head_update
from tests.test_daemon import hub_client, make_update, wait_processed, write_config

pytestmark = pytest.mark.slow

UPDATES = 4


def _unchanged(weights: dict, reference: dict) -> bool:
    return all(np.array_equal(weights[name], reference[name]) for name in reference)


def test_daemon_applies_multi_head_updates(
    two_head_bundle: Path, broker_factory, tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    config = write_config(
        tmp_path,
        two_head_bundle,
        broker,
        **{"training.tasks.shape": {"weight": 0.5, "temperature": 4.0}},
    )
    factory = StudentModel(load_bundle(two_head_bundle)).get_weights()
    daemon = EdgeDaemon(config)
    daemon.start()
    hub = hub_client(broker)
    try:
        wait_processed(hub, 0)
        for seed in range(UPDATES):
            hub.publish(encode_multi_head_update(make_multi_head_update(seed)))
        metrics = wait_processed(hub, UPDATES)
        trained = daemon.student.get_weights()

        hub.publish(encode_update(make_update(50)))
        after_single = wait_processed(hub, UPDATES + 1)
        after_rejection = daemon.student.get_weights()
    finally:
        hub.close()
        daemon.stop()

    assert isinstance(daemon.trainer, MultiHeadTrainer)
    assert daemon.trainer.tasks["shape"].weight == 0.5
    assert metrics["applied"] == UPDATES
    assert metrics["samples_applied"] == UPDATES * 8
    assert metrics["rejected"] == {}
    assert metrics["progress"] == pytest.approx(UPDATES / 50)
    assert set(metrics["teacher"]) == {"digit", "shape"}
    assert metrics["dynamic"]["heads"]["shape"]["applied_updates"] == UPDATES
    assert not _unchanged(trained, factory)
    assert after_single["applied"] == UPDATES
    assert after_single["rejected"] == {"shape_mismatch": 1}
    assert _unchanged(after_rejection, trained)

    restarted = EdgeDaemon(config)
    restarted._restore()
    assert restarted.restored_from.startswith("checkpoint-")
    assert restarted.trainer.applied_updates == UPDATES
    assert _unchanged(restarted.student.get_weights(), trained)
    for name in ("digit", "shape"):
        saved = daemon.trainer.engine.engines[name].store.to_arrays()
        loaded = restarted.trainer.engine.engines[name].store.to_arrays()
        assert loaded[0] == saved[0]
        np.testing.assert_array_equal(loaded[1], saved[1])


def test_single_head_daemon_rejects_heads(
    mlp_pair, broker_factory, tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    config = write_config(tmp_path, mlp_pair.bundle, broker)
    daemon = EdgeDaemon(config)
    daemon.start()
    hub = hub_client(broker)
    try:
        wait_processed(hub, 0)
        factory = daemon.student.get_weights()
        hub.publish(encode_multi_head_update(make_multi_head_update(60)))
        metrics = wait_processed(hub, 1)
        weights = daemon.student.get_weights()
    finally:
        hub.close()
        daemon.stop()

    assert metrics["applied"] == 0
    assert metrics["rejected"] == {"shape_mismatch": 1}
    assert _unchanged(weights, factory)
