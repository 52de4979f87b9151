"""A push's counts from the device's metrics before and after it."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from dslo_edge.cli import main
from dslo_edge.config import render_config
from dslo_edge.errors import BrokerError
from dslo_edge.faults import DEVICE, DaemonProcess
from dslo_edge.push_progress import (
    DeviceCounts,
    counted,
    handled_count,
    key_counters,
    wait_for_processed,
    wait_for_saved,
)

BEFORE = {"applied_total": 10, "processed_total": 11, "rejected": {"stale": 1}}
# 40 updates applied and 2 rejected as unsigned, and 42 copies of applied
# updates that the broker delivered again after a device restart.
AFTER = {
    "applied_total": 50,
    "processed_total": 95,
    "rejected": {"stale": 1, "duplicate": 42, "unsigned": 2},
}


def test_counts_split_duplicates_from_failures() -> None:
    counts = DeviceCounts.between(BEFORE, AFTER)

    assert counts.applied == 40
    assert counts.rejected == {"duplicate": 42, "unsigned": 2}
    assert counts.rejected_count == 44
    assert counts.duplicates == 42
    assert counts.failed == {"unsigned": 2}
    assert counts.failed_count == 2
    assert counts.reasons(failed_only=True) == "unsigned: 2"
    assert counts.describe() == "applied 40, rejected 44 (duplicate: 42, unsigned: 2)"


def test_duplicates_alone_are_no_failure() -> None:
    after = {"applied_total": 50, "rejected": {"stale": 1, "duplicate": 7}}

    counts = DeviceCounts.between(BEFORE, after)

    assert counts.applied == 40
    assert counts.duplicates == 7
    assert counts.failed_count == 0


def test_key_counters_show_unacknowledged() -> None:
    metrics = {**AFTER, "queue_depth": 0, "unacknowledged": 3}

    line = key_counters(metrics)
    without_fields = key_counters(AFTER)

    assert line.endswith("queue_depth 0, unacknowledged 3")
    assert without_fields.endswith("queue_depth unknown, unacknowledged unknown")


def test_handled_count_leaves_out_duplicates() -> None:
    assert handled_count(BEFORE) == 11
    assert handled_count(AFTER) == 53
    # Without applied_total (an older daemon), applied is read instead.
    assert handled_count({"applied": 3, "rejected": {"duplicate": 5}}) == 3


def _hub_with_metrics(broker, metrics: dict):
    """Return a HubClient once it has the device's retained ``metrics``."""
    import json

    import paho.mqtt.client as mqtt

    from dslo_edge.hub import HubClient

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    info = client.publish("dslo/d1/metrics", json.dumps(metrics), qos=1, retain=True)
    info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    hub = HubClient("127.0.0.1", broker.port, "d1")
    hub.wait_for_metrics(lambda m: m == metrics, 10)
    return hub


SAVE_CASES = [
    (
        {"pid": 7, "unsaved": 3, "storage_error": "OSError: No space left on device"},
        "applied the updates but cannot save a checkpoint (OSError: No space left",
    ),
    (
        {"pid": 7, "unsaved": 3, "storage_error": "OSError: No space left on device"},
        "come again after a restart. Free space in the device's state_dir",
    ),
    (
        {"pid": 7, "unsaved": 3, "storage_error": "FileExistsError: File exists"},
        "come again after a restart. Fix the device's state_dir, for example its "
        "permissions or a file where its checkpoints directory belongs",
    ),
    (
        {"pid": 8, "rollbacks": 1, "unsaved": 0, "last_rollback": "weight norm grew"},
        "rolled back its student during the push (weight norm grew)",
    ),
    (
        {"pid": 7, "unsaved": 3},
        "saved no checkpoint within 1 s (3 updates unsaved",
    ),
    (
        {"pid": 7, "unsaved": 1},
        "saved no checkpoint within 1 s (1 update unsaved,",
    ),
]


@pytest.mark.parametrize(("metrics", "message"), SAVE_CASES)
def test_save_wait_names_what_stopped_it(broker_factory, metrics, message) -> None:
    # The baseline comes from process 7, which had rolled back twice.
    before = {"pid": 7, "rollbacks": 2}
    hub = _hub_with_metrics(broker_factory("mosquitto"), metrics)
    try:
        with pytest.raises(BrokerError) as caught:
            wait_for_saved(hub, before, timeout=1)
    finally:
        hub.close()

    assert message in str(caught.value)


def test_save_wait_ends_when_training_pauses(broker_factory, caplog) -> None:
    paused = {"pid": 7, "unsaved": 2, "training": {"paused": True, "reason": "hot"}}
    hub = _hub_with_metrics(broker_factory("mosquitto"), paused)
    try:
        metrics = wait_for_saved(hub, {"pid": 7}, timeout=30)
    finally:
        hub.close()

    assert metrics["unsaved"] == 2
    assert "paused training (hot) with 2 updates not yet saved" in caplog.text


@pytest.mark.parametrize(
    ("count", "noun", "plural", "text"),
    [
        (0, "update", None, "0 updates"),
        (1, "update", None, "1 update"),
        (2, "update", None, "2 updates"),
        (1, "directory", "directories", "1 directory"),
        (3, "directory", "directories", "3 directories"),
    ],
)
def test_counted_noun_number(count, noun, plural, text) -> None:
    assert counted(count, noun, plural) == text


@pytest.mark.parametrize(
    ("training", "hint"),
    [
        (
            {"paused": True, "reason": "energy budget spent"},
            "the device paused training (energy budget spent), so the rest of "
            "the updates wait queued until it resumes; push with --no-wait",
        ),
        ({"paused": True}, "the device paused training (no reason given), so"),
        ({"paused": False}, "check the device's log, or raise --timeout"),
    ],
)
def test_process_wait_names_pause(broker_factory, training, hint) -> None:
    before = {"pid": 7, "processed_total": 4, "applied_total": 4}
    metrics = {**before, "training": training}
    hub = _hub_with_metrics(broker_factory("mosquitto"), metrics)
    try:
        with pytest.raises(BrokerError) as caught:
            wait_for_processed(hub, before, count=5, sent=5, timeout=1)
    finally:
        hub.close()

    message = str(caught.value)
    assert "processed 0 of the 5 updates sent so far within 1 s" in message
    assert hint in message


def test_hub_client_survives_metrics_int_too_long(broker) -> None:
    import json

    import paho.mqtt.client as mqtt

    first = {"pid": 7, "applied": 1}
    hub = _hub_with_metrics(broker, first)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        # json.loads rejects an int of more than 4300 digits with a ValueError,
        # which must not end the client's network thread.
        huge = b'{"applied": 1' + b"0" * 5000 + b"}"
        client.publish("dslo/d1/metrics", huge, qos=1).wait_for_publish(10)
        good = {"pid": 7, "applied": 3}
        client.publish("dslo/d1/metrics", json.dumps(good), qos=1).wait_for_publish(10)

        assert hub.wait_for_metrics(lambda m: m == good, 10) == good
        assert hub.client.is_connected()
    finally:
        client.disconnect()
        client.loop_stop()
        hub.close()


def test_push_names_fix_for_too_large(mlp_pair, mosquitto, tmp_path) -> None:
    config = tmp_path / "device.toml"
    config.write_text(
        render_config(
            DEVICE,
            mlp_pair.bundle,
            tmp_path / "state",
            mosquitto.port,
            # 32 samples of 64 float32 inputs take 8 KiB, so no update fits.
            overrides={"limits": {"max_payload_bytes": 4096}},
        )
    )
    data = tmp_path / "samples.npz"
    np.savez(data, x=np.random.default_rng(0).random((64, 64), dtype=np.float32))
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        result = CliRunner().invoke(
            main,
            ["push", "--bundle", str(mlp_pair.bundle), "--data", str(data)]
            + ["--device", DEVICE, "--broker", mosquitto.url, "--timeout", "30"],
        )
    finally:
        daemon.terminate()

    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == (
        f"error: device {DEVICE} rejected 2 of the 2 updates of this push "
        "(too_large: 2); an update was longer than the device's "
        "limits.max_payload_bytes: push with a smaller --batch-size"
    )


def test_push_hint_for_out_of_range() -> None:
    counts = DeviceCounts(applied=3, rejected={"out_of_range": 2, "duplicate": 1})

    assert counts.hints() == [
        "an input's magnitude exceeded the device's limits.max_abs_input: "
        "check how --data is scaled"
    ]


def test_push_hints_for_clock_rejections() -> None:
    counts = DeviceCounts(applied=0, rejected={"stale": 4, "clock_skew": 1})

    hints = counts.hints()

    assert len(hints) == 2
    assert "training.max_age_s" in hints[0]
    assert "hub's clock" in hints[0]
    assert "training.max_clock_skew_s" in hints[1]
    assert "NTP" in hints[1]
