"""Home Assistant discovery payloads: schema, templates and a real broker."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.broker import Broker
from dslo_edge.budget import BudgetDecision
from dslo_edge.homeassistant import (
    ENTITIES,
    discovery_messages,
    node_id,
    publish_discovery,
    removal_messages,
    value_template,
)
from dslo_edge.metrics import DaemonMetrics
from dslo_edge.protocol import STATUS_OFFLINE, STATUS_ONLINE, Topics

SCHEMA = json.loads(
    (
        Path(__file__).parent / "schemas/homeassistant_mqtt_discovery.schema.json"
    ).read_text()
)
TIMEOUT_S = 10.0
TOPICS = Topics.for_device("kitchen-cam")


def validator(component: str) -> jsonschema.Draft202012Validator:
    schema = {**SCHEMA, "$ref": f"#/$defs/{component}"}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def metrics_report(paused: bool = False) -> dict[str, Any]:
    metrics = DaemonMetrics()
    for train_ms in (0.2, 0.3, 0.4):
        metrics.record_applied(32, 0.5, 0.6, train_ms=train_ms, e2e_ms=10 * train_ms)
    decision = BudgetDecision(
        paused, ("battery BAT0 at 12% and discharging",) if paused else ()
    )
    extra = {
        "probe_accuracy": 0.8125,
        "training": decision.as_metrics(),
        "energy": {
            "source": "hwmon/ina226 (hwmon2)/power1_input",
            "estimated": False,
            "joules_per_update": 0.0123,
            "average_power_w": 3.2,
            "battery": {
                "percent_per_1000_updates": 0.0342,
                "percent_per_hour": None,
            },
        },
    }
    return metrics.snapshot("kitchen-cam", extra)


def render(template: str, payload: dict[str, Any]) -> str:
    sandbox = pytest.importorskip("jinja2.sandbox")
    environment = sandbox.SandboxedEnvironment()
    return environment.from_string(template).render(value_json=payload)


def test_every_payload_matches_the_schema() -> None:
    messages = discovery_messages("kitchen-cam", TOPICS, model="Raspberry Pi 4")
    assert len(messages) == len(ENTITIES)
    for topic, text in messages:
        component = topic.split("/")[1]
        payload = json.loads(text)
        errors = sorted(validator(component).iter_errors(payload), key=str)
        assert errors == [], f"{topic}: {errors[0].message if errors else ''}"


def test_payloads_tie_availability_to_status() -> None:
    for _, text in discovery_messages("kitchen-cam", TOPICS):
        payload = json.loads(text)
        assert payload["availability_topic"] == "dslo/kitchen-cam/status"
        assert payload["payload_available"] == STATUS_ONLINE
        assert payload["payload_not_available"] == STATUS_OFFLINE
        assert payload["state_topic"] == "dslo/kitchen-cam/metrics"
        assert payload["device"]["identifiers"] == ["dslo_edge_kitchen-cam"]


def test_node_ids_differ_for_replaced_characters() -> None:
    assert node_id("kitchen-cam_2") == "kitchen-cam_2"
    assert node_id("cam_1") == "cam_1"
    assert node_id("cam.1") == "cam_1_66498bf0"


def test_topics_and_unique_ids() -> None:
    messages = dict(discovery_messages("porch.cam 2", TOPICS))
    # The first 8 hex digits of sha256(b"porch.cam 2").
    assert node_id("porch.cam 2") == "porch_cam_2_c8616efd"
    topic = "homeassistant/binary_sensor/porch_cam_2_c8616efd/training_active/config"
    assert json.loads(messages[topic])["unique_id"] == (
        "dslo_edge_porch_cam_2_c8616efd_training_active"
    )
    unique_ids = [json.loads(text)["unique_id"] for text in messages.values()]
    assert len(set(unique_ids)) == len(unique_ids)


def test_schema_rejects_common_mistakes() -> None:
    sensor = validator("sensor")
    base = json.loads(discovery_messages("cam", TOPICS)[2][1])  # train_p50
    assert sensor.is_valid(base)
    for change in (
        {"unit_of_measurement": "milliseconds"},  # not a duration unit
        {"state_topic": "dslo/+/metrics"},  # wildcards are not allowed
        {"unit_of_measurment": "ms"},  # misspelt key
        {"device": {"name": "no identifiers"}},
    ):
        assert not sensor.is_valid({**base, **change}), change


@pytest.mark.parametrize(
    ("object_id", "expected"),
    [
        ("updates_applied", "3"),
        ("probe_accuracy", "81.2"),
        ("train_p50", "0.3"),
        ("end_to_end_p95", "3.9"),
        ("energy_per_update", "0.0123"),
        ("average_power", "3.2"),
        ("battery_per_1000_updates", "0.0342"),
        ("battery_per_hour", "None"),
        ("energy_source", "hwmon/ina226 (hwmon2)/power1_input"),
        ("training_active", "ON"),
    ],
)
def test_templates_render_metrics(object_id: str, expected: str) -> None:
    entity = next(e for e in ENTITIES if e.object_id == object_id)
    rendered = render(entity.config["value_template"], metrics_report())
    assert rendered == expected or float(rendered) == pytest.approx(float(expected))


def test_templates_tolerate_missing_fields() -> None:
    old_report = {"device": "kitchen-cam", "applied": 4}
    for entity in ENTITIES:
        rendered = render(entity.config["value_template"], old_report)
        assert rendered in ("4.0", "4", "None", "none", "ON"), entity.object_id


def test_paused_training_renders_off_with_reason() -> None:
    entity = next(e for e in ENTITIES if e.object_id == "training_active")
    report = metrics_report(paused=True)
    assert render(entity.config["value_template"], report) == "OFF"
    attributes = json.loads(render(entity.config["json_attributes_template"], report))
    assert attributes == {"pause_reason": "battery BAT0 at 12% and discharging"}


def test_value_template_checks_every_level() -> None:
    template = value_template("energy.battery.percent_per_hour", digits=2)
    assert "value_json.energy is defined" in template
    assert "value_json.energy.battery is defined" in template
    assert render(template, {"energy": {}}) == "None"


# Through a real broker


class Collector:
    """A paho client that subscribes to a filter and queues (topic, payload)."""

    def __init__(self, broker: Broker, topic_filter: str, client_id: str):
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = lambda client, *_: client.subscribe(
            topic_filter, qos=1
        )
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, message: self.messages.put(
            (message.topic, bytes(message.payload), bool(message.retain))
        )
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self.subscribed.wait(TIMEOUT_S), "subscription timed out"

    def take(self, count: int) -> list[tuple[str, bytes, bool]]:
        return [self.messages.get(timeout=TIMEOUT_S) for _ in range(count)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connected_client(broker: Broker, client_id: str, **will: Any) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if will:
        client.will_set(**will)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(broker.host, broker.port, keepalive=5)
    client.loop_start()
    assert connected.wait(TIMEOUT_S), "connect timed out"
    return client


def test_discovery_retained_through_broker(broker: Broker) -> None:
    device = connected_client(broker, "device")
    messages = discovery_messages("kitchen-cam", TOPICS)
    for info in publish_discovery(device, messages):
        info.wait_for_publish(timeout=TIMEOUT_S)
    device.publish(TOPICS.metrics, json.dumps(metrics_report()), qos=1, retain=True)
    device.publish(TOPICS.status, STATUS_ONLINE, qos=1, retain=True).wait_for_publish(
        timeout=TIMEOUT_S
    )

    # A hub that subscribes later receives every config as a retained message.
    hub = Collector(broker, "homeassistant/#", "home-assistant")
    received = {topic: payload for topic, payload, _ in hub.take(len(messages))}
    assert set(received) == {topic for topic, _ in messages}
    for topic, payload in received.items():
        config = json.loads(payload)
        assert validator(topic.split("/")[1]).is_valid(config)
    hub.close()

    state = Collector(broker, "dslo/kitchen-cam/#", "home-assistant-state")
    by_topic = {topic: payload for topic, payload, _ in state.take(2)}
    metrics = json.loads(by_topic[TOPICS.metrics])
    sensor = json.loads(
        received["homeassistant/sensor/kitchen-cam/probe_accuracy/config"]
    )
    assert render(sensor["value_template"], metrics) == "81.2"
    assert by_topic[TOPICS.status] == STATUS_ONLINE.encode()
    state.close()

    for info in publish_discovery(device, removal_messages("kitchen-cam")):
        info.wait_for_publish(timeout=TIMEOUT_S)
    device.disconnect()
    device.loop_stop()


def test_last_will_marks_entities_unavailable(broker: Broker) -> None:
    device = connected_client(
        broker,
        "device-will",
        topic=TOPICS.status,
        payload=STATUS_OFFLINE,
        qos=1,
        retain=True,
    )
    device.publish(TOPICS.status, STATUS_ONLINE, qos=1, retain=True).wait_for_publish(
        timeout=TIMEOUT_S
    )
    watcher = Collector(broker, TOPICS.status, "watcher")
    assert watcher.take(1)[0][1] == STATUS_ONLINE.encode()

    # Drop the connection without a DISCONNECT packet, as a crash would.
    device.loop_stop()
    device.socket().close()

    topic, payload, _ = watcher.take(1)[0]
    assert topic == TOPICS.status
    assert payload == STATUS_OFFLINE.encode()
    watcher.close()
