"""A fleet of 200 simulated devices served by two hub workers on mosquitto.

One worker is frozen (SIGSTOP) mid-run so requests pile up unacknowledged
in its session, then killed (SIGKILL). The other worker must take over the
dead session and serve them. The devices' resend timeout is longer than the
test needs, so the assertions show that the broker redelivered the requests
to the surviving worker, not that the devices resent them.
"""

from __future__ import annotations

import os
import queue
import signal
import statistics
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

DEVICES = 200
RUN_S = 12.0
STEP_S = 0.5
RATE_PER_S = 1.0
BURST = 2
# Longer than the run, so only the broker's redelivery can serve the
# requests of the killed worker.
RESEND_AFTER_S = 60.0

pytestmark = pytest.mark.slow


@pytest.fixture
def mosquitto(tmp_path):
    if os.environ.get("DSLO_TEST_BROKER") == "amqtt":
        pytest.skip("the fleet test needs mosquitto's shared subscriptions")
    try:
        broker = Broker.start(kind="mosquitto", workdir=tmp_path / "broker")
    except Exception as error:  # noqa: BLE001 - a missing broker skips
        pytest.skip(f"mosquitto is not available: {error}")
    yield broker
    broker.stop()


def test_fleet_served_exactly_once(mlp_pair, mosquitto, tmp_path) -> None:
    config = write_hub_config(
        tmp_path / "hub",
        mosquitto.port,
        mlp_pair.bundle,
        {"rate_limit": "", "requests": "batch_max_samples = 2048"},
    )
    watcher = HubWatcher(mosquitto.port)
    workers = {
        name: start_worker(config, name, tmp_path / f"{name}.log")
        for name in ("w1", "w2")
    }
    devices: list[SimulatedDevice] = []
    try:
        wait_online(watcher, list(workers))
        inbox: queue.Queue = queue.Queue()
        bundle = load_bundle(mlp_pair.bundle)
        settings = RequestSettings(timeout_s=RESEND_AFTER_S, max_pending=4)
        devices = [
            SimulatedDevice(i, bundle, mosquitto.port, inbox, settings)
            for i in range(DEVICES)
        ]
        started, stopped = run_fleet(devices, inbox, workers["w1"])
        settled = settle(devices, inbox)
        watcher.wait_for(lambda w: w.metrics.get("w2", {}).get("redelivered", 0) > 0)
        report(devices, started, stopped, watcher)
        check_every_request_served_once(devices)
        check_rate_limits(devices, settled)
        survivor = watcher.metrics["w2"]
        assert survivor["redelivered"] > 0
        assert sum(d.requester.counters.resent for d in devices) == 0
    finally:
        for device in devices:
            device.close()
        for process in workers.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
        watcher.close()


def run_fleet(devices, inbox, victim) -> tuple[float, float]:
    """Drive the devices for RUN_S seconds; freeze then kill ``victim`` halfway."""
    started = time.monotonic()
    frozen_at = started + RUN_S / 2
    killed = False
    while time.monotonic() - started < RUN_S:
        step_started = time.monotonic()
        for device in devices:
            device.step()
        drain_inbox(inbox)
        if not killed and time.monotonic() >= frozen_at:
            victim.send_signal(signal.SIGSTOP)
            # Requests sent now pile up unacknowledged in the frozen session.
            for device in devices:
                device.step()
            drain_inbox(inbox, timeout=1.0)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            killed = True
        drain_inbox(inbox, timeout=max(0.0, STEP_S - (time.monotonic() - step_started)))
    return started, time.monotonic()


def settle(devices, inbox, timeout: float = 45.0) -> float:
    """Apply responses until no device has a request pending; return when."""
    deadline = time.monotonic() + timeout
    while any(d.requester.pending for d in devices):
        assert time.monotonic() < deadline, (
            f"{sum(d.requester.pending for d in devices)} requests still pending "
            f"after {timeout} s"
        )
        drain_inbox(inbox, timeout=0.2)
    settled = time.monotonic()
    drain_inbox(inbox, timeout=0.5)
    return settled


def report(devices, started, stopped, watcher) -> None:
    counters = [d.requester.counters for d in devices]
    latencies = np.array([s for c in counters for s in c.latencies_s]) * 1000
    sent = sum(c.sent for c in counters)
    labelled = sum(c.answered for c in counters)
    limited = sum(c.rate_limited for c in counters)
    elapsed = stopped - started
    print(
        f"\nfleet: {len(devices)} devices, 2 hub workers (one killed), "
        f"{elapsed:.1f} s: {sent} requests ({sent / elapsed:.0f} requests/s), "
        f"{labelled} labelled ({labelled / elapsed:.0f}/s), {limited} rate-limited"
    )
    print(
        f"request-to-label latency: p50 {np.percentile(latencies, 50):.1f} ms, "
        f"p99 {np.percentile(latencies, 99):.1f} ms, max {latencies.max():.1f} ms"
    )
    print(f"duplicates dropped on devices: {sum(c.duplicates for c in counters)}")
    for worker, metrics in sorted(watcher.metrics.items()):
        keys = ("requests", "answered", "cached", "redelivered", "teacher_calls")
        summary = ", ".join(f"{key} {metrics[key]}" for key in keys)
        print(f"worker {worker}: {summary}, largest batch {metrics['largest_batch']}")
    per_call = [
        m["labelled_samples"] / max(1, m["teacher_calls"])
        for m in watcher.metrics.values()
    ]
    print(f"samples per teacher call: {statistics.mean(per_call):.0f}")


def check_every_request_served_once(devices) -> None:
    for device in devices:
        counters = device.requester.counters
        resolved = (
            counters.answered
            + counters.rate_limited
            + counters.budget_exhausted
            + counters.rejected
        )
        assert resolved == counters.sent, device.device_id
        assert counters.timed_out == 0, device.device_id
        assert counters.unexpected == 0, device.device_id
        assert not device.tally.rejected, (device.device_id, device.tally.rejected)
        assert sum(device.tally.applied.values()) == counters.answered
        assert set(device.tally.applied.values()) <= {1}, device.device_id


def check_rate_limits(devices, settled) -> None:
    limited = 0
    for device in devices:
        counters = device.requester.counters
        window = settled - device.tally.first_sent
        allowed = BURST + RATE_PER_S * window + 1
        assert counters.answered <= allowed, (device.device_id, counters.answered)
        limited += counters.rate_limited
    assert limited > 0
