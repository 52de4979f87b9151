"""The hub worker's watchdog: the stall decision, beats between teacher calls,
and a worker whose push hangs.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.hub_teacher import LABEL_CHUNK_SAMPLES, predict_in_chunks
from dslo_edge.hub_worker_lock import lock_if_stopped
from dslo_edge.label_protocol import LabelRequest, encode_request, request_properties
from dslo_edge.protocol import decode_update
from dslo_edge.systemd import EXIT_WATCHDOG
from dslo_edge.watchdog import Heartbeat, WatchedThread, thread_problem
from tests.hub_fleet import (
    REPO_ROOT,
    HubWatcher,
    subscribed_client,
    wait_online,
    write_hub_config,
)

# Seconds to wait for READY=1 from a worker subprocess, which loads its
# teacher and checks the push data first.
STARTUP_TIMEOUT_S = 60


def alive() -> bool:
    return True


def dead() -> bool:
    return False


# The hub setting that gives the stall limit, named in the message.
LIMIT = "hub.watchdog_stall_s"


def test_stall_decision_names_stalled_thread() -> None:
    batcher = Heartbeat(at=100.0)
    pushes = Heartbeat(at=50.0)
    watched = [
        WatchedThread("batcher", alive, batcher),
        WatchedThread("MQTT connection", alive),
        WatchedThread("push scheduler", alive, pushes),
    ]

    # At 102 the push scheduler's beat is 52 s old.
    assert thread_problem(watched, now=102.0, stall_s=60.0) is None
    assert thread_problem(watched, now=110.0, stall_s=60.0) is None
    assert thread_problem(watched, now=110.5, stall_s=60.0, limit_name=LIMIT) == (
        "the push scheduler thread made no progress for 60 s, more than "
        "hub.watchdog_stall_s = 60"
    )
    # Both are stalled, and the batcher comes first.
    assert thread_problem(watched, now=401.0, stall_s=300.0, limit_name=LIMIT) == (
        "the batcher thread made no progress for 301 s, more than "
        "hub.watchdog_stall_s = 300"
    )


def test_stall_decision_fresh_beat_clears_it() -> None:
    heartbeat = Heartbeat(at=time.monotonic() - 10.0)
    watched = [WatchedThread("push scheduler", alive, heartbeat)]
    assert thread_problem(watched, time.monotonic(), stall_s=5.0) is not None

    heartbeat.beat()

    assert thread_problem(watched, time.monotonic(), stall_s=5.0) is None


def test_stall_decision_names_dead_thread() -> None:
    watched = [
        WatchedThread("batcher", alive, Heartbeat(at=0.0)),
        WatchedThread("MQTT connection", dead),
    ]
    # A dead thread is named even when its beat is fresh.
    fresh = [WatchedThread("push scheduler", dead, Heartbeat(at=10.0))]

    assert thread_problem(watched[1:], now=1.0, stall_s=5.0) == (
        "the MQTT connection thread died"
    )
    assert thread_problem(fresh, now=10.0, stall_s=5.0) == (
        "the push scheduler thread died"
    )
    # The first problem in the order given wins.
    assert thread_problem(watched, now=100.0, stall_s=5.0) == (
        "the batcher thread made no progress for 100 s, more than 5 s"
    )


def test_chunked_labels_match_one_call() -> None:
    x = np.arange((2 * LABEL_CHUNK_SAMPLES + 7) * 3, dtype=np.float32).reshape(-1, 3)
    calls: list[int] = []
    beats: list[float] = []

    class Progress(Heartbeat):
        def beat(self) -> None:
            beats.append(time.monotonic())

    def predict(rows: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(rows))
        return {"a": rows * 2, "b": rows[:, :1]}

    outputs = predict_in_chunks(predict, x, Progress())

    assert calls == [LABEL_CHUNK_SAMPLES, LABEL_CHUNK_SAMPLES, 7]
    assert len(beats) == 3
    np.testing.assert_array_equal(outputs["a"], x * 2)
    np.testing.assert_array_equal(outputs["b"], x[:, :1])


def test_request_batch_labelled_in_chunks(mlp_pair, mosquitto, tmp_path) -> None:
    # The request is larger than a chunk, so the batcher must beat between
    # chunks as a push does. Otherwise a slow teacher on a full batch trips
    # the watchdog.
    count = 2 * LABEL_CHUNK_SAMPLES + 9
    extra = {"requests": f"max_samples = {count}"}
    config = write_hub_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle, extra)
    worker = HubWorker(load_hub_config(config, "w1"))
    calls: list[int] = []
    beats_after: list[int] = []
    predict = worker.teacher.predict

    def recorded_predict(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return predict(x)

    class Progress(Heartbeat):
        def beat(self) -> None:
            super().beat()
            beats_after.append(len(calls))

    worker.teacher.predict = recorded_predict  # type: ignore[method-assign]
    worker.labeller.progress = Progress()
    inputs = np.random.default_rng(0).random((count, 64), dtype=np.float32)
    ids = [f"s{i}" for i in range(count)]
    request = LabelRequest(b"c" * 16, time.time(), ids, inputs)
    client, received = subscribed_client(mosquitto.port, "dslo/kitchen/labels")
    watcher = HubWatcher(mosquitto.port)
    try:
        worker.start()
        wait_online(watcher, ["w1"])
        client.publish(
            "dslo/kitchen/requests",
            encode_request(request),
            qos=1,
            properties=request_properties("dslo/kitchen/labels", request.request_id),
        )
        reply = received.get(timeout=20)
        counters = worker.counters
    finally:
        watcher.close()
        worker.stop()
        client.disconnect()
        client.loop_stop()

    update = decode_update(reply.payload)
    assert update.sample_ids == ids
    assert update.labels.shape == (count, 10)
    np.testing.assert_allclose(update.labels, predict(inputs), rtol=1e-6, atol=1e-7)
    assert calls == [LABEL_CHUNK_SAMPLES, LABEL_CHUNK_SAMPLES, 9]
    for done in (1, 2, 3):
        assert done in beats_after
    assert counters["teacher_calls"] == 3
    assert counters["labelled_samples"] == count


def start_hub(config: Path, log: Path, notify: str) -> subprocess.Popen:
    """Start ``dslo-edge hub`` as worker w1, pinging ``notify`` every second."""
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify,
        "WATCHDOG_USEC": "2000000",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
        ),
    }
    with log.open("wb") as stream:
        return subprocess.Popen(
            [sys.executable, "-m", "dslo_edge.cli", "hub", "--config", str(config)]
            + ["--worker-id", "w1"],
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
        )


def write_push_config(folder: Path, port: int, teacher: Path) -> Path:
    """Write a config with a 2 s stall limit and a 2000-update push every 1 s."""
    folder.mkdir(parents=True)
    x = np.random.default_rng(0).random((2000, 64), dtype=np.float32)
    np.savez(folder / "data.npz", x=x)
    config = write_hub_config(folder, port, teacher, {"hub": "watchdog_stall_s = 2"})
    push = (
        '\n[[push]]\nname = "steady"\ndevices = ["kitchen"]\ndata = "data.npz"\n'
        "every_s = 1\nbatch_size = 1\n"
    )
    config.write_text(config.read_text() + push)
    return config


def test_hung_push_ends_worker(mlp_pair, mosquitto, tmp_path) -> None:
    config = write_push_config(tmp_path / "hub", mosquitto.port, mlp_pair.bundle)
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    device, updates = subscribed_client(mosquitto.port, "dslo/kitchen/updates")
    log = tmp_path / "worker.log"
    worker = start_hub(config, log, address)
    broker_pid = mosquitto.pid
    assert broker_pid is not None
    messages = []
    stopped_at = None
    try:
        sock.settimeout(STARTUP_TIMEOUT_S)
        messages.append(sock.recv(256).decode())
        sock.settimeout(10)
        while len(messages) < 4:
            messages.append(sock.recv(256).decode())
        # An update that arrives now shows a push run in progress.
        while not updates.empty():
            updates.get_nowait()
        updates.get(timeout=10)
        os.kill(broker_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        worker.wait(30)
        ended_after = time.monotonic() - stopped_at
    finally:
        if stopped_at is not None:
            os.kill(broker_pid, signal.SIGCONT)
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
        sock.close()
        device.disconnect()
        device.loop_stop()

    text = log.read_text()
    assert messages == ["READY=1", "WATCHDOG=1", "WATCHDOG=1", "WATCHDOG=1"]
    assert worker.returncode == EXIT_WATCHDOG, text
    critical = [line for line in text.splitlines() if " CRITICAL " in line]
    assert len(critical) == 1, text
    assert re.search(
        r"Hub worker w1 watchdog: the push scheduler thread made no progress for "
        r"[23] s, more than hub\.watchdog_stall_s = 2; exiting with status 70",
        critical[0],
    ), critical[0]
    # The stall limit plus up to two checks a second apart, with slack for a
    # busy machine.
    assert ended_after < 15
    # The exit released the worker id's lock, so other workers take its runs.
    with lock_if_stopped(tmp_path / "hub" / "state.sqlite", "w1") as free:
        assert free
