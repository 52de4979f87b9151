"""Local inference through the daemon, and label requests served by a hub."""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.config import load_config, render_config
from dslo_edge.daemon import EdgeDaemon
from dslo_edge.hub import HubClient
from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.inference import encode_inputs, inference_topics
from dslo_edge.protocol import Topics
from dslo_edge.signing import generate_key_file
from tests.hub_fleet import write_hub_config

DEVICE = "asking-device"


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class LocalApp:
    """An application on the device that requests predictions from the daemon."""

    def __init__(self, port: int):
        self.infer_topic, predictions = inference_topics(Topics.for_device(DEVICE))
        self.answers: list[dict] = []
        ready = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = lambda _c, _u, m: self.answers.append(
            json.loads(m.payload)
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(predictions, qos=1)
        assert ready.wait(10)

    def ask(self, payload: bytes) -> None:
        self.client.publish(self.infer_topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def start_daemon(
    tmp_path, bundle, port, requests: dict, security: dict | None = None
) -> EdgeDaemon:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "device.toml"
    overrides = {"requests": requests}
    if security is not None:
        overrides["security"] = security
    path.write_text(
        render_config(DEVICE, bundle, tmp_path / "state", port, overrides=overrides)
    )
    daemon = EdgeDaemon(load_config(path))
    daemon.start()
    wait_until(daemon.subscribed.is_set)
    return daemon


def test_inference_answers_and_rejects_bad_inputs(
    mlp_pair, mosquitto, tmp_path
) -> None:
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port, {})
    app = LocalApp(mosquitto.port)
    x = np.random.default_rng(1).random((5, 64), dtype=np.float32)
    try:
        app.ask(encode_inputs(x, [f"cam-{i}" for i in range(5)]))
        app.ask(encode_inputs(np.zeros((2, 10), np.float32)))
        wait_until(lambda: app.answers and daemon.inference_rejected)
        expected = daemon.student.infer(x)
    finally:
        app.close()
        daemon.stop()

    (answer,) = app.answers
    assert answer["ids"] == [f"cam-{i}" for i in range(5)]
    assert answer["classes"] == np.argmax(expected, axis=1).tolist()
    assert answer["confidence"] == pytest.approx(expected.max(axis=1), abs=1e-6)
    assert daemon.inference_rejected["bad_inputs"] == 1
    assert "bad_inputs" not in daemon.metrics.rejected
    assert daemon.costs.infer_ms.summary()["count"] == 1


def test_inference_rejects_inputs_above_limit(mlp_pair, mosquitto, tmp_path) -> None:
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port, {})
    app = LocalApp(mosquitto.port)
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    extreme = x.copy()
    extreme[2, 5] = -3e38
    hub = HubClient("127.0.0.1", mosquitto.port, DEVICE)
    try:
        app.ask(encode_inputs(extreme, ["a", "b", "c"]))
        app.ask(encode_inputs(x, ["a", "b", "c"]))
        wait_until(lambda: app.answers and daemon.inference_rejected)
        # No update follows, so the idle trainer publishes the count.
        metrics = hub.wait_for_metrics(
            lambda m: m.get("inference_rejected") == {"out_of_range": 1}, 10
        )
    finally:
        hub.close()
        app.close()
        daemon.stop()

    (answer,) = app.answers
    assert answer["ids"] == ["a", "b", "c"]
    assert daemon.inference_rejected == {"out_of_range": 1}
    assert metrics["applied"] == 0


class NaNStudent:
    """A student stand-in whose probabilities overflow to NaN."""

    class bundle:  # noqa: N801 - mimics the attribute of StudentModel
        input_shape = (4,)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.full((len(x), 3), np.nan, np.float32)


def test_inference_never_publishes_nan() -> None:
    from dslo_edge.errors import InvalidUpdate
    from dslo_edge.inference import InferenceService
    from dslo_edge.metrics import LatencyWindow

    published: list = []
    service = InferenceService(
        lambda topic, payload, properties=None: published.append(payload),
        "dslo/d/predictions",
        None,
        None,
        LatencyWindow(),
    )
    x = np.ones((2, 4), np.float32)

    with pytest.raises(InvalidUpdate) as caught:
        service.handle(encode_inputs(x, ["p", "q"]), NaNStudent())  # type: ignore[arg-type]

    assert caught.value.reason == "non_finite_output"
    assert "input 'p' are NaN or infinite" in str(caught.value)
    assert published == []


def test_inference_limit_message_tells_numbers_apart() -> None:
    from dslo_edge.errors import InvalidUpdate
    from dslo_edge.inference import InferenceService
    from dslo_edge.metrics import LatencyWindow

    service = InferenceService(
        lambda topic, payload, properties=None: None,
        "dslo/d/predictions",
        None,
        None,
        LatencyWindow(),
        max_abs_input=1e6,
    )
    x = np.ones((2, 4), np.float32)
    x[1, 2] = 1000400.0

    with pytest.raises(InvalidUpdate) as caught:
        service.handle(encode_inputs(x, ["p", "q"]), NaNStudent())  # type: ignore[arg-type]

    assert caught.value.reason == "out_of_range"
    assert str(caught.value).startswith(
        "input 'q' has magnitude 1.0004e+06, above limits.max_abs_input = 1e+06;"
    )


def npz_payload(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_inference_rejects_scalar_and_text(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port, {})
    app = LocalApp(mosquitto.port)
    x = np.zeros((2, 64), np.float32)
    try:
        app.ask(npz_payload(x=np.float32(0.5)))
        app.ask(npz_payload(x=np.full((2, 64), "0.5")))
        app.ask(npz_payload(x=x, ids=np.array("cam-0")))
        app.ask(encode_inputs(x, ["cam-0", "cam-1"]))
        wait_until(lambda: app.answers)
    finally:
        app.close()
        daemon.stop()

    assert daemon.inference_rejected["bad_inputs"] == 3
    assert app.answers[0]["ids"] == ["cam-0", "cam-1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    prefix = f"Rejected inference input for device {DEVICE} (bad_inputs): "
    assert prefix + "x has shape (), expected (N, 64)" in warnings
    assert prefix + "x has dtype <U3, expected a numeric dtype such as float32" in (
        warnings
    )
    assert prefix + "ids has shape (), expected (2,)" in warnings
    assert not [w for w in warnings if "failed to" in w]


def start_hub_worker(
    mlp_pair, port: int, tmp_path: Path, privacy: str | None = None
) -> HubWorker:
    """Start a hub worker with the pair's teacher and an optional [privacy] table."""
    teacher = tmp_path / "teacher.tflite"
    shutil.copy(load_bundle(mlp_pair.bundle).teacher_path, teacher)
    extra = {"teacher": 'output_kind = "probabilities"'}
    if privacy is not None:
        extra["privacy"] = privacy
    worker = HubWorker(
        load_hub_config(write_hub_config(tmp_path / "hub", port, teacher, extra), "w1")
    )
    worker.start()
    return worker


def start_unsure_daemon(mlp_pair, port: int, tmp_path: Path) -> EdgeDaemon:
    """Start a daemon that requests labels for up to 4 samples of every input."""
    # max_confidence 1.0: every prediction counts as unsure.
    settings = {"enabled": True, "max_confidence": 1.0, "max_samples": 4}
    return start_daemon(tmp_path / "device", mlp_pair.bundle, port, settings)


def ask_once(
    daemon: EdgeDaemon, worker: HubWorker, port: int, payload: bytes
) -> tuple[dict, LocalApp]:
    """Send one inference request, wait for one applied update, stop everything.

    Returns the daemon's status report and the closed app with its ``answers``.
    """
    app = LocalApp(port)
    try:
        app.ask(payload)
        wait_until(lambda: daemon.metrics.applied >= 1)
        return daemon.status_report(), app
    finally:
        app.close()
        daemon.stop()
        worker.stop()


def test_unsure_inputs_get_labels_from_the_hub(mlp_pair, mosquitto, tmp_path) -> None:
    worker = start_hub_worker(mlp_pair, mosquitto.port, tmp_path)
    daemon = start_unsure_daemon(mlp_pair, mosquitto.port, tmp_path)
    x = np.random.default_rng(2).random((6, 64), dtype=np.float32)

    report, _ = ask_once(daemon, worker, mosquitto.port, encode_inputs(x))

    requests = report["label_requests"]
    assert requests["sent"] == 1
    assert requests["answered"] == 1
    assert requests["latency_ms_p50"] > 0
    assert report["samples_applied"] == 4
    assert report["applied_total"] == 1


def test_rejected_labels_are_not_answered(mlp_pair, mosquitto, tmp_path) -> None:
    # The hub signs with another key than the device's, so the device rejects
    # the labels as bad_signature.
    device_key = tmp_path / "device.key"
    generate_key_file(device_key)
    keys = tmp_path / "hub" / "keys"
    keys.mkdir(parents=True)
    generate_key_file(keys / f"{DEVICE}.key")
    teacher = tmp_path / "teacher.tflite"
    shutil.copy(load_bundle(mlp_pair.bundle).teacher_path, teacher)
    extra = {"teacher": 'output_kind = "probabilities"', "hub": 'keys_dir = "keys"'}
    hub_config = write_hub_config(tmp_path / "hub", mosquitto.port, teacher, extra)
    worker = HubWorker(load_hub_config(hub_config, "w1"))
    worker.start()
    daemon = start_daemon(
        tmp_path / "device",
        mlp_pair.bundle,
        mosquitto.port,
        {"enabled": True, "max_confidence": 1.0, "max_samples": 4},
        security={"hmac_key_file": str(device_key)},
    )
    app = LocalApp(mosquitto.port)
    x = np.random.default_rng(2).random((6, 64), dtype=np.float32)
    try:
        app.ask(encode_inputs(x))
        wait_until(lambda: daemon.status_report()["rejected"])
        report = daemon.status_report()
    finally:
        app.close()
        daemon.stop()
        worker.stop()

    assert report["rejected"] == {"bad_signature": 1}
    requests = report["label_requests"]
    assert requests["sent"] == 1
    assert requests["answered"] == 0
    assert requests["rejected"] == 0
    assert "latency_ms_p50" not in requests
    assert report["applied_total"] == 0


def test_requests_skip_unusable_sample_ids(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    worker = start_hub_worker(mlp_pair, mosquitto.port, tmp_path)
    settings = {"enabled": True, "max_confidence": 1.0, "max_samples": 32}
    daemon = start_daemon(
        tmp_path / "device", mlp_pair.bundle, mosquitto.port, settings
    )
    caplog.set_level(logging.WARNING, logger="dslo_edge.label_requests")
    # An update rejects a repeated id and one of more than 255 bytes, so the
    # second "cam-0" and the long id must stay out of the request.
    ids = ["cam-0", "cam-0", "x" * 300, "cam-1", "cam-2", "cam-3"]
    x = np.random.default_rng(2).random((6, 64), dtype=np.float32)

    report, app = ask_once(daemon, worker, mosquitto.port, encode_inputs(x, ids))

    requests = report["label_requests"]
    assert requests["sent"] == 1
    assert requests["answered"] == 1
    assert requests["rejected"] == 0
    assert report["samples_applied"] == 4
    assert report["rejected"] == {}
    [record] = [r for r in caplog.records if r.name == "dslo_edge.label_requests"]
    assert f"Device {DEVICE} left 2 of 6 uncertain samples" in record.getMessage()
    assert len(app.answers[0]["ids"]) == 6


def test_compressed_inference_payload_is_rejected() -> None:
    import io

    from dslo_edge.errors import InvalidUpdate
    from dslo_edge.inference import decode_inputs

    buffer = io.BytesIO()
    # Half a megabyte compressed, half a gigabyte unpacked.
    np.savez_compressed(buffer, x=np.zeros((2_000_000, 64), np.float32))

    with pytest.raises(InvalidUpdate, match="compressed"):
        decode_inputs(buffer.getvalue(), (64,))


def test_spent_budget_is_logged_on_device(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    # With noise multiplier 1, four releases spend epsilon 10.7 (RDP), so
    # this budget refuses the first request.
    privacy = "noise_multiplier = 1.0\nepsilon_budget = 4.0"
    worker = start_hub_worker(mlp_pair, mosquitto.port, tmp_path, privacy)
    daemon = start_unsure_daemon(mlp_pair, mosquitto.port, tmp_path)
    app = LocalApp(mosquitto.port)
    caplog.set_level(logging.INFO, logger="dslo_edge.label_requests")
    x = np.random.default_rng(2).random((6, 64), dtype=np.float32)
    try:
        app.ask(encode_inputs(x))
        wait_until(lambda: daemon.status_report()["label_requests"]["sent"] == 1)
        wait_until(lambda: daemon.requester.counters.budget_exhausted == 1)
        report = daemon.status_report()
    finally:
        app.close()
        daemon.stop()
        worker.stop()

    [record] = [r for r in caplog.records if r.name == "dslo_edge.label_requests"]
    message = record.getMessage()
    assert record.levelname == "WARNING"
    assert f"of device {DEVICE} because the privacy budget is spent" in message
    assert "would raise the device's spent epsilon to" in message
    assert "no label requests for 3600 s" in message
    assert report["label_requests"]["budget_exhausted"] == 1
    assert report["applied_total"] == 0


def test_unanswered_request_reaches_metrics(mlp_pair, mosquitto, tmp_path) -> None:
    # No hub worker runs, so the request times out and nothing trains.
    settings = {
        "enabled": True,
        "max_confidence": 1.0,
        "max_samples": 4,
        "timeout_s": 0.2,
        "max_attempts": 2,
    }
    daemon = start_daemon(
        tmp_path / "device", mlp_pair.bundle, mosquitto.port, settings
    )
    app = LocalApp(mosquitto.port)
    hub = HubClient("127.0.0.1", mosquitto.port, DEVICE)
    x = np.random.default_rng(2).random((6, 64), dtype=np.float32)
    try:
        app.ask(encode_inputs(x))
        wait_until(lambda: daemon.requester.counters.timed_out == 1)
        # The idle trainer publishes the counts, as no update follows.
        metrics = hub.wait_for_metrics(
            lambda m: m["label_requests"]["timed_out"] == 1, 10
        )
    finally:
        hub.close()
        app.close()
        daemon.stop()

    requests = metrics["label_requests"]
    assert requests["sent"] == 1
    assert requests["resent"] == 1
    assert requests["answered"] == 0
    assert metrics["applied"] == 0


def test_rejected_request_reaches_metrics(mlp_pair, mosquitto, tmp_path) -> None:
    # With noise multiplier 1, four releases spend epsilon 10.7 (RDP), so
    # this budget rejects the first request and nothing trains.
    privacy = "noise_multiplier = 1.0\nepsilon_budget = 4.0"
    worker = start_hub_worker(mlp_pair, mosquitto.port, tmp_path, privacy)
    daemon = start_unsure_daemon(mlp_pair, mosquitto.port, tmp_path)
    app = LocalApp(mosquitto.port)
    hub = HubClient("127.0.0.1", mosquitto.port, DEVICE)
    x = np.random.default_rng(2).random((6, 64), dtype=np.float32)
    try:
        app.ask(encode_inputs(x))
        wait_until(lambda: daemon.requester.counters.budget_exhausted == 1)
        metrics = hub.wait_for_metrics(
            lambda m: m["label_requests"]["budget_exhausted"] == 1, 10
        )
    finally:
        hub.close()
        app.close()
        daemon.stop()
        worker.stop()

    assert metrics["label_requests"]["sent"] == 1
    assert metrics["applied"] == 0


def ask_until_budget_rejection(mlp_pair, port: int, tmp_path: Path, x) -> None:
    """Start a daemon, send it x and wait until the hub rejects the request."""
    daemon = start_unsure_daemon(mlp_pair, port, tmp_path)
    app = LocalApp(port)
    try:
        app.ask(encode_inputs(x))
        wait_until(lambda: daemon.requester.counters.budget_exhausted == 1)
    finally:
        app.close()
        daemon.stop()


def test_spent_budget_is_logged_on_hub(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    # With noise multiplier 1, four releases spend epsilon 10.7 (RDP), so
    # this budget rejects every request of four samples.
    privacy = "noise_multiplier = 1.0\nepsilon_budget = 4.0"
    worker = start_hub_worker(mlp_pair, mosquitto.port, tmp_path, privacy)
    caplog.set_level(logging.INFO, logger="dslo_edge.hub_batch")
    x = np.random.default_rng(2).random((6, 64), dtype=np.float32)
    try:
        # A new daemon starts without the backoff, so it requests at once again.
        for attempt in range(2):
            ask_until_budget_rejection(
                mlp_pair, mosquitto.port, tmp_path / str(attempt), x
            )
    finally:
        worker.stop()

    records = [r for r in caplog.records if r.name == "dslo_edge.hub_batch"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert records[0].levelname == "WARNING"
    assert f"device {DEVICE} because its privacy budget is spent" in message
    assert "would raise the device's spent epsilon to" in message
    assert "at most once an hour" in message
    assert worker.labeller.counters.budget_exhausted == 2


def test_paused_training_sends_no_requests(mlp_pair, mosquitto, tmp_path) -> None:
    worker = start_hub_worker(mlp_pair, mosquitto.port, tmp_path)
    # The profile's power model charges energy for the first train step, which
    # spends this budget, so training pauses after the first labels.
    path = tmp_path / "device" / "device.toml"
    path.parent.mkdir()
    overrides = {
        "device": {"profile": "generic-x86_64"},
        "budget": {"energy_budget_j_per_hour": 1e-9},
        "requests": {"enabled": True, "max_confidence": 1.0, "max_samples": 4},
    }
    path.write_text(
        render_config(
            DEVICE,
            mlp_pair.bundle,
            path.parent / "state",
            mosquitto.port,
            overrides=overrides,
        )
    )
    daemon = EdgeDaemon(load_config(path))
    daemon.start()
    wait_until(daemon.subscribed.is_set)
    app = LocalApp(mosquitto.port)
    x = np.random.default_rng(2).random((6, 64), dtype=np.float32)
    try:
        app.ask(encode_inputs(x))
        wait_until(lambda: daemon.metrics.applied >= 1)
        wait_until(lambda: daemon.status_report()["training"]["paused"])
        app.ask(encode_inputs(x + 0.5))
        wait_until(lambda: len(app.answers) == 2)
        time.sleep(0.5)
        report = daemon.status_report()
    finally:
        app.close()
        daemon.stop()
        worker.stop()

    assert report["training"]["codes"] == ["energy"]
    assert report["label_requests"]["sent"] == 1
    assert report["label_requests"]["answered"] == 1
    assert report["applied_total"] == 1


def _npz_with_npy_header(shape: tuple[int, ...], data_bytes: int) -> bytes:
    """Build an .npz whose x.npy header declares ``shape`` over ``data_bytes``."""
    import struct
    import zipfile

    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header = header.ljust(118) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", npy + bytes(data_bytes))
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(4096, 10**5, 10**5, 1), (2, 8, 8, 1)])
def test_inference_rejects_oversized_npy_header(shape: tuple[int, ...]) -> None:
    from dslo_edge.errors import InvalidUpdate
    from dslo_edge.inference import decode_inputs

    payload = _npz_with_npy_header(shape, 64)

    with pytest.raises(InvalidUpdate) as caught:
        decode_inputs(payload, (8, 8, 1))

    assert caught.value.reason == "bad_inputs"
    assert "member x.npy declares" in str(caught.value)
    assert "holds 64 bytes" in str(caught.value)


def test_inference_accepts_exact_npy_header() -> None:
    from dslo_edge.inference import decode_inputs

    payload = _npz_with_npy_header((2, 8, 8, 1), 2 * 64 * 4)

    ids, x = decode_inputs(payload, (8, 8, 1))

    assert len(ids) == 2
    assert x.shape == (2, 8, 8, 1)
    assert float(x.sum()) == 0.0


def test_inference_rejects_local_header_of_other_name() -> None:
    from dslo_edge.errors import InvalidUpdate
    from dslo_edge.inference import decode_inputs

    payload = _npz_with_npy_header((2, 8, 8, 1), 2 * 64 * 4)
    # The first local header's file name, at offset 30, differs from the
    # central directory's, which zipfile reports as BadZipFile.
    assert payload[30:35] == b"x.npy"
    damaged = payload[:30] + b"y.npy" + payload[35:]

    with pytest.raises(InvalidUpdate) as caught:
        decode_inputs(damaged, (8, 8, 1))

    assert caught.value.reason == "bad_inputs"
    assert "expected an .npz archive" in str(caught.value)
    assert "differ" in str(caught.value)


def test_inference_rejects_zero_rows() -> None:
    from dslo_edge.errors import InvalidUpdate
    from dslo_edge.inference import decode_inputs

    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((0, 8, 8, 1), np.float32))

    with pytest.raises(InvalidUpdate) as caught:
        decode_inputs(buffer.getvalue(), (8, 8, 1))

    assert caught.value.reason == "bad_inputs"
    assert str(caught.value).endswith("so no inputs; expected 1 to 4096")


def test_inference_rejects_float64_overflow(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    # 1e300 is finite as float64 but overflows the student's float32 input.
    caplog.set_level(logging.WARNING)
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port, {})
    app = LocalApp(mosquitto.port)
    x = np.zeros((2, 64), np.float32)
    huge = np.full((2, 64), 1e300)
    try:
        app.ask(npz_payload(x=huge))
        app.ask(encode_inputs(x, ["cam-0", "cam-1"]))
        wait_until(lambda: app.answers)
    finally:
        app.close()
        daemon.stop()

    assert daemon.inference_rejected == {"bad_inputs": 1}
    assert app.answers[0]["ids"] == ["cam-0", "cam-1"]
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1
    assert "x has magnitude 1e+300, above the float32 maximum 3.4e+38" in messages[0]


def test_inference_queue_bounded_by_bytes(
    mlp_pair, mosquitto, tmp_path, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="dslo_edge.daemon")
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto.port, {})
    app = LocalApp(mosquitto.port)
    # The trainer stops in the first payload's handler, so the rest wait.
    handle = daemon.inference.handle
    holding = threading.Event()
    release = threading.Event()

    def held_handle(payload: bytes, student) -> None:
        if not holding.is_set():
            holding.set()
            release.wait(30)
        handle(payload, student)

    daemon.inference.handle = held_handle
    payload = b"PK" + bytes(4 * 2**20 - 2)
    try:
        app.ask(payload)
        wait_until(holding.is_set)
        for _ in range(9):
            app.ask(payload)
        wait_until(
            lambda: (
                daemon.infer_inputs.qsize() + daemon.inference_rejected["queue_full"]
                == 9
            )
        )
        queued = daemon.infer_inputs.qsize()
        queued_bytes = sum(len(item.payload) for item in daemon.infer_inputs.queue)
        release.set()
        wait_until(lambda: daemon.inference_rejected["bad_inputs"] == 1 + queued)
    finally:
        release.set()
        app.close()
        daemon.stop()

    assert queued == 2
    assert queued_bytes == 2 * len(payload)
    assert daemon.inference_rejected["queue_full"] == 7
    full = [r.getMessage() for r in caplog.records if "queue_full" in r.getMessage()]
    assert len(full) == 1
    assert (
        "2 of at most 64 payloads wait, 8388608 of at most 8388608 bytes" in (full[0])
    )
