"""Home Assistant MQTT discovery messages for a device's metrics.

Each entity reads one field of the retained metrics JSON on
``<prefix>/<device>/metrics`` with a ``value_template``. Availability follows
the retained ``online`` / ``offline`` status topic, which the broker sets to
``offline`` through the daemon's last will when the device drops off.

Discovery topics follow Home Assistant's
``<discovery_prefix>/<component>/<node_id>/<object_id>/config`` layout, and
the messages are published retained so Home Assistant finds them after its
own restart.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from dslo_edge import __version__
from dslo_edge.protocol import STATUS_OFFLINE, STATUS_ONLINE, Topics

DISCOVERY_PREFIX = "homeassistant"
# Home Assistant publishes "online" here when it starts; a device may publish
# its discovery messages again in reply.
HOME_ASSISTANT_STATUS_TOPIC = "homeassistant/status"
_UNSAFE_ID_CHARS = re.compile(r"[^a-zA-Z0-9_-]")


def value_template(path: str, *, scale: float | None = None, digits: int = 3) -> str:
    """Return a Jinja template reading a dotted metrics field, or None if absent.

    Every level of ``path`` is tested with ``is defined`` so that a metrics
    report from a daemon without that field renders ``None`` instead of an
    error.

    NOTE: Home Assistant is expected to show a rendered None as "unknown";
    this was not checked against a running Home Assistant.
    """
    parts = path.split(".")
    checks = [
        f"value_json.{'.'.join(parts[: i + 1])} is defined" for i in range(len(parts))
    ]
    field_expression = f"value_json.{path}"
    value = field_expression if scale is None else f"{field_expression} * {scale}"
    return (
        "{{ "
        f"({value}) | round({digits}) if {' and '.join(checks)} "
        f"and {field_expression} is not none else none"
        " }}"
    )


@dataclass(frozen=True)
class Entity:
    """One Home Assistant entity built from a metrics field."""

    component: str
    object_id: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)


def _sensor(
    object_id: str,
    name: str,
    path: str,
    unit: str | None,
    *,
    scale: float | None = None,
    digits: int = 3,
    **extra: Any,
) -> Entity:
    config: dict[str, Any] = {
        "value_template": value_template(path, scale=scale, digits=digits),
        "state_class": "measurement",
    }
    if unit:
        config["unit_of_measurement"] = unit
    config.update(extra)
    return Entity("sensor", object_id, name, config)


ENTITIES: tuple[Entity, ...] = (
    _sensor(
        "updates_applied",
        "Updates applied",
        "applied",
        None,
        digits=0,
        state_class="total_increasing",
        icon="mdi:counter",
    ),
    _sensor(
        "probe_accuracy", "Probe accuracy", "probe_accuracy", "%", scale=100, digits=1
    ),
    _sensor(
        "train_p50", "Train step p50", "train_ms.p50", "ms", device_class="duration"
    ),
    _sensor(
        "train_p95", "Train step p95", "train_ms.p95", "ms", device_class="duration"
    ),
    _sensor(
        "end_to_end_p50",
        "End-to-end p50",
        "end_to_end_ms.p50",
        "ms",
        device_class="duration",
    ),
    _sensor(
        "end_to_end_p95",
        "End-to-end p95",
        "end_to_end_ms.p95",
        "ms",
        device_class="duration",
    ),
    # Home Assistant's energy device class requires a total state class, and
    # energy per update is a measurement, so it has no device class.
    _sensor(
        "energy_per_update",
        "Energy per update",
        "energy.joules_per_update",
        "J",
        digits=6,
    ),
    _sensor(
        "average_power",
        "Power while adapting",
        "energy.average_power_w",
        "W",
        device_class="power",
    ),
    _sensor(
        "battery_per_1000_updates",
        "Battery per 1,000 updates",
        "energy.battery.percent_per_1000_updates",
        "%",
        digits=4,
    ),
    _sensor(
        "battery_per_hour",
        "Battery per hour",
        "energy.battery.percent_per_hour",
        "%/h",
        digits=4,
    ),
    Entity(
        "sensor",
        "energy_source",
        "Energy source",
        {
            "value_template": (
                "{{ value_json.energy.source if value_json.energy is defined "
                "and value_json.energy.source else 'none' }}"
            ),
            "entity_category": "diagnostic",
            "icon": "mdi:meter-electric",
        },
    ),
    Entity(
        "binary_sensor",
        "training_active",
        "Training active",
        {
            "value_template": (
                "{{ 'OFF' if value_json.training is defined "
                "and value_json.training.paused else 'ON' }}"
            ),
            "payload_on": "ON",
            "payload_off": "OFF",
            "device_class": "running",
            "json_attributes_template": (
                "{{ {'pause_reason': value_json.training.reason "
                "if value_json.training is defined else none} | tojson }}"
            ),
        },
    ),
)


def node_id(device_id: str) -> str:
    """Return the device id as a node id that Home Assistant accepts.

    An id of letters, digits, ``_`` and ``-`` is used as it is. In any other
    id the other characters are replaced by ``_`` and 8 hex digits of the id's
    SHA-256 are added, so ``cam.1`` and ``cam_1`` get different nodes.
    """
    safe = _UNSAFE_ID_CHARS.sub("_", device_id)
    if safe == device_id:
        return device_id
    digest = hashlib.sha256(device_id.encode()).hexdigest()[:8]
    return f"{safe}_{digest}"


def discovery_messages(
    device_id: str,
    topics: Topics,
    *,
    prefix: str = DISCOVERY_PREFIX,
    model: str = "dslo-edge device",
) -> list[tuple[str, str]]:
    """Return (topic, JSON payload) discovery messages for one device.

    Args:
        device_id: the device id from its config.
        topics: the device's topics, for the metrics and status topic names.
        prefix: Home Assistant's discovery prefix.
        model: shown as the device model, for example a firmware profile title.
    """
    node = node_id(device_id)
    device = {
        "identifiers": [f"dslo_edge_{node}"],
        "name": f"dslo-edge {device_id}",
        "manufacturer": "dslo-edge",
        "model": model,
        "sw_version": __version__,
    }
    messages = []
    for entity in ENTITIES:
        payload: dict[str, Any] = {
            "name": entity.name,
            "unique_id": f"dslo_edge_{node}_{entity.object_id}",
            "state_topic": topics.metrics,
            "availability_topic": topics.status,
            "payload_available": STATUS_ONLINE,
            "payload_not_available": STATUS_OFFLINE,
            "device": device,
            "origin": {"name": "dslo-edge", "sw_version": __version__},
            **entity.config,
        }
        if "json_attributes_template" in payload:
            payload["json_attributes_topic"] = topics.metrics
        topic = f"{prefix}/{entity.component}/{node}/{entity.object_id}/config"
        messages.append((topic, json.dumps(payload, sort_keys=True)))
    return messages


def removal_messages(
    device_id: str, *, prefix: str = DISCOVERY_PREFIX
) -> list[tuple[str, str]]:
    """Return the empty retained payloads that remove the device's entities."""
    node = node_id(device_id)
    return [
        (f"{prefix}/{entity.component}/{node}/{entity.object_id}/config", "")
        for entity in ENTITIES
    ]


def publish_discovery(client: Any, messages: list[tuple[str, str]]) -> list[Any]:
    """Publish messages retained at QoS 1 with a paho client; return the infos."""
    return [
        client.publish(topic, payload, qos=1, retain=True)
        for topic, payload in messages
    ]
