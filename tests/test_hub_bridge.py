"""A device on broker A served by a hub worker on broker B, bridged by mosquitto.

Broker A bridges to B with ``bridge_protocol_version mqttv50``, which
mosquitto 2.0.11 needs to carry the response topic, correlation data and
user properties across. Requests go out to B, labels and the retained
teacher announcement come back in to A.
"""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest

from dslo_edge.broker import Broker
from dslo_edge.bundle import load_bundle
from dslo_edge.label_requests import RequestSettings
from tests.hub_fleet import (
    HubWatcher,
    SimulatedDevice,
    drain_inbox,
    start_worker,
    wait_online,
    write_hub_config,
)

BRIDGE_CONFIG = """listener {{port}} 127.0.0.1
allow_anonymous true
connection to-hub
address 127.0.0.1:{hub_port}
bridge_protocol_version mqttv50
cleansession false
restart_timeout 1
topic dslo/+/requests out 1
topic dslo/+/labels in 1
topic dslo/_hub/# in 1
"""


@pytest.fixture
def bridged(tmp_path):
    try:
        hub_side = Broker.start(kind="mosquitto", workdir=tmp_path / "broker-b")
    except Exception as error:  # noqa: BLE001 - a missing broker skips
        pytest.skip(f"mosquitto is not available: {error}")
    device_side = Broker.start(
        kind="mosquitto",
        workdir=tmp_path / "broker-a",
        config_text=BRIDGE_CONFIG.format(hub_port=hub_side.port),
    )
    yield device_side, hub_side
    device_side.stop()
    hub_side.stop()


def test_device_on_a_served_by_hub_on_b(mlp_pair, bridged, tmp_path) -> None:
    device_side, hub_side = bridged
    config = write_hub_config(tmp_path / "hub", hub_side.port, mlp_pair.bundle)
    hub_watcher = HubWatcher(hub_side.port)
    worker = start_worker(config, "w1", tmp_path / "w1.log")
    device_watcher = HubWatcher(device_side.port)
    inbox: queue.Queue = queue.Queue()
    device = None
    try:
        wait_online(hub_watcher, ["w1"])
        # The retained announcement crossing the bridge shows it is up.
        device_watcher.wait_for(lambda w: w.teacher is not None)
        device = SimulatedDevice(
            0,
            load_bundle(mlp_pair.bundle),
            device_side.port,
            inbox,
            RequestSettings(timeout_s=5.0),
        )
        time.sleep(0.5)
        before = device.student.get_weights()
        device.step()
        deadline = time.monotonic() + 20
        while not device.tally.applied and time.monotonic() < deadline:
            drain_inbox(inbox, timeout=0.2)
            device.step()
        counters = device.requester.counters
        assert counters.answered >= 1
        assert list(device.tally.applied.values()) == [1] * len(device.tally.applied)
        assert device_watcher.teacher["round"] == 1
        after = device.student.get_weights()
        assert any(not np.array_equal(before[k], after[k]) for k in before)
    finally:
        if device is not None:
            device.close()
        worker.terminate()
        worker.wait(timeout=30)
        hub_watcher.close()
        device_watcher.close()
