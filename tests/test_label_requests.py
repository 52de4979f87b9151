"""Label requests on the device: payload, sample selection, matching, resend."""

from __future__ import annotations

import math
import struct
import threading
import time
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dslo_edge.errors import ConfigError, InvalidRequest, InvalidUpdate
from dslo_edge.label_protocol import (
    LabelRequest,
    decode_request,
    device_of_request_topic,
    encode_request,
    response_properties,
)
from dslo_edge.label_requests import (
    DUPLICATE,
    UNEXPECTED,
    LabelRequester,
    RequestSettings,
    SelectionSettings,
    select_samples,
)
from dslo_edge.protocol import SoftLabelUpdate, decode_update, encode_update


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_request(count: int = 3) -> LabelRequest:
    inputs = np.arange(count * 4, dtype=np.float32).reshape(count, 2, 2)
    return LabelRequest(b"r" * 16, 1234.5, [f"id{i}" for i in range(count)], inputs)


def message(request_id: bytes | None, status: str, payload: bytes = b"") -> object:
    properties = response_properties(request_id or b"", status, 2.5)
    if request_id is None:
        properties.CorrelationData = None
    return SimpleNamespace(payload=payload, properties=properties)


def test_request_round_trips() -> None:
    request = make_request()
    decoded = decode_request(encode_request(request), max_samples=16)
    assert decoded.request_id == request.request_id
    assert decoded.timestamp == 1234.5
    assert decoded.sample_ids == request.sample_ids
    np.testing.assert_array_equal(decoded.inputs, request.inputs)


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda p: p[:-1], "truncated"),
        (lambda p: p + b"\0", "malformed"),
        (lambda p: b"XXXX" + p[4:], "bad_magic"),
        (lambda p: p[:4] + b"\x09" + p[5:], "unsupported_version"),
        (lambda p: p[:5] + b"\x01" + p[6:], "malformed"),
        (lambda p: p[:10], "truncated"),
    ],
)
def test_bad_request_payloads_raise(mangle, reason) -> None:
    payload = mangle(encode_request(make_request()))
    with pytest.raises(InvalidRequest) as caught:
        decode_request(payload, max_samples=16)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda p: p[:5] + b"\x01" + p[6:], "flags byte is 1, expected 0"),
        (lambda p: p[:34] + b"\x09" + p[35:], "input rank is 9, expected 1 to 4"),
        (
            lambda p: p[:22] + struct.pack("<d", math.nan) + p[30:],
            "timestamp is nan, expected finite Unix seconds",
        ),
    ],
)
def test_malformed_request_names_field(mangle, message) -> None:
    payload = mangle(encode_request(make_request()))
    with pytest.raises(InvalidRequest) as caught:
        decode_request(payload, max_samples=16)
    assert caught.value.reason == "malformed"
    assert str(caught.value) == message


def test_request_sample_limit() -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_request(encode_request(make_request(5)), max_samples=4)
    assert caught.value.reason == "too_many_samples"
    assert str(caught.value).endswith(
        "request has 5 samples, expected 1 to 4; set requests.max_samples in "
        "the device config to at most 4, or raise requests.max_samples in the "
        "hub config"
    )


def test_request_topic_names_device() -> None:
    assert device_of_request_topic("dslo/cam-1/requests", "dslo") == "cam-1"
    assert device_of_request_topic("dslo/_hub/requests", "dslo") is None
    assert device_of_request_topic("dslo/cam-1/updates", "dslo") is None
    assert device_of_request_topic("other/cam-1/requests", "dslo") is None


def test_selection_by_confidence_orders_least_confident_first() -> None:
    student = np.array([[0.9, 0.1], [0.55, 0.45], [0.7, 0.3], [0.5, 0.5]])
    settings = SelectionSettings(rule="confidence", max_confidence=0.75)
    assert select_samples(student, settings).tolist() == [3, 1, 2]


def test_selection_by_disagreement_needs_reference() -> None:
    student = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    reference = np.array([[0.1, 0.9], [0.85, 0.15], [0.6, 0.4]])
    settings = SelectionSettings(rule="disagreement", min_disagreement=0.3)
    assert select_samples(student, settings).tolist() == []
    assert select_samples(student, settings, reference).tolist() == [0]


def test_selection_either_rule_and_cap() -> None:
    student = np.array([[0.9, 0.1], [0.5, 0.5], [0.55, 0.45]])
    reference = np.array([[0.1, 0.9], [0.5, 0.5], [0.55, 0.45]])
    settings = SelectionSettings(max_confidence=0.6, max_samples=2)
    assert select_samples(student, settings, reference).tolist() == [0, 1]


def test_selection_settings_reject_bad_values() -> None:
    with pytest.raises(ConfigError, match="rule"):
        SelectionSettings(rule="entropy")
    with pytest.raises(ConfigError, match="max_confidence"):
        SelectionSettings(max_confidence=0.0)


def test_first_response_finishes_request() -> None:
    requester = LabelRequester("cam", clock=FakeClock())
    pending = requester.open(["a"], np.zeros((1, 4), np.float32))
    request_id = pending.request.request_id
    first = requester.match(message(request_id, "ok", b"labels"))
    second = requester.match(message(request_id, "ok", b"labels"))
    stray = requester.match(message(b"x" * 16, "ok"))
    assert first.kind == "ok"
    assert first.request is pending.request
    assert second.kind == DUPLICATE
    assert stray.kind == UNEXPECTED
    assert requester.pending == 0
    assert requester.counters.answered == 0
    assert requester.counters.duplicates == 1
    assert requester.counters.unexpected == 1


def test_ok_response_answered_once_applied() -> None:
    clock = FakeClock()
    requester = LabelRequester("cam", clock=clock)
    pending = requester.open(["a"], np.zeros((1, 4), np.float32))
    clock.now += 2.5
    response = requester.match(message(pending.request.request_id, "ok", b"labels"))

    assert requester.counters.answered == 0
    assert list(requester.counters.latencies_s) == []

    requester.record_answered(response.latency_s)

    assert requester.counters.answered == 1
    assert list(requester.counters.latencies_s) == [2.5]


def test_unanswered_request_is_resent_then_given_up() -> None:
    clock = FakeClock()
    settings = RequestSettings(timeout_s=1.0, max_attempts=3)
    requester = LabelRequester("cam", settings=settings, clock=clock)
    requester.open(["a"], np.zeros((1, 4), np.float32))
    assert requester.due() == []
    clock.now += 1.0
    assert len(requester.due()) == 1
    clock.now += 1.5
    assert requester.due() == []
    clock.now += 0.5
    assert len(requester.due()) == 1
    clock.now += 4.0
    assert requester.due() == []
    assert requester.pending == 0
    assert requester.counters.resent == 2
    assert requester.counters.timed_out == 1


def test_given_up_request_names_topics(caplog) -> None:
    clock = FakeClock()
    settings = RequestSettings(timeout_s=1.0, max_attempts=1)
    requester = LabelRequester("cam", "home", settings=settings, clock=clock)
    requester.open(["a"], np.zeros((1, 4), np.float32))
    clock.now += 1.0

    with caplog.at_level("WARNING", logger="dslo_edge.label_requests"):
        assert requester.due() == []

    [record] = caplog.records
    assert "gave up label request" in record.getMessage()
    assert "without a response on home/cam/labels" in record.getMessage()
    assert "reads home/cam/requests" in record.getMessage()
    assert "mqtt.topic_prefix" in record.getMessage()


def test_rate_limited_response_blocks_new_requests() -> None:
    clock = FakeClock()
    requester = LabelRequester("cam", clock=clock)
    pending = requester.open(["a"], np.zeros((1, 4), np.float32))
    requester.match(message(pending.request.request_id, "rate_limited"))
    assert requester.blocked_for() == pytest.approx(2.5)
    assert requester.open(["b"], np.zeros((1, 4), np.float32)) is None
    clock.now += 2.5
    assert requester.open(["b"], np.zeros((1, 4), np.float32)) is not None


def test_max_pending_caps_open_requests() -> None:
    requester = LabelRequester("cam", settings=RequestSettings(max_pending=2))
    opened = [requester.open([f"s{i}"], np.zeros((1, 4), np.float32)) for i in range(3)]
    assert [p is not None for p in opened] == [True, True, False]


def labels_payload(request: LabelRequest, message_id: bytes) -> bytes:
    update = SoftLabelUpdate(
        message_id=message_id,
        teacher_version="t",
        teacher_round=1,
        timestamp=1.0,
        sample_ids=request.sample_ids,
        inputs=request.inputs,
        labels=np.full((request.sample_count, 2), 0.5, np.float32),
        label_kind="probabilities",
    )
    return encode_update(update)


def test_labels_update_checks_request_id() -> None:
    requester = LabelRequester("cam")
    pending = requester.open(["a", "b"], np.zeros((2, 3), np.float32))
    request = pending.request
    good = requester.match(message(request.request_id, "ok"))
    good.payload = labels_payload(request, request.request_id)
    update = requester.labels_update(good, decode_update)
    assert update.sample_ids == ["a", "b"]
    good.payload = labels_payload(request, b"z" * 16)
    with pytest.raises(InvalidUpdate) as caught:
        requester.labels_update(good, decode_update)
    assert caught.value.reason == "response_mismatch"


def test_repeated_rejection_is_logged_once_a_minute(caplog) -> None:
    clock = FakeClock()
    requester = LabelRequester("cam", clock=clock)

    def reject(text: bytes) -> None:
        pending = requester.open(["a"], np.zeros((1, 4), np.float32))
        requester.match(message(pending.request.request_id, "rejected", text))

    with caplog.at_level("WARNING", logger="dslo_edge.label_requests"):
        for _ in range(5):
            reject(b"bad key")
            clock.now += 10.0
        reject(b"unknown device")
        clock.now += 20.0
        reject(b"bad key")

    lines = [record.getMessage() for record in caplog.records]
    assert requester.counters.rejected == 7
    assert len(lines) == 3
    assert lines[0].endswith("with status rejected: bad key")
    assert lines[1].endswith("with status rejected: unknown device")
    assert lines[2].endswith(
        "with status rejected: bad key (4 more such responses since the last line)"
    )


def test_rejections_differing_in_numbers_repeat(caplog) -> None:
    clock = FakeClock()
    requester = LabelRequester("cam", clock=clock)

    with caplog.at_level("WARNING", logger="dslo_edge.label_requests"):
        for count in range(40, 45):
            pending = requester.open(["a"], np.zeros((1, 4), np.float32))
            request_hex = pending.request.request_id.hex()
            text = f"request {request_hex} has {count} samples, max 32.5"
            requester.match(
                message(pending.request.request_id, "rejected", text.encode())
            )
            clock.now += 10.0
        pending = requester.open(["a"], np.zeros((1, 4), np.float32))
        requester.match(message(pending.request.request_id, "rejected", b"bad key"))

    lines = [record.getMessage() for record in caplog.records]
    assert requester.counters.rejected == 6
    assert len(lines) == 2
    assert "has 40 samples, max 32.5" in lines[0]
    assert lines[1].endswith("with status rejected: bad key")


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s"
        time.sleep(0.05)


def _session_client(port: int, client_id: str, received: list) -> mqtt.Client:
    """Connect a persistent-session MQTT 5 client that records correlation ids."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.on_message = lambda _c, _u, m: received.append(m.properties.CorrelationData)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 300
    client.connect("127.0.0.1", port, clean_start=False, properties=properties)
    client.loop_start()
    return client


def test_request_expires_when_device_gives_up(mosquitto) -> None:
    # A hub worker that subscribed and then died: its session queues requests.
    received: list[bytes] = []
    hub = _session_client(mosquitto.port, "dslo-hub-w1", received)
    subscribed = threading.Event()
    hub.on_subscribe = lambda *_: subscribed.set()
    hub.subscribe("$share/dslo-hub/dslo/+/requests", qos=1)
    assert subscribed.wait(10)
    hub.disconnect()
    hub.loop_stop()
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pubacks: list[int] = []
    device.on_publish = lambda _c, _u, mid, *_: pubacks.append(mid)
    device.connect("127.0.0.1", mosquitto.port)
    device.loop_start()
    inputs = np.zeros((1, 4), np.float32)
    # Given up after 0.5 + 1.0 s, so the broker keeps it for 2 s.
    short = LabelRequester("cam", settings=RequestSettings(0.5, max_attempts=2))
    first = short.open(["a"], inputs)
    # Given up after 75 s: still queued when the worker returns.
    long = LabelRequester("cam", settings=RequestSettings(5.0, max_attempts=4))
    second = long.open(["b"], inputs)
    assert first is not None and second is not None
    short.publish(device, first)
    long.publish(device, second)
    # The broker counts a message's expiry from when it receives it.
    wait_until(lambda: len(pubacks) == 2)
    time.sleep(3.0)
    device.disconnect()
    device.loop_stop()

    hub = _session_client(mosquitto.port, "dslo-hub-w1", received)
    # Wait for the queued request, then 1 s more for the expired one.
    wait_until(lambda: received)
    time.sleep(1.0)
    hub.disconnect()
    hub.loop_stop()

    assert received == [second.request.request_id]
