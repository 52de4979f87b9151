"""The daemon's byte-bounded update queue against a real mosquitto broker."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from dslo_edge.daemon import EdgeDaemon, maximum_packet_bytes
from dslo_edge.protocol import PayloadLimits, encode_update
from tests.test_daemon import WAIT_S, hub_client, make_update, write_config


def held_trainer(daemon: EdgeDaemon) -> threading.Event:
    """Hold the trainer before its first update until the returned event is set.

    This stands for a trainer slower than the network thread's wait for
    room, such as one blocked on a slow SD card.
    """
    release = threading.Event()
    take_and_train = daemon._take_and_train

    def wait_then_take() -> None:
        release.wait(WAIT_S)
        take_and_train()

    daemon._take_and_train = wait_then_take  # type: ignore[method-assign]
    return release


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_byte_limit_defers_then_applies_all_once(
    mlp_pair, broker, tmp_path, caplog
) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("redelivery needs mosquitto's MQTT 5 session")
    updates = [make_update(1000 + seed, samples=4) for seed in range(60)]
    payloads = [encode_update(update) for update in updates]
    update_bytes = len(payloads[0])
    config = write_config(
        tmp_path,
        mlp_pair.bundle,
        broker,
        training={
            "checkpoint_every": 4,
            "queue_size": 16,
            "checkpoint_idle_s": 0.2,
            "max_queued_bytes": 3 * update_bytes,
        },
    )
    daemon = EdgeDaemon(config)
    release = held_trainer(daemon)
    caplog.set_level(logging.INFO, logger="dslo_edge.daemon")
    daemon.start()
    hub = hub_client(broker)
    try:
        hub.wait_for_metrics(lambda m: True, WAIT_S)
        for payload in payloads:
            hub.publish(payload)
        wait_until(lambda: daemon.deferred >= 2, WAIT_S)
        held_bytes = daemon.updates.queued_bytes
        held_count = daemon.updates.qsize()
        release.set()
        metrics = hub.wait_for_metrics(
            lambda m: m["applied"] >= 60 and m["unacknowledged"] == 0, WAIT_S
        )
    finally:
        release.set()
        hub.close()
        daemon.stop()

    assert held_count == 3
    assert held_bytes == 3 * update_bytes
    assert metrics["applied"] == 60
    assert daemon.trainer.applied_updates == 60
    assert all(update.message_id in daemon.applied_ids for update in updates)
    assert metrics["deferred_for_redelivery"] >= 2
    full = [r for r in caplog.records if "update queue is full" in r.getMessage()]
    reconnects = [
        r for r in caplog.records if "reconnects to receive" in r.getMessage()
    ]
    # One warning per reconnect, however many updates were deferred.
    assert 1 <= len(full) <= len(reconnects)
    assert len(full) < metrics["deferred_for_redelivery"]
    message = full[0].getMessage()
    assert "3 updates of at most 32" in message
    assert f"{3 * update_bytes} payload bytes" in message


def test_full_queue_warns_during_pending_reconnect(
    mlp_pair, broker, tmp_path, caplog
) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("redelivery needs mosquitto's MQTT 5 session")
    updates = [make_update(1300 + seed, samples=4) for seed in range(20)]
    update_bytes = len(encode_update(updates[0]))
    config = write_config(
        tmp_path,
        mlp_pair.bundle,
        broker,
        training={
            "checkpoint_every": 4,
            "queue_size": 16,
            "checkpoint_idle_s": 0.2,
            "max_queued_bytes": 3 * update_bytes,
        },
    )
    daemon = EdgeDaemon(config)
    release = held_trainer(daemon)
    caplog.set_level(logging.INFO, logger="dslo_edge.daemon")
    daemon.start()
    hub = hub_client(broker)
    try:
        hub.wait_for_metrics(lambda m: True, WAIT_S)
        # A rollback that restored an older generation sets this flag, so
        # that the idle loop reconnects for redelivery.
        daemon._deferred_since_reconnect = True
        for update in updates:
            hub.publish(encode_update(update))
        wait_until(lambda: daemon.deferred >= 1, WAIT_S)
        release.set()
        metrics = hub.wait_for_metrics(
            lambda m: m["applied"] >= 20 and m["unacknowledged"] == 0, WAIT_S
        )
    finally:
        release.set()
        hub.close()
        daemon.stop()

    full = [r for r in caplog.records if "update queue is full" in r.getMessage()]
    assert metrics["applied"] == 20
    assert metrics["deferred_for_redelivery"] >= 1
    assert len(full) >= 1
    assert "3 updates of at most 32" in full[0].getMessage()


def test_update_above_byte_limit_is_applied(mlp_pair, broker, tmp_path) -> None:
    small = [make_update(1100 + seed, samples=4) for seed in range(5)]
    large = make_update(1200, samples=512)
    large_payload = encode_update(large)
    config = write_config(
        tmp_path,
        mlp_pair.bundle,
        broker,
        training={"max_queued_bytes": 1000},
    )
    daemon = EdgeDaemon(config)
    daemon.start()
    hub = hub_client(broker)
    try:
        hub.wait_for_metrics(lambda m: True, WAIT_S)
        hub.publish(large_payload)
        for update in small:
            hub.publish(encode_update(update))
        metrics = hub.wait_for_metrics(lambda m: m["applied"] >= 6, WAIT_S)
    finally:
        hub.close()
        daemon.stop()

    assert len(large_payload) > 100 * 1000
    assert len(large_payload) < config.limits.max_payload_bytes
    assert metrics["applied"] == 6
    assert metrics["samples_applied"] == 512 + 5 * 4
    assert large.message_id in daemon.applied_ids
    assert metrics["deferred_for_redelivery"] == 0


def test_packet_limit_is_twice_largest_payload() -> None:
    # Below 4 MiB, the largest inference input sets the bound, and MQTT's
    # maximum packet size caps it.
    assert maximum_packet_bytes(PayloadLimits(max_payload_bytes=4096)) == 8_650_752
    assert maximum_packet_bytes(PayloadLimits(max_payload_bytes=64 << 20)) == (
        128 * 2**20 + 256 * 1024
    )
    assert maximum_packet_bytes(PayloadLimits(max_payload_bytes=200 << 20)) == (
        268_435_455
    )


def test_broker_drops_update_over_packet_limit(mlp_pair, broker, tmp_path) -> None:
    if broker.kind != "mosquitto":
        pytest.skip("the packet limit is an MQTT 5 connect property")
    config = write_config(tmp_path, mlp_pair.bundle, broker)
    limit = maximum_packet_bytes(config.limits)
    daemon = EdgeDaemon(config)
    daemon.start()
    hub = hub_client(broker)
    try:
        hub.wait_for_metrics(lambda m: True, WAIT_S)
        # Over the limit: the broker never sends it. Under it but over
        # limits.max_payload_bytes: it arrives and is rejected by name.
        hub.publish(b"DSLO" + bytes(limit))
        hub.publish(b"DSLO" + bytes(config.limits.max_payload_bytes + 1))
        hub.publish(encode_update(make_update(1500)))
        metrics = hub.wait_for_metrics(lambda m: m["applied"] >= 1, WAIT_S)
    finally:
        hub.close()
        daemon.stop()

    assert metrics["applied"] == 1
    assert metrics["rejected"] == {"too_large": 1}
    assert metrics["processed"] == 2
