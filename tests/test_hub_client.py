"""HubClient, the publishing side of 'dslo-edge push', against a real broker."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt

from dslo_edge.hub import HubClient

DEVICE = "d1"


def test_metrics_after_unparsable_json_arrive(mosquitto) -> None:
    hub = HubClient("127.0.0.1", mosquitto.port, DEVICE)
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    device.connect("127.0.0.1", mosquitto.port)
    device.loop_start()
    unparsable = [
        # json.loads rejects an int of more than 4300 digits with a ValueError.
        b'{"updates": 1' + b"0" * 5000 + b"}",
        # Lists nested deeper than its recursion limit raise RecursionError.
        b"[" * 100_000 + b"]" * 100_000,
    ]
    try:
        # The retained status arrives once the hub's subscriptions are active.
        device.publish(f"dslo/{DEVICE}/status", "online", qos=1, retain=True)
        deadline = time.monotonic() + 10
        while hub.status != "online" and time.monotonic() < deadline:
            time.sleep(0.05)
        for payload in unparsable:
            device.publish(f"dslo/{DEVICE}/metrics", payload, qos=1).wait_for_publish(
                10
            )
        valid = json.dumps({"updates": 3})
        device.publish(f"dslo/{DEVICE}/metrics", valid, qos=1).wait_for_publish(10)

        metrics = hub.wait_for_metrics(lambda report: report["updates"] == 3, 10)
        connected = hub.client.is_connected()
    finally:
        device.publish(f"dslo/{DEVICE}/status", "", qos=1, retain=True)
        device.disconnect()
        device.loop_stop()
        hub.close()

    assert metrics == {"updates": 3}
    assert connected
