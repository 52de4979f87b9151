"""A daemon whose broker session kept the subscriptions of an earlier config."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from dslo_edge.config import load_config, render_config
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.hub import DeviceNotSubscribed, HubClient
from dslo_edge.protocol import SoftLabelUpdate, encode_update, new_message_id

DEVICE = "porch"
WAIT_S = 30.0


def make_update(seed: int) -> SoftLabelUpdate:
    rng = np.random.default_rng(seed)
    return SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="test-teacher",
        teacher_round=1,
        timestamp=time.time(),
        sample_ids=[f"s{seed}-{i}" for i in range(8)],
        inputs=rng.random((8, 64), dtype=np.float32),
        labels=rng.dirichlet(np.ones(10), size=8).astype(np.float32),
        label_kind="probabilities",
    )


def start_daemon(tmp_path: Path, bundle: Path, port: int, prefix: str) -> EdgeDaemon:
    path = tmp_path / f"device-{prefix}.toml"
    text = render_config(
        DEVICE,
        bundle,
        tmp_path / "state",
        port,
        overrides={"mqtt": {"topic_prefix": prefix}},
    )
    path.write_text(text)
    daemon = EdgeDaemon(load_config(path))
    daemon.start()
    assert daemon.subscribed.wait(WAIT_S)
    return daemon


def publish_until_dropped(hub: HubClient, timeout: float = 10.0) -> int | None:
    """Publish updates until the broker reports that no client subscribes.

    Returns how many the broker took before that, or None on timeout.
    """
    deadline = time.monotonic() + timeout
    published = 0
    while time.monotonic() < deadline:
        try:
            hub.publish(encode_update(make_update(100 + published)))
        except DeviceNotSubscribed:
            return published
        published += 1
        time.sleep(0.1)
    return None


def wait_for_strays(daemon: EdgeDaemon, count: int) -> int:
    deadline = time.monotonic() + WAIT_S
    while daemon.stray_dropped < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon.stray_dropped


def test_old_prefix_update_is_not_trained(mlp_pair, mosquitto, tmp_path, caplog):
    # The first config subscribes under dslo/, and the broker keeps the
    # session after the daemon stops.
    start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port, "dslo").stop()
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port, "home")
    old_hub = HubClient(mosquitto.host, mosquitto.port, DEVICE, topic_prefix="dslo")
    new_hub = HubClient(mosquitto.host, mosquitto.port, DEVICE, topic_prefix="home")
    try:
        with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
            old_hub.publish(encode_update(make_update(1)))
            new_hub.publish(encode_update(make_update(2)))
            metrics = new_hub.wait_for_metrics(lambda m: m["processed"] >= 1, WAIT_S)
            published = publish_until_dropped(old_hub)
            strays = wait_for_strays(daemon, 1 + (published or 0))
    finally:
        old_hub.close()
        new_hub.close()
        daemon.stop()

    assert metrics["applied"] == 1
    assert metrics["rejected"] == {}
    assert daemon.metrics.applied == 1
    assert published is not None
    assert strays == 1 + published
    assert daemon.status_report()["stray_dropped"] == strays
    warnings = [
        r.getMessage() for r in caplog.records if "dropped a message" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert f"on dslo/{DEVICE}/updates" in warnings[0]
    assert f"Point the hub at home/{DEVICE}/updates" in warnings[0]


def test_stray_topic_unsubscribed_again(mlp_pair, mosquitto, tmp_path, caplog):
    # An unsubscribe lost with a connection leaves the subscription in place.
    # The daemon unsubscribes again on the next stray message and warns once.
    start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port, "dslo").stop()
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port, "home")
    old_hub = HubClient(mosquitto.host, mosquitto.port, DEVICE, topic_prefix="dslo")
    try:
        with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
            first = publish_until_dropped(old_hub)
            assert first is not None
            wait_for_strays(daemon, first)
            daemon.connection.client.subscribe(f"dslo/{DEVICE}/updates", qos=1)
            second = publish_until_dropped(old_hub)
            assert second is not None
            strays = wait_for_strays(daemon, first + second)
    finally:
        old_hub.close()
        daemon.stop()

    assert second >= 1
    assert strays == first + second
    assert daemon.metrics.applied == 0
    warnings = [
        r.getMessage() for r in caplog.records if "dropped a message" in r.getMessage()
    ]
    assert len(warnings) == 1


def test_stray_warnings_stop_at_limit(mlp_pair, mosquitto, tmp_path, caplog):
    # Subscriptions that an earlier config left on more topics than the daemon
    # warns about: every message is dropped and counted, and each topic up to
    # the limit gets one warning.
    from dslo_edge.daemon import MAX_STRAY_TOPICS

    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port, "home")
    topics = [f"old/{index}/updates" for index in range(MAX_STRAY_TOPICS + 1)]
    for topic in topics:
        daemon.connection.client.subscribe(topic, qos=1)
    hub = HubClient(mosquitto.host, mosquitto.port, DEVICE, topic_prefix="home")
    try:
        with caplog.at_level(logging.WARNING, logger="dslo_edge.daemon"):
            for topic in topics:
                # The broker drops a message sent before it took the
                # subscription, so send until one arrives.
                seen = daemon.stray_dropped
                deadline = time.monotonic() + WAIT_S
                while daemon.stray_dropped == seen:
                    assert time.monotonic() < deadline, f"nothing arrived on {topic}"
                    hub.client.publish(topic, b"stray", qos=1).wait_for_publish(10)
                    time.sleep(0.05)
            strays = daemon.stray_dropped
    finally:
        hub.close()
        daemon.stop()

    warnings = [
        r.getMessage() for r in caplog.records if "dropped a message" in r.getMessage()
    ]
    assert strays >= MAX_STRAY_TOPICS + 1
    assert len(warnings) == MAX_STRAY_TOPICS
    assert f"on old/{MAX_STRAY_TOPICS - 1}/updates" in warnings[-1]
    assert daemon.metrics.applied == 0
