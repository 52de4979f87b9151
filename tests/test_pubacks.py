"""PubackTracker against a real mosquitto: reason codes, sequence, chaining."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt

from dslo_edge.hub import NO_MATCHING_SUBSCRIBERS
from dslo_edge.pubacks import PubackTracker
from tests.hub_fleet import subscribed_client


def test_tracker_keeps_earlier_handler(mosquitto) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    earlier: list[tuple[int, int]] = []
    client.on_publish = lambda _c, _u, mid, reason, _p: earlier.append(
        (mid, reason.value)
    )
    tracker = PubackTracker(client)
    listener, _received = subscribed_client(mosquitto.port, "delivered/topic")
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        since = tracker.sequence
        delivered = client.publish("delivered/topic", b"x", qos=1)
        dropped = client.publish("nobody/listens", b"x", qos=1)
        delivered_code = tracker.wait(delivered.mid, since, 10)
        dropped_code = tracker.wait(dropped.mid, since, 10)
        sequence = tracker.sequence
    finally:
        client.disconnect()
        client.loop_stop()
        listener.disconnect()
        listener.loop_stop()

    assert delivered_code == 0
    assert dropped_code == NO_MATCHING_SUBSCRIBERS
    assert sequence == since + 2
    assert earlier == [(delivered.mid, 0), (dropped.mid, NO_MATCHING_SUBSCRIBERS)]
    # A PUBACK numbered up to ``since`` does not count for a later publish.
    assert tracker.reason_code(delivered.mid, sequence) is None
    assert tracker.reason_code(delivered.mid, since) == 0


def test_wait_for_all_stops_early() -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    tracker = PubackTracker(client)
    stopping = threading.Event()
    stopping.set()
    # Never connected, so paho keeps the message and no PUBACK comes.
    info = client.publish("some/topic", b"x", qos=1)

    problem = tracker.wait_for_all([info], tracker.sequence, 30.0, stopping)

    assert problem == "stopped waiting, because the worker is stopping"
