"""Acknowledged updates survive SIGKILLs and a corrupt newest checkpoint.

Each test runs the daemon as its own process against mosquitto, kills it
with SIGKILL and reads the checkpoints it left, as the fault suite does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.bundle import load_bundle
from dslo_edge.checkpoint import list_checkpoints, load_latest_checkpoint
from dslo_edge.config import render_config
from dslo_edge.daemon import APPLIED_IDS
from dslo_edge.dropped_ids import DROPPED_IDS_FILE, DROPPED_IDS_RESERVE_FILE
from dslo_edge.errors import BrokerError
from dslo_edge.fault_scenarios import FAST_SETTINGS
from dslo_edge.faults import DEVICE, DaemonProcess, Publisher, make_updates
from dslo_edge.ota import ota_topics, split_archive
from dslo_edge.ota_sender import pack_bundle
from dslo_edge.protocol import (
    SoftLabelUpdate,
    Topics,
    encode_update,
    new_message_id,
)
from dslo_edge.trainer import WEIGHT_PREFIX

TOPICS = Topics.for_device(DEVICE)


def write_device_config(
    folder: Path, bundle: Path, port: int, **training: float
) -> Path:
    overrides = {key: dict(value) for key, value in FAST_SETTINGS.items()}
    overrides["training"].update(training)
    path = folder / "device.toml"
    path.write_text(
        render_config(DEVICE, bundle, folder / "state", port, overrides=overrides)
    )
    return path


def write_rollback_config(folder: Path, bundle: Path, port: int) -> Path:
    """Write a device config that saves after each update and never when idle."""
    return write_device_config(
        folder, bundle, port, checkpoint_every=1, checkpoint_idle_s=600
    )


def encoded_updates(bundle: Path, count: int, seed: int) -> list[bytes]:
    return [
        encode_update(update)
        for update in make_updates(load_bundle(bundle), count, seed=seed)
    ]


def publish_and_wait_saved(hub: Publisher, updates: list[bytes]) -> dict:
    """Publish the updates one at a time, waiting until the daemon saved each.

    Returns the metrics that show the last update applied and saved.
    """
    metrics: dict = {}
    for total, update in enumerate(updates, start=1):
        hub.publish([update])
        metrics = hub.wait(
            lambda m, total=total: m.get("applied_total") == total and m["unsaved"] == 0
        )
    return metrics


def wait_or_last_metrics(hub: Publisher, condition: Callable[[dict], bool]) -> dict:
    """Wait 10 s for metrics that meet the condition, else return the last ones."""
    try:
        return hub.wait(condition, timeout=10)
    except BrokerError:
        return dict(hub.metrics or {})


def applied_ids(checkpoint) -> set[bytes]:
    return {bytes(row) for row in checkpoint.tensors[APPLIED_IDS]}


def corrupt_newest(folder: Path) -> str:
    _, newest = list_checkpoints(folder)[0]
    data = bytearray(newest.read_bytes())
    data[-64] ^= 0xFF  # inside the tensor data, so the checksum fails
    newest.write_bytes(bytes(data))
    return newest.name


def test_duplicate_ack_waits_for_two_generations(mlp_pair, mosquitto, tmp_path) -> None:
    # No idle save in the first run, so the second update stays in the
    # newest generation only and unacknowledged when the daemon is killed.
    config = write_rollback_config(tmp_path, mlp_pair.bundle, mosquitto.port)
    checkpoints = tmp_path / "state" / "checkpoints"
    first, second, marker = encoded_updates(mlp_pair.bundle, 3, seed=1)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        publish_and_wait_saved(hub, [first, second])
        daemon.kill()
        newest = load_latest_checkpoint(checkpoints)
        assert second[6:22] in applied_ids(newest)

        # The broker delivers the second update again, and the restarted
        # daemon rejects the copy as a duplicate.
        config.write_text(
            config.read_text().replace(
                "checkpoint_idle_s = 600", "checkpoint_idle_s = 0.5"
            )
        )
        daemon.start()
        hub.wait(
            lambda m: (
                m.get("pid") == daemon.pid
                and m["rejected"].get("duplicate") == 1
                and m["unacknowledged"] == 0
            )
        )
        daemon.kill()
        damaged = corrupt_newest(checkpoints)

        daemon.start()
        # Updates arrive in order, so a copy of the second one would come
        # before the marker.
        hub.publish([marker])
        metrics = hub.wait(
            lambda m: (
                m.get("pid") == daemon.pid
                and m["applied"] == 1
                and m["unacknowledged"] == 0
            )
        )
    finally:
        hub.close()
        if daemon.alive():
            daemon.kill()

    restored = load_latest_checkpoint(checkpoints)
    assert damaged not in metrics["restored_from"]
    assert metrics["applied_total"] == 3, daemon.log_text()[-3000:]
    assert second[6:22] in applied_ids(restored)
    assert marker[6:22] in applied_ids(restored)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """Mount a 1 MiB tmpfs for the state directory, skipping without root."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as stream:
        try:
            while True:
                stream.write(b"\0" * 65536)
                stream.flush()
        except OSError:
            pass
    return filler


def test_full_disk_reports_metrics_log_once(mlp_pair, mosquitto, small_disk) -> None:
    folder = small_disk.parent
    config = write_device_config(folder, mlp_pair.bundle, mosquitto.port)
    config.write_text(
        config.read_text().replace(str(folder / "state"), str(small_disk / "state"))
    )
    payloads = [
        encode_update(update)
        for update in make_updates(load_bundle(mlp_pair.bundle), 20, seed=2)
    ]
    daemon = DaemonProcess(config, folder / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        hub.publish(payloads[:10])
        hub.wait(lambda m: m.get("applied_total") == 10 and m["unacknowledged"] == 0)
        filler = fill(small_disk)
        hub.publish(payloads[10:])
        hub.wait(lambda m: m.get("applied_total") == 20 and m["storage_error"])
        # The idle loop tries to save, and logs a report, every 0.2 s.
        time.sleep(3)
        filler.unlink()
        hub.wait(lambda m: m["unacknowledged"] == 0 and m["storage_error"] is None)
    finally:
        hub.close()
        daemon.terminate()
    log = daemon.log_text()

    assert "Logging error" not in log
    assert "Traceback" not in log
    assert log.count(f"cannot write {small_disk / 'state' / 'metrics.jsonl'}") == 1
    assert log.count(f"writing {small_disk / 'state' / 'metrics.jsonl'} again") == 1


def harmful_update() -> bytes:
    """Return an update whose inputs pass the range limit but blow up the weights."""
    rng = np.random.default_rng(300)
    update = SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="t",
        teacher_round=1,
        timestamp=time.time(),
        sample_ids=[f"huge-{i}" for i in range(8)],
        inputs=np.full((8, 64), 9e5, dtype=np.float32),
        labels=rng.dirichlet(np.ones(10), size=8).astype(np.float32),
        label_kind="probabilities",
    )
    return encode_update(update)


def test_rollback_ack_waits_for_two_generations(mlp_pair, mosquitto, tmp_path) -> None:
    config = write_rollback_config(tmp_path, mlp_pair.bundle, mosquitto.port)
    checkpoints = tmp_path / "state" / "checkpoints"
    first, second, marker = encoded_updates(mlp_pair.bundle, 3, seed=3)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        # The second update is in the newest generation only.
        publish_and_wait_saved(hub, [first, second])
        hub.publish([harmful_update()])
        hub.wait(lambda m: m["rollbacks"] == 1 and m["unacknowledged"] == 0)
        # The rollback's save keeps the norm of the restored weights as the
        # baseline, so a second harmful update is caught too.
        hub.publish([harmful_update()])
        hub.wait(lambda m: m["rollbacks"] == 2 and m["unacknowledged"] == 0)
        daemon.kill()
        damaged = corrupt_newest(checkpoints)

        daemon.start()
        hub.publish([marker])
        metrics = hub.wait(
            lambda m: (
                m.get("pid") == daemon.pid and m["applied"] == 1 and m["unsaved"] == 0
            )
        )
    finally:
        hub.close()
        if daemon.alive():
            daemon.kill()

    restored = load_latest_checkpoint(checkpoints)
    assert damaged not in metrics["restored_from"]
    assert metrics["applied_total"] == 3, daemon.log_text()[-3000:]
    assert second[6:22] in applied_ids(restored)
    assert marker[6:22] in applied_ids(restored)


def file_permissions_apply() -> list[str]:
    """Return a command prefix under which file permissions apply, also to root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root ignores file permissions and setpriv is missing")
    return [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


def test_rollback_waits_for_readable_checkpoints(mlp_pair, mosquitto, tmp_path) -> None:
    config = write_device_config(
        tmp_path, mlp_pair.bundle, mosquitto.port, checkpoint_every=1
    )
    checkpoints = tmp_path / "state" / "checkpoints"
    (good,) = (
        encode_update(update)
        for update in make_updates(load_bundle(mlp_pair.bundle), 1, seed=4)
    )
    harmful = harmful_update()
    daemon = DaemonProcess(
        config, tmp_path / "daemon.log", prefix=file_permissions_apply()
    ).start()
    hub = Publisher(mosquitto.port, TOPICS)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        hub.publish([good])
        hub.wait(lambda m: m.get("applied_total") == 1 and m["unacknowledged"] == 0)
        checkpoints.chmod(0)
        hub.publish([harmful])
        waiting = hub.wait(lambda m: m.get("applied_total") == 2 and m["storage_error"])
        # The daemon retries the rollback every second.
        time.sleep(3)
        alive_while_unreadable = daemon.alive()
        checkpoints.chmod(0o755)
        rolled_back = hub.wait(
            lambda m: m["rollbacks"] == 1 and m["unacknowledged"] == 0
        )
    finally:
        checkpoints.chmod(0o755)
        hub.close()
        status = daemon.terminate() if daemon.alive() else daemon.process.returncode
    log = daemon.log_text()

    assert alive_while_unreadable, log[-3000:]
    assert status == 0, log[-3000:]
    assert "Traceback" not in log
    assert waiting["rollbacks"] == 0
    assert waiting["unacknowledged"] == 1
    assert waiting["storage_error"].startswith(
        "rollback waits: the daemon's user may not list the checkpoints folder "
        f"{checkpoints} (permission denied)"
    )
    assert rolled_back["storage_error"] is None
    assert rolled_back["applied_total"] == 1
    assert log.count("cannot roll back") == 1
    restored = load_latest_checkpoint(checkpoints)
    assert good[6:22] in applied_ids(restored)
    assert harmful[6:22] not in applied_ids(restored)


def ota_statuses(port: int) -> tuple[mqtt.Client, list[dict]]:
    """Subscribe to the device's OTA status topic and collect its messages."""
    _, status_topic = ota_topics(TOPICS)
    statuses: list[dict] = []
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda _c, _u, message: statuses.append(
        json.loads(message.payload)
    )
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(status_topic, qos=1)
    assert subscribed.wait(10)
    return client, statuses


def test_ota_transfer_resumes_after_sigkill(mlp_pair, mosquitto, tmp_path) -> None:
    config = write_device_config(tmp_path, mlp_pair.bundle, mosquitto.port)
    chunk_topic, _ = ota_topics(TOPICS)
    transfer = uuid.uuid4().bytes
    chunks = split_archive(pack_bundle(mlp_pair.bundle), 1024, transfer)
    half = len(chunks) // 2
    (update,) = (
        encode_update(u) for u in make_updates(load_bundle(mlp_pair.bundle), 1, 4)
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    watcher, statuses = ota_statuses(mosquitto.port)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        for chunk in chunks[:half]:
            hub.client.publish(chunk_topic, chunk, qos=1).wait_for_publish(30)
        # The trainer handles queued chunks before each update, so once the
        # update is applied the first half is stored and acknowledged.
        hub.publish([update])
        hub.wait(lambda m: m.get("applied_total") == 1)
        daemon.kill()

        daemon.start()
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        for chunk in chunks[half:]:
            hub.client.publish(chunk_topic, chunk, qos=1).wait_for_publish(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not statuses_of(statuses, transfer):
            time.sleep(0.1)
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        hub.close()
        daemon.terminate()

    outcome = statuses_of(statuses, transfer)
    assert outcome, daemon.log_text()[-3000:]
    assert outcome[-1]["state"] == "installed", outcome[-1]
    assert "Resuming model transfer" in daemon.log_text()
    assert list((tmp_path / "state" / "ota").glob(f"{transfer.hex()}.*")) == []


def statuses_of(statuses: list[dict], transfer: bytes) -> list[dict]:
    return [status for status in statuses if status.get("transfer") == transfer.hex()]


def test_rollback_past_corrupt_newest_keeps_update(
    mlp_pair, mosquitto, tmp_path
) -> None:
    # The second update is saved in the newest generation only, which turns
    # unreadable before a harmful update makes the daemon roll back. The
    # rollback restores the generation before it, which lacks the second
    # update, so the broker must deliver that update again.
    config = write_rollback_config(tmp_path, mlp_pair.bundle, mosquitto.port)
    checkpoints = tmp_path / "state" / "checkpoints"
    first, second = encoded_updates(mlp_pair.bundle, 2, seed=5)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        publish_and_wait_saved(hub, [first, second])
        corrupt_newest(checkpoints)
        hub.publish([harmful_update()])
        hub.wait(lambda m: m["rollbacks"] == 1)
        metrics = wait_or_last_metrics(
            hub,
            lambda m: (
                m["connects"] == 2 and m["applied_total"] == 2 and m["unsaved"] == 0
            ),
        )
    finally:
        hub.close()
        daemon.terminate()

    restored = load_latest_checkpoint(checkpoints)
    log = daemon.log_text()
    assert second[6:22] in applied_ids(restored), log[-3000:]
    assert first[6:22] in applied_ids(restored)
    assert metrics["applied_total"] == 2, log[-3000:]
    assert "rolled back to checkpoint-00000001.safetensors" in log
    assert "may lack 1 update saved only in" in log


def test_rollback_past_corrupt_newest_keeps_duplicate(
    mlp_pair, mosquitto, tmp_path
) -> None:
    # After a restart, the copy of the second update is rejected as a
    # duplicate because the restored newest generation contains it. That
    # generation then turns unreadable and a harmful update makes the daemon
    # roll back to the generation before it, which lacks the second update.
    # Acknowledging the copy would then lose the update.
    config = write_rollback_config(tmp_path, mlp_pair.bundle, mosquitto.port)
    checkpoints = tmp_path / "state" / "checkpoints"
    first, second = encoded_updates(mlp_pair.bundle, 2, seed=7)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        publish_and_wait_saved(hub, [first, second])
        daemon.kill()

        daemon.start()
        hub.wait(
            lambda m: (
                m.get("pid") == daemon.pid
                and m["rejected"].get("duplicate") == 1
                and m["unacknowledged"] == 1
            )
        )
        corrupt_newest(checkpoints)
        hub.publish([harmful_update()])
        hub.wait(lambda m: m["rollbacks"] == 1)
        metrics = wait_or_last_metrics(
            hub, lambda m: m["applied_total"] == 2 and m["unacknowledged"] == 0
        )
    finally:
        hub.close()
        daemon.terminate()

    restored = load_latest_checkpoint(checkpoints)
    log = daemon.log_text()
    assert "rolled back to checkpoint-00000001.safetensors" in log, log[-3000:]
    assert first[6:22] in applied_ids(restored)
    assert second[6:22] in applied_ids(restored), log[-3000:]
    assert metrics["applied_total"] == 2, log[-3000:]


def test_rollback_to_factory_weights_keeps_update(
    mlp_pair, mosquitto, tmp_path
) -> None:
    # Both generations turn unreadable before a harmful update makes the
    # daemon roll back, so it goes back to the bundle's own weights. The
    # first update, acknowledged after two generations, is lost with them,
    # but the second one is not acknowledged yet and must come again.
    config = write_rollback_config(tmp_path, mlp_pair.bundle, mosquitto.port)
    checkpoints = tmp_path / "state" / "checkpoints"
    first, second = encoded_updates(mlp_pair.bundle, 2, seed=8)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        publish_and_wait_saved(hub, [first, second])
        for _, path in list_checkpoints(checkpoints):
            path.write_bytes(b"\0" * 64)
        hub.publish([harmful_update()])
        hub.wait(lambda m: m["rollbacks"] == 1)
        metrics = wait_or_last_metrics(
            hub, lambda m: m["applied_total"] == 1 and m["unacknowledged"] == 0
        )
    finally:
        hub.close()
        daemon.terminate()

    restored = load_latest_checkpoint(checkpoints)
    log = daemon.log_text()
    assert "rolled back to the factory weights" in log, log[-3000:]
    assert restored is not None, log[-3000:]
    assert second[6:22] in applied_ids(restored), log[-3000:]
    assert first[6:22] not in applied_ids(restored)
    # The copy of the second update was applied, not rejected as a duplicate.
    # A later copy, delivered again by a reconnect before its acknowledgement,
    # may still be rejected as one.
    assert metrics["applied_total"] == 1, log[-3000:]
    assert "may lack 1 update saved only in" in log


def test_ota_install_finishes_after_sigkill(mlp_pair, mosquitto, tmp_path) -> None:
    # The daemon is killed once the last chunk made the archive complete and
    # verified, while it installs the release. The broker then delivers the
    # unacknowledged last chunk again to the restarted daemon.
    config = write_device_config(tmp_path, mlp_pair.bundle, mosquitto.port)
    chunk_topic, _ = ota_topics(TOPICS)
    transfer = uuid.uuid4().bytes
    chunks = split_archive(pack_bundle(mlp_pair.bundle), 1024, transfer)
    archive = tmp_path / "state" / "ota" / f"{transfer.hex()}.tar"
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    watcher, statuses = ota_statuses(mosquitto.port)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        for chunk in chunks:
            hub.client.publish(chunk_topic, chunk, qos=1).wait_for_publish(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not archive.exists():
            time.sleep(0.0005)
        daemon.kill()
        left_after_kill = archive.exists()

        daemon.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not statuses_of(statuses, transfer):
            time.sleep(0.1)
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        hub.close()
        daemon.terminate()

    log = daemon.log_text()
    assert left_after_kill, log[-3000:]
    outcome = statuses_of(statuses, transfer)
    assert outcome, log[-3000:]
    assert outcome[-1]["state"] == "installed", outcome[-1]
    assert "Installing the verified archive of model transfer" in log, log[-3000:]
    assert list(archive.parent.glob(f"{transfer.hex()}.*")) == []


def test_rollback_reports_no_loss(mlp_pair, mosquitto, tmp_path) -> None:
    config = write_rollback_config(tmp_path, mlp_pair.bundle, mosquitto.port)
    first, marker = encoded_updates(mlp_pair.bundle, 2, seed=6)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        before = publish_and_wait_saved(hub, [first])
        hub.publish([harmful_update()])
        rolled_back = hub.wait(lambda m: m["rollbacks"] == 1)
        hub.publish([marker])
        after = hub.wait(lambda m: m["applied"] == 3)
    finally:
        hub.close()
        daemon.terminate()

    log = daemon.log_text()
    assert isinstance(before["loss"], float), log[-3000:]
    assert rolled_back["loss"] is None, rolled_back
    assert isinstance(after["loss"], float)
    assert after["loss"] < 100, after


def test_ota_switch_drops_harmful_update(mlp_pair, mosquitto, tmp_path) -> None:
    # The harmful update is applied but neither checked nor saved when the
    # last chunk of a transfer arrives, so the new release would copy its
    # weights unless the health check runs first.
    config = write_device_config(
        tmp_path,
        mlp_pair.bundle,
        mosquitto.port,
        checkpoint_every=30,
        checkpoint_idle_s=600,
    )
    chunk_topic, _ = ota_topics(TOPICS)
    transfer = uuid.uuid4().bytes
    chunks = split_archive(pack_bundle(mlp_pair.bundle), 8192, transfer)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    watcher, statuses = ota_statuses(mosquitto.port)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        hub.publish([harmful_update()])
        hub.wait(lambda m: m["applied"] == 1 and m["unsaved"] == 1)
        for chunk in chunks:
            hub.client.publish(chunk_topic, chunk, qos=1).wait_for_publish(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not statuses_of(statuses, transfer):
            time.sleep(0.1)
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        hub.close()
        daemon.terminate()

    log = daemon.log_text()
    outcome = statuses_of(statuses, transfer)
    assert outcome, log[-3000:]
    assert outcome[-1]["state"] == "installed", outcome[-1]
    assert "rolled back to" in log, log[-3000:]
    weights = load_latest_checkpoint(tmp_path / "state" / "checkpoints").tensors
    peak = max(
        float(np.abs(value).max())
        for name, value in weights.items()
        if name.startswith(WEIGHT_PREFIX)
    )
    assert peak < 100, peak


def test_ota_rejected_while_rollback_waits(mlp_pair, mosquitto, tmp_path) -> None:
    # The newest generation turns unreadable for the daemon's user, so the
    # rollback after a harmful update waits. The folder stays writable, so
    # any save in that time would write the harmful weights and prune the
    # good generation. A release of the same student then arrives.
    config = write_rollback_config(tmp_path, mlp_pair.bundle, mosquitto.port)
    checkpoints = tmp_path / "state" / "checkpoints"
    (good,) = encoded_updates(mlp_pair.bundle, 1, seed=9)
    harmful = harmful_update()
    chunk_topic, _ = ota_topics(TOPICS)
    transfer = uuid.uuid4().bytes
    chunks = split_archive(pack_bundle(mlp_pair.bundle), 8192, transfer)
    daemon = DaemonProcess(
        config, tmp_path / "daemon.log", prefix=file_permissions_apply()
    ).start()
    hub = Publisher(mosquitto.port, TOPICS)
    watcher, statuses = ota_statuses(mosquitto.port)
    newest: Path | None = None
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        publish_and_wait_saved(hub, [good])
        (_, newest), *_ = list_checkpoints(checkpoints)
        newest.chmod(0)
        before = sorted(path.name for path in checkpoints.iterdir())
        hub.publish([harmful])
        waiting = hub.wait(lambda m: m.get("applied_total") == 2 and m["storage_error"])
        for chunk in chunks:
            hub.client.publish(chunk_topic, chunk, qos=1).wait_for_publish(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not statuses_of(statuses, transfer):
            time.sleep(0.1)
        after = sorted(path.name for path in checkpoints.iterdir())
        newest.chmod(0o644)
        rolled_back = hub.wait(
            lambda m: m["rollbacks"] == 1 and m["unacknowledged"] == 0
        )
    finally:
        if newest is not None:
            newest.chmod(0o644)
        watcher.loop_stop()
        watcher.disconnect()
        hub.close()
        daemon.terminate()

    log = daemon.log_text()
    outcome = statuses_of(statuses, transfer)
    assert waiting["storage_error"].startswith("rollback waits:"), waiting
    assert outcome, log[-3000:]
    assert outcome[-1]["state"] == "rejected", outcome[-1]
    assert outcome[-1]["reason"] == "health_check", outcome[-1]
    assert after == before, log[-3000:]
    assert rolled_back["applied_total"] == 1
    restored = load_latest_checkpoint(checkpoints)
    assert good[6:22] in applied_ids(restored)
    assert harmful[6:22] not in applied_ids(restored)


def fill_leaving(disk: Path, free_bytes: int) -> Path:
    """Fill ``disk``, free ``free_bytes`` of it again and return the filler file."""
    filler = fill(disk)
    os.truncate(filler, filler.stat().st_size - free_bytes)
    return filler


def restart_for_copies(config: Path, daemon: DaemonProcess, hub: Publisher) -> dict:
    """Restart the daemon and return its metrics once it handled 3 copies.

    The copies rejected as duplicates wait for a checkpoint after the
    restart. Copies that arrive one at a time make no burst, so only the
    idle save, here after 0.5 s, sends their acknowledgements.
    """
    config.write_text(
        config.read_text().replace("checkpoint_idle_s = 600", "checkpoint_idle_s = 0.5")
    )
    daemon.start()
    return hub.wait(
        lambda m: (
            m.get("pid") == daemon.pid
            and m["processed"] == 3
            and m["unacknowledged"] == 0
        )
    )


def test_dropped_update_not_reapplied_after_crash(
    mlp_pair, mosquitto, small_disk
) -> None:
    # The disk has room for the record of dropped ids but not for a
    # checkpoint, so the rollback's own save fails and its acknowledgements
    # wait. The daemon is killed in that window, and the broker delivers the
    # dropped updates again to a daemon whose newest checkpoint lacks them.
    folder = small_disk.parent
    overrides = {key: dict(value) for key, value in FAST_SETTINGS.items()}
    overrides["training"].update(checkpoint_every=1, checkpoint_idle_s=600)
    # The metrics log goes to another disk, so it takes none of the free room.
    overrides["logging"] = {"metrics_file": str(folder / "metrics.jsonl")}
    config = folder / "device.toml"
    config.write_text(
        render_config(
            DEVICE,
            mlp_pair.bundle,
            small_disk / "state",
            mosquitto.port,
            overrides=overrides,
        )
    )
    checkpoints = small_disk / "state" / "checkpoints"
    record = checkpoints / DROPPED_IDS_FILE
    first, second = encoded_updates(mlp_pair.bundle, 2, seed=12)
    harmful = harmful_update()
    daemon = DaemonProcess(config, folder / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        publish_and_wait_saved(hub, [first])
        (_, saved), *_ = list_checkpoints(checkpoints)
        checkpoint_bytes = saved.stat().st_size
        # One tmpfs page: enough for the record of two ids, too small for a
        # checkpoint.
        filler = fill_leaving(small_disk, 4096)
        hub.publish([second, harmful])
        dropped = hub.wait(lambda m: m["rollbacks"] == 1 and m["storage_error"])
        generations = [path.name for _, path in list_checkpoints(checkpoints)]
        recorded = record.read_bytes() if record.exists() else b""
        daemon.kill()
        first_run = daemon.log_text()
        filler.unlink()

        restarted = restart_for_copies(config, daemon, hub)
    finally:
        hub.close()
        daemon.terminate()

    log = daemon.log_text()
    second_run = log[len(first_run) :]
    assert checkpoint_bytes > 4096
    assert "dropped 2 updates" in first_run, first_run[-3000:]
    assert dropped["unacknowledged"] == 3, dropped
    assert generations == ["checkpoint-00000001.safetensors"]
    assert restarted["applied"] == 0, second_run[-3000:]
    assert restarted["rejected"] == {"duplicate": 3}
    assert restarted["rollbacks"] == 0
    assert "rolled back" not in second_run
    assert second_run.count("dropped by an earlier rollback") == 2
    restored = load_latest_checkpoint(checkpoints)
    assert first[6:22] in applied_ids(restored)
    assert harmful[6:22] not in applied_ids(restored)
    # The record: both ids, then their sha256.
    assert recorded[:32] == second[6:22] + harmful[6:22]
    assert len(recorded) == 32 + 32


def test_dropped_ids_recorded_on_full_disk(mlp_pair, mosquitto, small_disk) -> None:
    # As above, but the disk has no free page left at the rollback, so the
    # record of dropped ids fits only into the space reserved for it at start.
    folder = small_disk.parent
    overrides = {key: dict(value) for key, value in FAST_SETTINGS.items()}
    overrides["training"].update(checkpoint_every=1, checkpoint_idle_s=600)
    overrides["logging"] = {"metrics_file": str(folder / "metrics.jsonl")}
    config = folder / "device.toml"
    config.write_text(
        render_config(
            DEVICE,
            mlp_pair.bundle,
            small_disk / "state",
            mosquitto.port,
            overrides=overrides,
        )
    )
    checkpoints = small_disk / "state" / "checkpoints"
    record = checkpoints / DROPPED_IDS_FILE
    reserve = checkpoints / DROPPED_IDS_RESERVE_FILE
    first, second = encoded_updates(mlp_pair.bundle, 2, seed=13)
    harmful = harmful_update()
    daemon = DaemonProcess(config, folder / "daemon.log").start()
    hub = Publisher(mosquitto.port, TOPICS)
    try:
        hub.wait(lambda m: m.get("pid") == daemon.pid)
        publish_and_wait_saved(hub, [first])
        reserved_bytes = reserve.stat().st_size
        filler = fill(small_disk)
        hub.publish([second, harmful])
        dropped = hub.wait(lambda m: m["rollbacks"] == 1 and m["storage_error"])
        recorded = record.read_bytes() if record.exists() else b""
        reserve_left = reserve.exists()
        daemon.kill()
        first_run = daemon.log_text()
        filler.unlink()

        restarted = restart_for_copies(config, daemon, hub)
    finally:
        hub.close()
        daemon.terminate()

    log = daemon.log_text()
    second_run = log[len(first_run) :]
    # FAST_SETTINGS' queue_size of 64 ids, then the sha256.
    assert reserved_bytes == 64 * 16 + 32
    assert "dropped 2 updates" in first_run, first_run[-3000:]
    assert "into the space reserved for it" in first_run, first_run[-3000:]
    assert "cannot write its record of dropped updates" not in first_run
    assert dropped["unacknowledged"] == 3, dropped
    assert recorded[:32] == second[6:22] + harmful[6:22]
    assert len(recorded) == 32 + 32
    assert not reserve_left
    # The restarted daemon rejects the copies that the broker delivers again.
    assert restarted["applied"] == 0, second_run[-3000:]
    assert restarted["rejected"] == {"duplicate": 3}
    assert restarted["rollbacks"] == 0
    assert "rolled back" not in second_run
    assert second_run.count("dropped by an earlier rollback") == 2
    # The disk has room again, so the start reserved the space once more, now
    # for the two ids recorded and 64 more.
    assert reserve.stat().st_size == (2 + 64) * 16 + 32
