"""Label requests published with QoS 0, which the hub drops unqueued."""

from __future__ import annotations

import time

import numpy as np

from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.label_protocol import (
    LabelRequest,
    encode_request,
    request_properties,
    user_properties,
)
from tests.hub_fleet import HubWatcher, subscribed_client, wait_online, write_hub_config


def request_payload(request_id: bytes) -> bytes:
    inputs = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    return encode_request(LabelRequest(request_id, time.time(), ["a", "b"], inputs))


def test_qos0_requests_get_no_labels(mlp_pair, mosquitto, tmp_path, caplog) -> None:
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    worker = HubWorker(load_hub_config(config, "w1"))
    client, received = subscribed_client(
        mosquitto.port,
        "dslo/cam/labels",
        lambda message: user_properties(message.properties)["status"],
    )
    caplog.set_level("WARNING", logger="dslo_edge.hub_service")
    watcher = HubWatcher(mosquitto.port)

    try:
        worker.start()
        wait_online(watcher, ["w1"])

        for index in range(3):
            request_id = bytes([index]) * 16
            client.publish(
                "dslo/cam/requests",
                request_payload(request_id),
                qos=0,
                properties=request_properties("dslo/cam/labels", request_id),
            )

        request_id = b"q" * 16
        client.publish(
            "dslo/cam/requests",
            request_payload(request_id),
            qos=1,
            properties=request_properties("dslo/cam/labels", request_id),
        )

        assert received.get(timeout=10) == "ok"
        # Leaves time for a late response to one of the QoS 0 requests.
        time.sleep(0.5)
        assert received.empty()
        counters = worker.counters
    finally:
        worker.stop()
        watcher.close()
        client.disconnect()
        client.loop_stop()

    assert counters["requests"] == 4
    assert counters["answered"] == 1
    assert counters["unanswerable"] == 3
    assert counters["labelled_samples"] == 2
    warnings = [r.getMessage() for r in caplog.records if "QoS 0" in r.getMessage()]
    # The first QoS 0 request is logged, the other two only counted.
    assert warnings == [
        "Ignoring a label request from cam published with QoS 0; label requests "
        "need QoS 1"
    ]
