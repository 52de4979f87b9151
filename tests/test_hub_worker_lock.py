"""One hub worker per worker id and state file, locked with flock."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dslo_edge.errors import ConfigError
from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_service import HubWorker
from dslo_edge.hub_worker_lock import (
    LOCK_WAIT_S,
    WorkerLock,
    lock_if_stopped,
    lock_path,
)
from tests.hub_fleet import HubWatcher, start_worker, wait_online, write_hub_config


def in_use_message(folder: Path, worker_id: str, pid: int) -> str:
    """Return the error for a worker id that process ``pid`` holds."""
    state_file = folder / "state.sqlite"
    lock = folder / f"state.sqlite.worker-{worker_id}.lock"
    return (
        f"worker id {worker_id!r} is in use by another hub worker with "
        f"hub.state_file {state_file} (pid {pid}, worker {worker_id}, holding "
        f"{lock}); stop that worker, or start this one with its own --worker-id"
    )


def test_second_worker_with_same_id_fails(mlp_pair, tmp_path) -> None:
    folder = tmp_path / "hub"
    config = load_hub_config(write_hub_config(folder, 1883, mlp_pair.bundle), "w1")
    first = HubWorker(config)
    try:
        with pytest.raises(ConfigError) as caught:
            HubWorker(config)
        other_id = HubWorker(load_hub_config(folder / "hub.toml", "w2"))
    finally:
        first.state.close()
        first._lock.release()
    other_id.state.close()
    other_id._lock.release()
    # Once the first worker lets go, a worker with its id starts.
    again = HubWorker(config)
    again.state.close()
    again._lock.release()

    assert str(caught.value) == in_use_message(folder, "w1", os.getpid())


def test_duplicate_worker_process_exits_78(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    path = write_hub_config(folder, mosquitto.port, mlp_pair.bundle)
    holder = HubWorker(load_hub_config(path, "w1"))
    log = tmp_path / "second.log"
    try:
        second = start_worker(path, "w1", log)
        try:
            status = second.wait(timeout=60)
        finally:
            if second.poll() is None:
                second.kill()
                second.wait(timeout=10)
    finally:
        holder.state.close()
        holder._lock.release()

    assert status == 78
    lines = log.read_text().splitlines()
    assert lines[-1] == f"error: {path}: " + in_use_message(folder, "w1", os.getpid())


def test_lock_free_after_sigkill(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    path = write_hub_config(folder, mosquitto.port, mlp_pair.bundle)
    watcher = HubWatcher(mosquitto.port)
    crashed = start_worker(path, "w1", tmp_path / "crashed.log")
    try:
        wait_online(watcher, ["w1"])
        crashed_owner = (folder / "state.sqlite.worker-w1.lock").read_text()
        crashed.send_signal(signal.SIGKILL)
        crashed.wait(timeout=10)
    finally:
        if crashed.poll() is None:
            crashed.kill()
            crashed.wait(timeout=10)
        watcher.close()

    # As systemd's Restart= does: the same id starts right after the crash.
    restarted = HubWorker(load_hub_config(path, "w1"))
    restarted_owner = (folder / "state.sqlite.worker-w1.lock").read_text()
    restarted.state.close()
    restarted._lock.release()

    assert crashed_owner == f"pid {crashed.pid}, worker w1\n"
    assert restarted_owner == f"pid {os.getpid()}, worker w1\n"


def test_lock_free_after_holder_exits(tmp_path) -> None:
    state_file = tmp_path / "state.sqlite"
    code = (
        "import os; from pathlib import Path; "
        "from dslo_edge.hub_worker_lock import WorkerLock; "
        f"WorkerLock(Path({str(state_file)!r}), 'w1'); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

    lock = WorkerLock(state_file, "w1")
    lock.release()

    assert lock.path == tmp_path / "state.sqlite.worker-w1.lock"


def test_long_worker_id_gets_hashed_name(tmp_path) -> None:
    worker_id = "w" * 300

    path = lock_path(tmp_path / "state.sqlite", worker_id)
    lock = WorkerLock(tmp_path / "state.sqlite", worker_id)
    lock.release()

    assert path.parent == tmp_path
    assert path.name.startswith("state.sqlite.worker-sha256-")
    assert len(path.name) == len("state.sqlite.worker-sha256-") + 32 + len(".lock")
    assert path.read_text() == f"pid {os.getpid()}, worker {worker_id}\n"


def test_unwritable_lock_file_is_named(tmp_path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can open a file without write permission")
    path = tmp_path / "state.sqlite.worker-w1.lock"
    path.write_text("")
    path.chmod(0o444)

    with pytest.raises(ConfigError) as caught:
        WorkerLock(tmp_path / "state.sqlite", "w1")

    assert str(caught.value) == (
        f"cannot open the lock file {path} of worker id 'w1': Permission denied; "
        "give this worker's user write access to the directory of "
        "hub.state_file and to the file"
    )


def test_lock_path_that_is_a_directory(tmp_path) -> None:
    path = tmp_path / "state.sqlite.worker-w1.lock"
    path.mkdir()

    with pytest.raises(ConfigError) as caught:
        WorkerLock(tmp_path / "state.sqlite", "w1")

    assert str(caught.value) == (
        f"{path} is a directory, expected the lock file of worker id 'w1'; "
        "move it out of the directory of hub.state_file"
    )
    assert path.is_dir()


def test_worker_lock_waits_for_brief_holder(tmp_path) -> None:
    state_file = tmp_path / "state.sqlite"
    # Another worker's check whether w1 runs holds w1's lock for 0.5 s.
    descriptor = os.open(lock_path(state_file, "w1"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    releaser = threading.Timer(0.5, os.close, (descriptor,))
    releaser.start()
    started = time.monotonic()
    try:
        lock = WorkerLock(state_file, "w1")
    finally:
        releaser.join()
    waited = time.monotonic() - started
    lock.release()

    assert 0.4 < waited < LOCK_WAIT_S


def test_lock_if_stopped_sees_running_worker(tmp_path) -> None:
    state_file = tmp_path / "state.sqlite"
    with lock_if_stopped(state_file, "w1") as missing_stopped:
        created = lock_path(state_file, "w1").exists()
    running = WorkerLock(state_file, "w1")
    try:
        with lock_if_stopped(state_file, "w1") as running_stopped:
            pass
    finally:
        running.release()
    with lock_if_stopped(state_file, "w1") as released_stopped:
        # The block holds the lock, so a worker with the id cannot start.
        with pytest.raises(ConfigError):
            WorkerLock(state_file, "w1")

    assert missing_stopped is True
    assert created is False
    assert running_stopped is False
    assert released_stopped is True
