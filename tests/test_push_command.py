"""`dslo-edge push` against a real mosquitto and a real edge daemon."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner, Result

from dslo_edge.broker import Broker, find_mosquitto
from dslo_edge.cli import main
from dslo_edge.config import load_config, render_config
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.protocol import decode_update
from dslo_edge.signing import generate_key_file

pytest.importorskip("keras")
if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

DEVICE = "kitchen"
SAMPLES = 48
BATCH = 8
MESSAGES = SAMPLES // BATCH


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "samples.npz"
    np.savez(path, x=rng.random((SAMPLES, 64), dtype=np.float32))
    return path


def start_daemon(
    bundle: Path, broker: Broker, folder: Path, device: str = DEVICE, **overrides
) -> EdgeDaemon:
    config_path = folder / f"{device}.toml"
    text = render_config(
        device,
        bundle,
        folder / f"{device}-state",
        broker.port,
        planned_updates=50,
        overrides=overrides,
    )
    config_path.write_text(text)
    daemon = EdgeDaemon(load_config(config_path))
    daemon.start()
    return daemon


def run_push(bundle: Path, data: Path, url: str, *extra: str) -> Result:
    arguments = ["push", "--bundle", str(bundle), "--data", str(data)]
    arguments += ["--device", DEVICE, "--broker", url, "--batch-size", str(BATCH)]
    arguments += ["--timeout", "30", *extra]
    return CliRunner().invoke(main, arguments)


def watch_updates(port: int) -> tuple[mqtt.Client, list[bytes]]:
    """Subscribe to the device's updates; return the client and received payloads.

    Returns once the broker has acknowledged the subscription, because the
    broker drops an update that no client subscribes to, and push then stops.
    """
    received: list[bytes] = []
    subscribed = threading.Event()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_subscribe = lambda *args: subscribed.set()
    watcher.on_message = lambda _client, _userdata, message: received.append(
        message.payload
    )
    watcher.connect("127.0.0.1", port)
    watcher.subscribe(f"dslo/{DEVICE}/updates", qos=1)
    watcher.loop_start()
    if not subscribed.wait(30):
        watcher.loop_stop()
        watcher.disconnect()
        raise AssertionError("timed out after 30 s waiting for the SUBACK")
    return watcher, received


def wait_for_count(received: list[bytes], count: int, timeout: float = 10.0) -> None:
    """Wait until ``received`` has ``count`` payloads or ``timeout`` seconds pass.

    A push's PUBACKs come from the broker, which may still be sending the
    last updates to the subscriber when the push returns.
    """
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.02)


def dp_options(noise_multiplier: float, epsilon: float, ledger: Path) -> list[str]:
    """Return the push options for a private release charged to the ledger."""
    return [
        "--dp-noise-multiplier",
        str(noise_multiplier),
        "--dp-epsilon",
        str(epsilon),
        "--dp-ledger",
        str(ledger),
    ]


def push_while_watching(
    broker: Broker, bundle: Path, data: Path, *extra: str, expected: int = 0
) -> tuple[Result, list[bytes]]:
    """Run a --no-wait push while a client subscribes to the device's updates.

    Waits up to 10 s for ``expected`` updates, then 0.5 s more, in which any
    update beyond them would arrive. Returns the push's result and the update
    payloads the subscriber received.
    """
    watcher, received = watch_updates(broker.port)
    try:
        result = run_push(bundle, data, broker.url, "--no-wait", *extra)
        wait_for_count(received, expected)
        time.sleep(0.5)
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    return result, received


def test_push_counts_only_its_own_updates(
    mlp_pair, broker_factory, tmp_path, data_file
):
    broker = broker_factory("mosquitto")
    daemon = start_daemon(mlp_pair.bundle, broker, tmp_path)
    try:
        first = run_push(mlp_pair.bundle, data_file, broker.url)
        second = run_push(mlp_pair.bundle, data_file, broker.url)
    finally:
        daemon.stop()

    for result in (first, second):
        assert result.exit_code == 0, result.output
        assert f"sent {MESSAGES} messages" in result.output
        expected = f"device {DEVICE}: applied {MESSAGES}, rejected 0 of this push"
        assert expected in result.output


def test_push_rejected_by_device_exits_1(mlp_pair, broker_factory, tmp_path, data_file):
    broker = broker_factory("mosquitto")
    key_file = tmp_path / "device.key"
    generate_key_file(key_file)
    security = {"hmac_key_file": str(key_file)}
    daemon = start_daemon(mlp_pair.bundle, broker, tmp_path, security=security)
    try:
        unsigned = run_push(mlp_pair.bundle, data_file, broker.url)
        signed = run_push(
            mlp_pair.bundle, data_file, broker.url, "--hmac-key-file", str(key_file)
        )
    finally:
        daemon.stop()

    assert unsigned.exit_code == 1
    assert f"applied 0, rejected {MESSAGES} (unsigned: {MESSAGES})" in unsigned.output
    assert f"rejected {MESSAGES} of the {MESSAGES} updates" in unsigned.output
    assert "pass --hmac-key-file" in unsigned.output
    assert signed.exit_code == 0, signed.output
    assert f"applied {MESSAGES}, rejected 0 of this push" in signed.output


def test_push_of_one_update_is_singular(mlp_pair, broker_factory, tmp_path):
    broker = broker_factory("mosquitto")
    key_file = tmp_path / "device.key"
    generate_key_file(key_file)
    security = {"hmac_key_file": str(key_file)}
    daemon = start_daemon(mlp_pair.bundle, broker, tmp_path, security=security)
    data = tmp_path / "one.npz"
    np.savez(data, x=np.zeros((1, 64), dtype=np.float32))
    try:
        unsigned = run_push(mlp_pair.bundle, data, broker.url)
    finally:
        daemon.stop()

    assert unsigned.exit_code == 1
    assert "sent 1 message (1 sample, " in unsigned.output
    assert " bytes) in 1 round\n" in unsigned.output
    assert "rejected 1 of the 1 update of this push" in unsigned.output


def test_push_to_offline_device_fails_fast(
    mlp_pair, broker_factory, tmp_path, data_file
):
    broker = broker_factory("mosquitto")
    daemon = start_daemon(mlp_pair.bundle, broker, tmp_path)
    daemon.stop()

    started = time.monotonic()
    result = run_push(mlp_pair.bundle, data_file, broker.url)
    elapsed = time.monotonic() - started

    assert result.exit_code == 1
    assert f"device {DEVICE} is offline" in result.output
    assert "sent" not in result.output
    assert elapsed < 10


def test_push_to_hub_level_is_rejected(mlp_pair, broker_factory, data_file):
    broker = broker_factory("mosquitto")
    arguments = ["push", "--bundle", str(mlp_pair.bundle), "--data", str(data_file)]

    result = CliRunner().invoke(
        main, [*arguments, "--device", "_hub", "--broker", broker.url]
    )

    assert result.exit_code == 78, result.output
    assert "device id '_hub' is invalid: the hub workers' own topics" in result.output
    assert "sent" not in result.output


def test_push_reaches_device_with_topic_prefix(
    mlp_pair, broker_factory, tmp_path, data_file
):
    broker = broker_factory("mosquitto")
    mqtt_settings = {"topic_prefix": "home"}
    daemon = start_daemon(mlp_pair.bundle, broker, tmp_path, mqtt=mqtt_settings)
    try:
        result = run_push(
            mlp_pair.bundle, data_file, broker.url, "--topic-prefix", "home"
        )
    finally:
        daemon.stop()

    assert result.exit_code == 0, result.output
    assert f"sent {MESSAGES} messages" in result.output
    expected = f"device {DEVICE}: applied {MESSAGES}, rejected 0 of this push"
    assert expected in result.output


def test_push_rejects_invalid_topic_prefix(mlp_pair, broker_factory, data_file):
    broker = broker_factory("mosquitto")

    result = run_push(mlp_pair.bundle, data_file, broker.url, "--topic-prefix", "a/b")

    assert result.exit_code == 78, result.output
    assert "topic prefix 'a/b' is invalid" in result.output
    assert "sent" not in result.output


def capture_updates(broker: Broker, push: Callable[[], Result]) -> list[bytes]:
    """Run ``push`` and return the payloads published on the device's topic."""
    payloads: list[bytes] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="capture")
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_message = lambda client, userdata, message: payloads.append(
        message.payload
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(f"dslo/{DEVICE}/updates", qos=1)
        assert subscribed.wait(10)
        result = push()
        assert result.exit_code == 0, result.output
        deadline = time.monotonic() + 10
        while len(payloads) < MESSAGES and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return payloads


def test_push_hard_labels_sends_y(mlp_pair, broker_factory, tmp_path):
    broker = broker_factory("mosquitto")
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, SAMPLES)
    data = tmp_path / "labelled.npz"
    np.savez(data, x=rng.random((SAMPLES, 64), dtype=np.float32), y=labels)

    labelled = ("--no-wait", "--hard-labels")
    with_y = capture_updates(
        broker, lambda: run_push(mlp_pair.bundle, data, broker.url, *labelled)
    )
    without_y = capture_updates(
        broker, lambda: run_push(mlp_pair.bundle, data, broker.url, "--no-wait")
    )

    assert len(with_y) == MESSAGES
    sent = [decode_update(payload).hard_labels for payload in with_y]
    assert all(batch is not None for batch in sent)
    assert np.concatenate(sent).tolist() == labels.tolist()
    assert len(without_y) == MESSAGES
    assert all(decode_update(payload).hard_labels is None for payload in without_y)


def test_push_logs_teacher_path_per_round(
    mlp_pair, broker_factory, tmp_path, data_file, caplog
):
    broker = broker_factory("mosquitto")
    teachers = []
    for folder in (tmp_path / "r1", tmp_path / "r2"):
        folder.mkdir()
        shutil.copy(mlp_pair.bundle / "teacher.tflite", folder)
        teachers.append(folder / "teacher.tflite")
    options = [f"--teacher={teacher}" for teacher in teachers]
    # A subscriber stands for the device: the broker drops updates that no
    # client subscribes to, and push then stops.
    watcher, received = watch_updates(broker.port)
    try:
        with caplog.at_level(logging.INFO, logger="dslo_edge.hub"):
            result = run_push(
                mlp_pair.bundle, data_file, broker.url, "--no-wait", *options
            )
        wait_for_count(received, 2 * SAMPLES // BATCH)
        # Any update beyond the expected ones would arrive within this wait.
        time.sleep(0.2)
    finally:
        watcher.loop_stop()
        watcher.disconnect()

    assert result.exit_code == 0, result.output
    assert len(received) == 2 * SAMPLES // BATCH
    rounds = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("Round ")
    ]
    assert rounds == [
        f"Round 1 sent to device {DEVICE} with teacher {teachers[0]}",
        f"Round 2 sent to device {DEVICE} with teacher {teachers[1]}",
    ]


def test_push_without_hard_labels_ignores_y(mlp_pair, broker_factory, tmp_path):
    broker = broker_factory("mosquitto")
    rng = np.random.default_rng(3)
    # --hard-labels rejects one-hot rows, but a push without it does not send y.
    one_hot = np.eye(10)[rng.integers(0, 10, SAMPLES)]
    data = tmp_path / "one_hot.npz"
    np.savez(data, x=rng.random((SAMPLES, 64), dtype=np.float32), y=one_hot)

    payloads = capture_updates(
        broker, lambda: run_push(mlp_pair.bundle, data, broker.url, "--no-wait")
    )

    assert len(payloads) == MESSAGES
    assert all(decode_update(payload).hard_labels is None for payload in payloads)


def publish_retained(broker: Broker, topic: str, payload: str) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fake-device")
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_push_timeout_names_key_counters(mlp_pair, broker_factory, data_file):
    broker = broker_factory("mosquitto")
    # A device that reports itself online but never processes anything.
    metrics = {"processed_total": 3, "applied_total": 3, "rejected": {}}
    metrics["train_ms"] = {"p50": 1.0, "p95": 2.0, "samples": [0.5] * 200}
    publish_retained(broker, f"dslo/{DEVICE}/status", "online")
    publish_retained(broker, f"dslo/{DEVICE}/metrics", json.dumps(metrics))
    watcher, _received = watch_updates(broker.port)
    try:
        result = run_push(mlp_pair.bundle, data_file, broker.url, "--timeout", "1")
    finally:
        watcher.loop_stop()
        watcher.disconnect()

    assert result.exit_code == 1
    assert f"processed 0 of the {MESSAGES} updates sent so far within 1 s" in (
        result.output
    )
    assert "status online" in result.output
    assert "train_ms" not in result.output
    assert len(result.output.splitlines()[-1]) < 300


def test_push_reports_rollback_of_its_updates(
    mlp_pair, broker_factory, tmp_path, caplog
):
    broker = broker_factory("mosquitto")
    x = np.random.default_rng(0).random((SAMPLES, 64), dtype=np.float32)
    # Below max_abs_input (1e6), yet its gradients grow the weights past the
    # health check's limit.
    x[40] = 9e5
    data = tmp_path / "harmful.npz"
    np.savez(data, x=x)
    daemon = start_daemon(mlp_pair.bundle, broker, tmp_path)
    try:
        with caplog.at_level(logging.ERROR, logger="dslo_edge.daemon"):
            result = run_push(mlp_pair.bundle, data, broker.url)
        rollbacks = daemon.rollbacks
    finally:
        daemon.stop()

    messages = [record.getMessage() for record in caplog.records]
    [logged] = [message for message in messages if "rolled back" in message]
    # The count agrees with its noun: "1 update", "2 updates".
    assert re.search(
        r"; dropped (1 update|([02-9]|\d\d+) updates) applied since the last "
        r"checkpoint$",
        logged,
    ), logged
    assert result.exit_code == 1
    assert f"device {DEVICE} rolled back its student during the push" in (result.output)
    assert "weight norm grew" in result.output
    assert "part of this push is lost" in result.output
    assert rollbacks == 1


def test_push_waits_for_checkpoint(mlp_pair, broker_factory, tmp_path, data_file):
    broker = broker_factory("mosquitto")
    daemon = start_daemon(mlp_pair.bundle, broker, tmp_path)
    try:
        result = run_push(mlp_pair.bundle, data_file, broker.url)
        written = daemon.checkpoints_written
        unsaved = daemon.status_report()["unsaved"]
    finally:
        daemon.stop()

    assert result.exit_code == 0, result.output
    assert written >= 1
    assert unsaved == 0


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory) -> Path:
    """A bundle of another task: 32 inputs and 5 classes."""
    import keras

    from converters.bundle import convert_bundle

    def model(hidden: int) -> keras.Sequential:
        return keras.Sequential(
            [
                keras.Input((32,)),
                keras.layers.Dense(hidden, activation="relu"),
                keras.layers.Dense(5, activation="softmax"),
            ]
        )

    path = tmp_path_factory.mktemp("other") / "bundle"
    convert_bundle(model(16), model(8), path)
    return path


def bad_input_cases(bundle: Path, other: Path, folder: Path) -> list:
    rng = np.random.default_rng(1)
    npy = folder / "samples.npy"
    np.save(npy, rng.random((4, 64), dtype=np.float32))
    unlabelled = folder / "unlabelled.npz"
    np.savez(unlabelled, x=rng.random((4, 64), dtype=np.float32))
    narrow = folder / "narrow.npz"
    np.savez(narrow, x=rng.random((4, 32), dtype=np.float32))
    empty = folder / "empty.npz"
    np.savez(empty, x=np.zeros((0, 64), dtype=np.float32))
    text = folder / "text.npz"
    np.savez(text, x=np.full((4, 64), "0.5"))
    scalar = folder / "scalar.npz"
    np.savez(scalar, x=np.float32(0.5))
    # One input beyond float16's range, in the last of several batches.
    large = folder / "large.npz"
    x = rng.random((40, 64), dtype=np.float32)
    x[-1, 0] = 70000.0
    np.savez(large, x=x)
    other_teacher = str(other / "teacher.tflite")
    student = str(bundle / "student.tflite")
    # A .keras file is a zip archive with config.json, as Keras 3 writes it.
    keras_teacher = folder / "teacher.keras"
    with zipfile.ZipFile(keras_teacher, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.weights.h5", b"")
    return [
        (["--data", str(npy)], "is a single .npy array of shape (4, 64)"),
        (["--data", str(narrow)], "x has samples of shape (32,), but the bundle's"),
        (["--data", str(empty)], f"{empty}: x has shape (0, 64), so the file has no"),
        (["--data", str(text)], f"{text}: array 'x' has dtype <U3; expected a"),
        (["--data", str(scalar)], f"{scalar}: array 'x' is a scalar; expected one"),
        (["--data", str(unlabelled), "--hard-labels"], "needs a 'y' array"),
        (
            ["--data", str(large), "--float16-inputs"],
            f"{large} has an input of magnitude 7e+04, beyond float16's 65504",
        ),
        (["--teacher", other_teacher], "takes inputs of shape (32,)"),
        (["--teacher", student], "has no matching teacher signature"),
        (["--teacher", student], "outputs 'logits', 'probabilities'"),
        (
            ["--teacher", str(keras_teacher)],
            "it is a Keras model file, which the hub cannot run; convert the teacher",
        ),
        (
            ["--teacher", str(unlabelled)],
            "expected a .tflite teacher that 'dslo-edge convert' wrote",
        ),
        (["--top-k", "50"], "--top-k is 50, but the bundle's student has 10 classes"),
    ]


def test_push_rejects_bad_inputs_in_one_line(
    mlp_pair, other_bundle, tmp_path, data_file
):
    cases = bad_input_cases(mlp_pair.bundle, other_bundle, tmp_path)
    for options, fragment in cases:
        arguments = ["push", "--bundle", str(mlp_pair.bundle), "--device", DEVICE]
        arguments += ["--broker", "mqtt://127.0.0.1:1"]
        if "--data" not in options:
            arguments += ["--data", str(data_file)]

        result = CliRunner().invoke(main, [*arguments, *options])

        assert result.exit_code == 78, (options, result.output)
        assert fragment in result.output, options
        assert result.output.count("\n") == 1, result.output
        assert "Traceback" not in result.output


def test_push_rejects_teacher_of_other_kind(mlp_pair, logits_teacher, data_file):
    arguments = ["push", "--bundle", str(mlp_pair.bundle), "--device", DEVICE]
    arguments += ["--broker", "mqtt://127.0.0.1:1", "--data", str(data_file)]

    result = CliRunner().invoke(main, [*arguments, "--teacher", str(logits_teacher)])

    assert result.exit_code == 78, result.output
    assert (
        f"--teacher {logits_teacher} computes its 'output' output with a "
        "FULLY_CONNECTED op, so it outputs logits, but the bundle's teacher kind "
        "is 'probabilities'"
    ) in result.output
    assert "use a teacher whose last Keras layer ends in softmax" in result.output


def test_push_unwritable_ledger_sends_nothing(
    mlp_pair, broker_factory, tmp_path, data_file
):
    pytest.importorskip("dp_accounting")
    broker = broker_factory("mosquitto")
    blocker = tmp_path / "afile"
    blocker.write_text("")
    ledger = blocker / "ledger.json"
    result, received = push_while_watching(
        broker, mlp_pair.bundle, data_file, *dp_options(8, 100, ledger)
    )

    assert result.exit_code == 78, result.output
    assert result.output.startswith(f"error: cannot write privacy ledger {ledger}")
    assert result.output.count("\n") == 1
    assert received == []
    assert blocker.read_text() == ""


def test_push_rejects_hard_labels_with_privacy(mlp_pair, broker_factory, tmp_path):
    broker = broker_factory("mosquitto")
    labelled = tmp_path / "labelled.npz"
    rng = np.random.default_rng(0)
    np.savez(
        labelled,
        x=rng.random((SAMPLES, 64), dtype=np.float32),
        y=rng.integers(0, 10, SAMPLES),
    )
    ledger = tmp_path / "ledger.json"
    result, received = push_while_watching(
        broker, mlp_pair.bundle, labelled, "--hard-labels", *dp_options(4, 5, ledger)
    )

    assert result.exit_code == 2, result.output
    assert "Invalid value for --hard-labels: a private release sends only " in (
        result.output
    )
    assert "drop --hard-labels or the --dp-* options" in result.output
    assert received == []
    assert not ledger.exists()


def test_push_to_device_without_session_refunds(
    mlp_pair, broker_factory, tmp_path, data_file
):
    pytest.importorskip("dp_accounting")
    broker = broker_factory("mosquitto")
    ledger = tmp_path / "ledger.json"
    # No client subscribes to the device's updates: it never connected.
    result = run_push(
        mlp_pair.bundle,
        data_file,
        broker.url,
        "--no-wait",
        *dp_options(8, 100, ledger),
    )

    assert result.exit_code == 1, result.output
    assert result.output == (
        f"error: the broker dropped the update for device {DEVICE} unread, "
        f"because no client subscribes to dslo/{DEVICE}/updates (the device never "
        "connected, its session expired, or --device or --topic-prefix differs "
        "from the device config); took back "
        f"the privacy charge of its {BATCH} samples. The push sent nothing; "
        "start the device's daemon once, so that the broker keeps its updates "
        "while it is offline, and push again\n"
    )
    assert json.loads(ledger.read_text())["devices"] == {DEVICE: {"8.0": 0}}


def test_push_stopped_by_budget_counts_sent(
    mlp_pair, broker_factory, tmp_path, data_file
):
    pytest.importorskip("dp_accounting")
    broker = broker_factory("mosquitto")
    # At noise multiplier 4, 16 releases spend epsilon 4.73 and 24 spend
    # 5.98, so the budget of 5 admits two batches of 8.
    result, received = push_while_watching(
        broker,
        mlp_pair.bundle,
        data_file,
        *dp_options(4, 5, tmp_path / "ledger.json"),
        expected=2,
    )

    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: releasing 8 more soft labels to ")
    assert result.output.endswith(
        ". The push stopped there, after sending 2 updates (16 samples) in round 1\n"
    )
    assert len(received) == 2


def test_push_stopped_after_one_update_reads_singular(
    mlp_pair, broker_factory, tmp_path, data_file
):
    pytest.importorskip("dp_accounting")
    broker = broker_factory("mosquitto")
    # At noise multiplier 4, 8 releases spend epsilon 3.19 and 16 spend
    # 4.73, so the budget of 4 admits one batch of 8.
    result, received = push_while_watching(
        broker,
        mlp_pair.bundle,
        data_file,
        *dp_options(4, 4, tmp_path / "ledger.json"),
        expected=1,
    )

    assert result.exit_code == 1, result.output
    assert result.output.endswith(
        ". The push stopped there, after sending 1 update (8 samples) in round 1\n"
    )
    assert len(received) == 1


@pytest.mark.parametrize(
    ("url", "options", "fragment"),
    [
        ("mqtt://hub:secret@127.0.0.1:1883", [], "--username and --password-file"),
        ("mqtt://127.0.0.1:0", [], "port in 1..65535"),
        ("mqtt://[::1:1883", [], "'mqtt://[::1:1883' is invalid (Invalid IPv6 URL)"),
        ("mqtt://[hub]:1883", [], "such as mqtt://[::1]:1883"),
        ("mqtt://hub:secret@[::1", [], "'mqtt://[::1' is invalid"),
        ("mqtt://::1", [], "'mqtt://::1' is invalid: an IPv6 address needs brackets"),
        ("fd00::1:1883", [], "such as mqtt://[::1]:1883"),
        ("mqtt://127.0.0.1:1883/dslo", [], "no path, query or fragment"),
        ("mqtt://127.0.0.1?port=1884", [], "no path, query or fragment"),
        ("mqtt://127.0.0.1#tls", [], "no path, query or fragment"),
        ("mqtts://127.0.0.1", [], "pass --tls-ca-file"),
        ("mqtt://127.0.0.1", ["--tls-ca-file", "{ca}"], "use mqtts://127.0.0.1:1883"),
        ("mqtt://127.0.0.1", ["--password-file", "{ca}"], "needs --username"),
    ],
)
def test_push_rejects_bad_broker_options(
    mlp_pair, tmp_path, data_file, url, options, fragment
):
    ca = tmp_path / "ca.crt"
    ca.write_text("placeholder")
    options = [option.format(ca=ca) for option in options]
    arguments = ["push", "--bundle", str(mlp_pair.bundle), "--data", str(data_file)]

    result = CliRunner().invoke(
        main, [*arguments, "--device", DEVICE, "--broker", url, *options]
    )

    assert result.exit_code == 78
    assert fragment in result.output
    assert "secret" not in result.output


@pytest.mark.parametrize(
    ("command", "option", "value", "valid"),
    [
        ("push", "--timeout", "nan", "x>=1"),
        ("push", "--timeout", "inf", "x>=1"),
        ("push", "--dp-noise-multiplier", "inf", "x>0"),
        ("push", "--dp-epsilon", "nan", "x>0"),
        ("push", "--dp-delta", "nan", "0<x<1"),
        ("ota-send", "--timeout", "nan", "x>=1"),
    ],
)
def test_non_finite_option_is_usage_error(tmp_path, command, option, value, valid):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    data = tmp_path / "data.npz"
    data.write_bytes(b"npz")
    arguments = {
        "push": ["push", "--bundle", str(bundle), "--data", str(data)],
        "ota-send": ["ota-send", str(bundle)],
    }[command]

    result = CliRunner().invoke(
        main,
        [
            *arguments,
            "--device",
            DEVICE,
            option,
            value,
            "--broker",
            "mqtt://127.0.0.1:1",
        ],
    )

    assert result.exit_code == 2, result.output
    assert (
        f"Invalid value for '{option}': {value} is not a finite number in the "
        f"range {valid}.\n"
    ) in result.output


def test_push_device_id_too_long(mlp_pair, tmp_path, data_file):
    device = "d" * 70_000

    result = CliRunner().invoke(
        main,
        [
            "push",
            *("--bundle", str(mlp_pair.bundle), "--data", str(data_file)),
            *("--device", device, "--broker", "mqtt://127.0.0.1:1"),
        ],
    )

    assert result.exit_code == 78, result.output
    assert result.output == (
        f"error: device id {'d' * 40!r}... is invalid: it is 70000 bytes of "
        "UTF-8, expected at most 32000, for example 'kitchen-cam'\n"
    )


def test_push_device_id_not_utf8(mlp_pair, tmp_path, data_file):
    # The shell passes the bytes b"k\xff", which Python decodes to a surrogate.
    result = CliRunner().invoke(
        main,
        [
            "push",
            *("--bundle", str(mlp_pair.bundle), "--data", str(data_file)),
            *("--device", "k\udcff", "--broker", "mqtt://127.0.0.1:1"),
        ],
    )

    assert result.exit_code == 78, result.output
    assert result.output.startswith(
        "error: device id 'k\\udcff' is invalid: it is not UTF-8 text; "
    )


@pytest.mark.parametrize("content", ["", "\n", " \n\n"])
def test_empty_password_file_is_rejected(mlp_pair, mosquitto, tmp_path, content):
    password_file = tmp_path / "hub.password"
    password_file.write_text(content)
    data = tmp_path / "samples.npz"
    np.savez(data, x=np.zeros((BATCH, 64), np.float32))
    login = ["--username", "hub", "--password-file", str(password_file)]
    expected = (
        f"error: --password-file {password_file} contains no password; write "
        "the password of user 'hub' on its first line, or drop --username and "
        "--password-file for a broker that accepts anonymous clients\n"
    )
    # The broker accepts any login, so only the check stops the push.
    watcher, received = watch_updates(mosquitto.port)
    try:
        pushed = run_push(mlp_pair.bundle, data, mosquitto.url, "--no-wait", *login)
        sent = CliRunner().invoke(
            main,
            [
                "ota-send",
                str(mlp_pair.bundle),
                "--device",
                DEVICE,
                "--broker",
                mosquitto.url,
                *login,
            ],
        )
    finally:
        watcher.disconnect()
        watcher.loop_stop()

    assert pushed.exit_code == 78, pushed.output
    assert pushed.output == expected
    assert received == []
    assert sent.exit_code == 78, sent.output
    assert sent.output == expected


# Login and TLS against mosquitto without anonymous access.


def write_password_file(path: Path, users: dict[str, str]) -> None:
    for index, (user, password) in enumerate(users.items()):
        command = ["mosquitto_passwd", "-b", str(path), user, password]
        if index == 0:
            command.insert(1, "-c")
        subprocess.run(command, check=True, capture_output=True)


def test_push_logs_in_to_password_broker(mlp_pair, tmp_path, data_file):
    write_password_file(tmp_path / "passwd", {"hub": "hub-secret"})
    (tmp_path / "hub.password").write_text("hub-secret\n")
    (tmp_path / "wrong.password").write_text("guess\n")
    text = (
        "listener {port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {tmp_path / 'passwd'}\n"
    )
    login = ["--username", "hub", "--password-file"]
    with Broker.start(
        kind="mosquitto", workdir=tmp_path / "broker", config_text=text
    ) as broker:
        # The device's subscription, without which the broker drops updates.
        device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        device.on_subscribe = lambda *args: subscribed.set()
        device.username_pw_set("hub", "hub-secret")
        device.connect("127.0.0.1", broker.port)
        device.subscribe(f"dslo/{DEVICE}/updates", qos=1)
        device.loop_start()
        assert subscribed.wait(30), "timed out after 30 s waiting for the SUBACK"
        anonymous = run_push(mlp_pair.bundle, data_file, broker.url, "--no-wait")
        wrong = run_push(
            mlp_pair.bundle,
            data_file,
            broker.url,
            "--no-wait",
            *login,
            str(tmp_path / "wrong.password"),
        )
        right = run_push(
            mlp_pair.bundle,
            data_file,
            broker.url,
            "--no-wait",
            *login,
            str(tmp_path / "hub.password"),
        )
        device.disconnect()
        device.loop_stop()

    for result in (anonymous, wrong):
        assert result.exit_code == 1
        assert "refused the connection (Not authorized)" in result.output
        assert "check --username and --password-file" in result.output
    assert right.exit_code == 0, right.output
    assert f"sent {MESSAGES} messages" in right.output


def test_plain_push_to_tls_listener_names_fix(mlp_pair, tmp_path, data_file):
    pytest.importorskip("cryptography")
    from tls_files import make_authority, make_server_certificate

    authority = make_authority(tmp_path, "test-ca")
    certificate, key = make_server_certificate(
        authority, tmp_path, "broker", ["127.0.0.1"]
    )
    text = (
        f"listener {{port}} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {authority.path}\ncertfile {certificate}\nkeyfile {key}\n"
    )
    with Broker.start(
        kind="mosquitto", workdir=tmp_path / "broker", config_text=text
    ) as broker:
        started = time.monotonic()
        result = run_push(mlp_pair.bundle, data_file, broker.url, "--no-wait")
        took = time.monotonic() - started

    assert result.exit_code == 1
    assert result.output == (
        f"error: the broker at 127.0.0.1:{broker.port} closed the connection "
        "before answering it (Unspecified error); if its listener expects TLS, "
        f"use mqtts://127.0.0.1:{broker.port} with --tls-ca-file\n"
    )
    assert took < 5


def test_push_and_ota_send_over_tls_with_login(mlp_pair, tmp_path, data_file):
    pytest.importorskip("cryptography")
    from tls_files import make_authority, make_server_certificate

    authority = make_authority(tmp_path, "test-ca")
    stranger = make_authority(tmp_path, "other-ca")
    certificate, key = make_server_certificate(
        authority, tmp_path, "broker", ["127.0.0.1"]
    )
    passwords = {"hub": "hub-secret", DEVICE: "device-secret"}
    write_password_file(tmp_path / "passwd", passwords)
    for user, password in passwords.items():
        (tmp_path / f"{user}.password").write_text(password + "\n")
    text = (
        "listener {port} 127.0.0.1\nallow_anonymous false\n"
        f"password_file {tmp_path / 'passwd'}\ncafile {authority.path}\n"
        f"certfile {certificate}\nkeyfile {key}\n"
    )
    broker = Broker.start(
        kind="mosquitto", workdir=tmp_path / "broker", config_text=text
    )
    device_tls = {
        "username": DEVICE,
        "password_file": str(tmp_path / f"{DEVICE}.password"),
        "tls_ca_file": str(authority.path),
    }
    daemon = start_daemon(mlp_pair.bundle, broker, tmp_path, mqtt=device_tls)
    url = f"mqtts://127.0.0.1:{broker.port}"
    login = ["--username", "hub", "--password-file", str(tmp_path / "hub.password")]
    try:
        pushed = run_push(
            mlp_pair.bundle,
            data_file,
            url,
            *login,
            "--tls-ca-file",
            str(authority.path),
        )
        unknown_ca = run_push(
            mlp_pair.bundle,
            data_file,
            url,
            *login,
            "--tls-ca-file",
            str(stranger.path),
        )
        sent = CliRunner().invoke(
            main,
            [
                "ota-send",
                str(mlp_pair.bundle),
                "--device",
                DEVICE,
                "--broker",
                url,
                "--tls-ca-file",
                str(authority.path),
                *login,
            ],
        )
    finally:
        daemon.stop()
        broker.stop()

    assert pushed.exit_code == 0, pushed.output
    assert f"applied {MESSAGES}, rejected 0 of this push" in pushed.output
    assert unknown_ca.exit_code == 1
    assert "unknown CA" in unknown_ca.output
    assert "check --tls-ca-file" in unknown_ca.output
    assert sent.exit_code == 0, sent.output
    assert f"to device {DEVICE} as transfer" in sent.output


def test_push_rejected_by_acl_refunds(mlp_pair, tmp_path, data_file):
    pytest.importorskip("dp_accounting")
    if find_mosquitto() is None:
        pytest.skip("mosquitto not found on PATH or at /usr/sbin/mosquitto")
    folder = tmp_path / "broker"
    folder.mkdir()
    # Anonymous clients may read the device's updates but not publish them.
    (folder / "acl").write_text(f"topic read dslo/{DEVICE}/updates\n")
    broker = Broker.start(
        kind="mosquitto",
        workdir=folder,
        config_text=(
            "listener {port} 127.0.0.1\nallow_anonymous true\nacl_file {workdir}/acl\n"
        ),
    )
    ledger = tmp_path / "ledger.json"
    try:
        result, received = push_while_watching(
            broker, mlp_pair.bundle, data_file, *dp_options(8, 100, ledger)
        )
    finally:
        broker.stop()

    assert result.exit_code == 1, result.output
    assert result.output == (
        f"error: the broker rejected the update for device {DEVICE} on "
        f"dslo/{DEVICE}/updates with reason code 135 (Not authorized); took back "
        f"the privacy charge of its {BATCH} samples. The push sent nothing; "
        "mosquitto sends this code when its ACL does not let the push's MQTT "
        f"user publish there; grant that user write access to dslo/{DEVICE}/updates "
        "and push again\n"
    )
    assert received == []
    assert json.loads(ledger.read_text())["devices"] == {DEVICE: {"8.0": 0}}
