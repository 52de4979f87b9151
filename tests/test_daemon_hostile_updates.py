"""Hostile soft-label updates sent to a running daemon through mosquitto."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dslo_edge.config import load_config, render_config
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.hub import HubClient
from dslo_edge.protocol import SoftLabelUpdate, encode_update, new_message_id

DEVICE = "hostile"
WAIT_S = 30.0


def make_update(seed: int, timestamp: float) -> SoftLabelUpdate:
    rng = np.random.default_rng(seed)
    return SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="test-teacher",
        teacher_round=1,
        timestamp=timestamp,
        sample_ids=[f"s{seed}-{i}" for i in range(4)],
        inputs=rng.random((4, 64), dtype=np.float32),
        labels=rng.dirichlet(np.ones(10), size=4).astype(np.float32),
        label_kind="probabilities",
    )


def start_daemon(tmp_path: Path, bundle: Path, port: int) -> EdgeDaemon:
    path = tmp_path / "device.toml"
    path.write_text(render_config(DEVICE, bundle, tmp_path / "state", port))
    daemon = EdgeDaemon(load_config(path))
    daemon.start()
    assert daemon.subscribed.wait(WAIT_S)
    return daemon


def test_extreme_timestamps_short_messages(mlp_pair, mosquitto, tmp_path, caplog):
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port)
    hub = HubClient(mosquitto.host, mosquitto.port, DEVICE)
    try:
        with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
            hub.publish(encode_update(make_update(1, 1e300)))
            hub.publish(encode_update(make_update(2, -1e300)))
            metrics = hub.wait_for_metrics(lambda m: m["processed"] >= 2, WAIT_S)
    finally:
        hub.close()
        daemon.stop()

    assert metrics["rejected"] == {"clock_skew": 1, "stale": 1}
    messages = [
        r.getMessage() for r in caplog.records if "Rejected update" in r.getMessage()
    ]
    assert len(messages) == 2
    assert "timestamp is 1e+300 s in the future" in messages[0]
    assert "published 1e+300 s ago" in messages[1]
    assert max(len(message) for message in messages) < 300
