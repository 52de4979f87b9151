"""MQTT figures of ``dslo-edge bench``: the daemon against two plain clients.

Both sides receive the same payloads from the same publisher through the
same broker on 127.0.0.1, and both receivers run in their own process:

- the reference receiver is a plain paho subscriber, this module's entry
  point ``python -m dslo_edge.bench_mqtt``. It counts messages and reads
  the publish time from each payload header, nothing else;
- the device is ``dslo-edge run``, which decodes, trains and checkpoints.

Throughput is samples per second from the first publish to the last message
received (reference) or processed (daemon). Latency runs at light load: one
message every ``gap_s``, each stamped with the wall-clock time just before
it is published.
"""

from __future__ import annotations

import argparse
import json
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from dslo_edge.bench_local import digits_inputs, make_update
from dslo_edge.bench_process import cpu_us_per_message, thread_cpu_s
from dslo_edge.config import render_config
from dslo_edge.errors import BrokerError, DsloError
from dslo_edge.hub import HubClient
from dslo_edge.protocol import Topics, encode_update

DEVICE_ID = "bench-device"
REFERENCE_TOPIC = "bench/reference"
# Header offsets of the message id and of the publish time, a little-endian
# f64 after the teacher round (docs/protocol.md).
MESSAGE_ID_OFFSET = 6
TIMESTAMP_OFFSET = 26
_TIMESTAMP = struct.Struct("<d")
# Client-side window of unacknowledged QoS 1 publishes. The default mosquitto
# configuration in dslo_edge.broker allows 100 per client.
PUBLISH_WINDOW = 100
WAIT_S = 120.0


def make_payloads(count: int, samples: int, first_round: int = 1) -> list[bytes]:
    """Encode ``count`` digits updates of ``samples`` rows with unique ids."""
    inputs, _ = digits_inputs()
    return [
        encode_update(make_update(inputs, index * samples, samples, first_round))
        for index in range(count)
    ]


def with_new_ids(payloads: list[bytes]) -> list[bytes]:
    """Return copies with fresh message ids, so the daemon applies them again."""
    renamed = []
    for payload in payloads:
        copy = bytearray(payload)
        copy[MESSAGE_ID_OFFSET : MESSAGE_ID_OFFSET + 16] = uuid.uuid4().bytes
        renamed.append(bytes(copy))
    return renamed


def stamp(payload: bytes) -> bytes:
    """Return the payload with its header timestamp set to now."""
    stamped = bytearray(payload)
    _TIMESTAMP.pack_into(stamped, TIMESTAMP_OFFSET, time.time())
    return bytes(stamped)


class Publisher:
    """A plain paho client that publishes payloads at QoS 1 on one topic."""

    def __init__(self, host: str, port: int, topic: str):
        self.topic = topic
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"dslo-bench-pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.max_inflight_messages_set(PUBLISH_WINDOW)
        self.client.max_queued_messages_set(0)
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def publish_all(self, payloads: list[bytes]) -> float:
        """Publish every payload without waiting; return the start wall time.

        paho sends up to ``PUBLISH_WINDOW`` at once and the rest as PUBACKs
        arrive. This returns once the broker has acknowledged the last one.
        """
        started = time.time()
        infos = [self.client.publish(self.topic, p, qos=1) for p in payloads]
        infos[-1].wait_for_publish(timeout=WAIT_S)
        return started

    def publish_paced(self, payloads: list[bytes], gap_s: float) -> None:
        """Publish one stamped payload every ``gap_s`` seconds."""
        next_at = time.monotonic()
        for payload in payloads:
            info = self.client.publish(self.topic, stamp(payload), qos=1)
            info.wait_for_publish(timeout=WAIT_S)
            next_at += gap_s
            time.sleep(max(0.0, next_at - time.monotonic()))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- Reference receiver -------------------------------------------------------


def _receive(host: str, port: int, topic: str, count: int) -> dict[str, Any]:
    """Subscribe, print "ready", receive ``count`` messages, return figures."""
    received_at: list[float] = []
    latency_ms: list[float] = []
    done = threading.Event()

    def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        sent = _TIMESTAMP.unpack_from(message.payload, TIMESTAMP_OFFSET)[0]
        received_at.append(now)
        latency_ms.append((now - sent) * 1000)
        if len(received_at) >= count:
            done.set()

    def on_subscribe(*_args: Any) -> None:
        print("ready", flush=True)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    finished = done.wait(WAIT_S)
    client.disconnect()
    client.loop_stop()
    return {
        "received": len(received_at),
        "complete": finished,
        "last_received": received_at[-1] if received_at else None,
        "latency_ms": _percentiles(latency_ms),
    }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


class ReferenceReceiver:
    """The plain subscriber child process for one run of ``count`` messages."""

    def __init__(self, host: str, port: int, count: int):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dslo_edge.bench_mqtt"]
            + ["--host", host, "--port", str(port), "--count", str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.process.kill()
            raise BrokerError(
                f"the reference subscriber failed to subscribe: it printed {line!r}"
            )

    def result(self) -> dict[str, Any]:
        """Wait for the child and return its figures."""
        output, _ = self.process.communicate(timeout=WAIT_S + 10)
        figures = json.loads(output.strip().splitlines()[-1])
        if not figures["complete"]:
            raise BrokerError(
                f"the reference subscriber timed out after {figures['received']} "
                "messages; see the broker log in the bench folder"
            )
        return dict(figures)


def reference_throughput(host: str, port: int, payloads: list[bytes]) -> float:
    """Return samples per second between the publisher and a plain subscriber."""
    receiver = ReferenceReceiver(host, port, len(payloads))
    publisher = Publisher(host, port, REFERENCE_TOPIC)
    try:
        started = publisher.publish_all(payloads)
    finally:
        publisher.close()
    figures = receiver.result()
    return _samples(payloads) / (figures["last_received"] - started)


def reference_latency(
    host: str, port: int, payloads: list[bytes], gap_s: float
) -> dict[str, float | None]:
    """Return p50 and p99 publish-to-receive latency in ms at light load."""
    receiver = ReferenceReceiver(host, port, len(payloads))
    publisher = Publisher(host, port, REFERENCE_TOPIC)
    try:
        publisher.publish_paced(payloads, gap_s)
    finally:
        publisher.close()
    return dict(receiver.result()["latency_ms"])


def _samples(payloads: list[bytes]) -> int:
    # The sample count is the u32 after the timestamp.
    return sum(struct.unpack_from("<I", p, TIMESTAMP_OFFSET + 8)[0] for p in payloads)


# --- The daemon -----------------------------------------------------------------


@dataclass
class DaemonProcess:
    """``dslo-edge run`` in a child process, with a hub following its metrics."""

    process: subprocess.Popen[bytes]
    hub: HubClient
    publisher: Publisher
    processed: int = 0
    # CPU us per message of each daemon thread, busiest first, per throughput run.
    thread_cpu: list[list[float] | None] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        work: Path,
        bundle: Path,
        host: str,
        port: int,
        overrides: dict[str, dict[str, Any]] | None = None,
        device_id: str = DEVICE_ID,
    ) -> DaemonProcess:
        """Write a device config and start the daemon.

        The defaults train one step per update. ``overrides`` changes
        settings, such as ``{"training": {"batch_size": 256}}`` to coalesce
        queued updates into larger steps. A second daemon on the same broker
        needs another ``device_id``, because the first one's retained metrics
        stay on the broker.
        """
        config = work / "device.toml"
        state = (work / "state").resolve()
        config.write_text(
            render_config(device_id, bundle.resolve(), state, port, overrides=overrides)
        )
        log = open(work / "daemon.log", "ab")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(
            [sys.executable, "-m", "dslo_edge.cli", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            hub = HubClient(host, port, device_id)
            hub.wait_for_metrics(lambda m: "processed" in m, WAIT_S)
        except DsloError:
            process.kill()
            raise
        updates = Topics.for_device(device_id).updates
        daemon = cls(process, hub, Publisher(host, port, updates))
        daemon.processed = int(hub.latest_metrics["processed"])  # type: ignore[index]
        return daemon

    def _wait_processed(self, count: int) -> dict[str, Any]:
        target = self.processed + count
        metrics = self.hub.wait_for_metrics(
            lambda m: m.get("processed", 0) >= target, WAIT_S
        )
        self.processed = int(metrics["processed"])
        return metrics

    def throughput(self, payloads: list[bytes]) -> float:
        """Return samples per second from the first publish to the last applied.

        Also appends the daemon threads' CPU time per message to ``thread_cpu``.
        """
        cpu_before = thread_cpu_s(self.process.pid)
        started = self.publisher.publish_all(payloads)
        metrics = self._wait_processed(len(payloads))
        cpu_after = thread_cpu_s(self.process.pid)
        self.thread_cpu.append(cpu_us_per_message(cpu_before, cpu_after, len(payloads)))
        # The report comes after the burst's end, which waits at least 10 ms
        # and saves checkpoints, so its timestamp is later than the last update.
        return _samples(payloads) / (float(metrics["last_processed_at"]) - started)

    def latency(self, payloads: list[bytes], gap_s: float) -> dict[str, Any]:
        """Publish at light load and return the daemon's latency percentiles.

        Returns the end-to-end percentiles, under ``train_step_ms`` those of
        the train step at this load, and under ``stage_ms`` those of the
        daemon's stages before it. The daemon reports percentiles over its
        recent updates, so call this first on a fresh daemon.
        """
        self.publisher.publish_paced(payloads, gap_s)
        metrics = self._wait_processed(len(payloads))
        latency = dict(metrics["end_to_end_ms"])
        latency["train_step_ms"] = {
            key: value
            for key, value in metrics["train_ms"].items()
            if key != "histogram"
        }
        latency["stage_ms"] = metrics.get("stage_ms", {})
        return latency

    def metrics(self) -> dict[str, Any]:
        return dict(self.hub.latest_metrics or {})

    def stop(self) -> int:
        """Stop the daemon with SIGTERM and return its exit code."""
        self.publisher.close()
        self.hub.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise DsloError("the daemon did not stop within 60 s of SIGTERM") from None


def main(argv: list[str] | None = None) -> int:
    """Run the reference subscriber; ``ReferenceReceiver`` starts it."""
    parser = argparse.ArgumentParser(prog="python -m dslo_edge.bench_mqtt")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    figures = _receive(args.host, args.port, REFERENCE_TOPIC, args.count)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
