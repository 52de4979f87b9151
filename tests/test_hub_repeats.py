"""Request ids at a hub worker: repeats in one batch, malformed copies, no id."""

from __future__ import annotations

import time

import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.label_protocol import (
    LabelRequest,
    encode_request,
    request_properties,
    user_properties,
)
from tests.hub_fleet import (
    HubWatcher,
    subscribed_client,
    wait_online,
    write_hub_config,
)

REQUEST_ID = b"r" * 16


def request_payload(sample_count: int) -> bytes:
    inputs = np.random.default_rng(sample_count).random(
        (sample_count, 64), dtype=np.float32
    )
    ids = [f"s{index}" for index in range(sample_count)]
    return encode_request(LabelRequest(REQUEST_ID, time.time(), ids, inputs))


def test_repeated_id_in_batch_charged_once(mlp_pair, mosquitto, tmp_path) -> None:
    extra = {"privacy": "noise_multiplier = 10.0\nepsilon_budget = 100.0"}
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle, extra)
    # A long batch wait puts all copies into one batch.
    text = config.read_text().replace("batch_wait_s = 0.02", "batch_wait_s = 1.0")
    config.write_text(text)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/kitchen/labels")
    watcher = HubWatcher(mosquitto.port)
    try:
        worker.start()
        wait_online(watcher, ["w1"])
        properties = request_properties("dslo/kitchen/labels", REQUEST_ID)
        # Four copies of a 2-sample request, then the same id with 8 samples.
        for payload in [request_payload(2)] * 4 + [request_payload(8)]:
            client.publish(
                "dslo/kitchen/requests", payload, qos=1, properties=properties
            )
        replies = [received.get(timeout=10) for _ in range(5)]
        time.sleep(0.5)
        extra_replies = received.qsize()
        releases = worker.state.releases("kitchen")
        counters = worker.counters
    finally:
        worker.stop()
        watcher.close()
        client.disconnect()
        client.loop_stop()

    statuses = [user_properties(reply.properties)["status"] for reply in replies]
    assert statuses == ["ok"] * 5
    assert extra_replies == 0
    # Every copy gets the same noisy labels, so averaging them gains nothing.
    assert len({reply.payload for reply in replies}) == 1
    assert releases == {10.0: 2}
    assert counters["teacher_calls"] == 1
    assert counters["labelled_samples"] == 2
    assert counters["answered"] == 1
    assert counters["cached"] == 4


def test_malformed_copy_keeps_stored_reply(mlp_pair, mosquitto, tmp_path) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/kitchen/labels")
    watcher = HubWatcher(mosquitto.port)
    properties = request_properties("dslo/kitchen/labels", REQUEST_ID)

    def send(payload: bytes):
        client.publish("dslo/kitchen/requests", payload, qos=1, properties=properties)
        return received.get(timeout=10)

    try:
        worker.start()
        wait_online(watcher, ["w1"])
        first = send(request_payload(2))
        malformed = send(b"DSLQ")
        resent = send(request_payload(2))
        counters = worker.counters
        stored = worker.state.answer_counts()
    finally:
        worker.stop()
        watcher.close()
        client.disconnect()
        client.loop_stop()

    assert user_properties(first.properties)["status"] == "ok"
    assert user_properties(malformed.properties)["status"] == "rejected"
    # The resend gets the stored reply of the first request, not the rejection.
    assert user_properties(resent.properties)["status"] == "ok"
    assert resent.payload == first.payload
    assert counters["teacher_calls"] == 1
    assert stored == {"ok": 1}


def test_request_without_correlation_data(mlp_pair, mosquitto, tmp_path) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/kitchen/labels")
    watcher = HubWatcher(mosquitto.port)
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = "dslo/kitchen/labels"
    try:
        worker.start()
        wait_online(watcher, ["w1"])
        client.publish(
            "dslo/kitchen/requests", request_payload(2), qos=1, properties=properties
        )
        reply = received.get(timeout=10)
    finally:
        worker.stop()
        watcher.close()
        client.disconnect()
        client.loop_stop()

    assert user_properties(reply.properties)["status"] == "rejected"
    assert reply.payload.decode().startswith("the request has no correlation data")


def test_replayed_rate_limit_has_retry_time(mlp_pair, mosquitto, tmp_path) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    # One request per 10 s and no burst, so a second request is rate limited.
    text = config.read_text().replace(
        "requests_per_s = 1.0\nburst = 2", "requests_per_s = 0.1\nburst = 1"
    )
    config.write_text(text)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(mosquitto.port, "dslo/kitchen/labels")
    watcher = HubWatcher(mosquitto.port)

    def send(request_id: bytes):
        properties = request_properties("dslo/kitchen/labels", request_id)
        payload = request_payload(2).replace(REQUEST_ID, request_id)
        client.publish("dslo/kitchen/requests", payload, qos=1, properties=properties)
        return received.get(timeout=10)

    try:
        worker.start()
        wait_online(watcher, ["w1"])
        first_sent_at = time.monotonic()
        first = send(b"a" * 16)
        first_received_at = time.monotonic()
        limited = send(b"b" * 16)
        limited_received_at = time.monotonic()
        time.sleep(1.0)
        replay_sent_at = time.monotonic()
        replayed = send(b"b" * 16)
        replay_received_at = time.monotonic()
        counters = worker.counters
    finally:
        worker.stop()
        watcher.close()
        client.disconnect()
        client.loop_stop()

    limited_properties = user_properties(limited.properties)
    replayed_properties = user_properties(replayed.properties)
    assert user_properties(first.properties)["status"] == "ok"
    assert limited_properties["status"] == "rate_limited"
    assert replayed_properties["status"] == "rate_limited"
    assert replayed.payload == limited.payload
    assert counters["cached"] == 1
    # The replay gives the time still left until the next token, which is
    # less than the first response gave by the time between the two
    # admissions. Each admission happened between its request's publish and
    # its response, and the property is rounded to 1 ms.
    first_wait = float(limited_properties["retry_after_s"])
    replayed_wait = float(replayed_properties["retry_after_s"])
    assert first_wait <= 10.0
    assert first_wait >= 10.0 - (limited_received_at - first_sent_at) - 0.001
    assert replayed_wait <= first_wait - (replay_sent_at - limited_received_at) + 0.002
    assert (
        replayed_wait >= first_wait - (replay_received_at - first_received_at) - 0.002
    )
