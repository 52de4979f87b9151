"""A device whose push a killed worker left part way gets the rest of the run.

The worker stores each charged batch with its exact payload, so the run that
resumes publishes the unacknowledged ones again unchanged and charges only
the batches never charged.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dslo_edge import hub_push_batches
from dslo_edge.hub_config import load_hub_config
from dslo_edge.hub_push_window import PUBLISH_WINDOW
from dslo_edge.hub_service import HubWorker
from dslo_edge.hub_state import HubState, StoredBatch, UnfinishedRun
from dslo_edge.privacy import PrivacySettings
from dslo_edge.protocol import decode_update
from dslo_edge.signing import HEADER_BYTES, generate_key_file, load_key, verify
from tests.hub_fleet import start_worker
from tests.mqtt_proxy import PubackProxy
from tests.test_hub_push_resume import stop, wait_for_log, wait_for_updates
from tests.test_hub_service import (
    copy_bundle_with_new_teacher,
    device_updates,
    nightly_push_config,
)

DEVICES = ("kitchen", "porch", "garage")
SETTINGS = PrivacySettings(noise_multiplier=8.0, epsilon_budget=20.0)
SUMMARY_LINE = re.compile(
    r"Push nightly sent (?P<new>\d+) samples in all \(dataset 40\) of teacher "
    r"\S+ \(round (?P<round>\d+)\) to 2 of 2 devices(?P<rest>.*)$",
    re.MULTILINE,
)
GARAGE = "dslo/garage/updates"


def verify_porch(keys: Path, payload: bytes) -> bytes:
    """Return the body of a payload signed with porch's key."""
    return verify(load_key(keys / "porch.key"), "dslo/porch/updates", payload)


def write_config(folder: Path, port: int, bundle: Path) -> Path:
    """Write a private, signed nightly push of 40 samples, 3 batches, to DEVICES."""
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    keys = folder / "keys"
    keys.mkdir(parents=True)
    for device in DEVICES:
        generate_key_file(keys / f"{device}.key")
    extra = {
        "hub": 'keys_dir = "keys"',
        "privacy": "noise_multiplier = 8.0\nepsilon_budget = 20.0",
    }
    config = nightly_push_config(folder, port, bundle, x, extra)
    devices = ", ".join(f'"{device}"' for device in DEVICES)
    config.write_text(
        config.read_text().replace('devices = ["kitchen"]', f"devices = [{devices}]")
    )
    return config


def drain_updates(received: queue.Queue, keys: Path, device: str) -> list[tuple]:
    """Return (message id, sample count, payload) of each update, emptying the queue.

    Verifies each payload with the device's key, if its key file exists.
    """
    path = keys / f"{device}.key"
    key = load_key(path) if path.exists() else None
    updates = []
    while not received.empty():
        payload = received.get()
        body = (
            payload if key is None else verify(key, f"dslo/{device}/updates", payload)
        )
        update = decode_update(body)
        updates.append((update.message_id, update.sample_count, payload))
    return updates


def stored_rows(path: Path, device: str) -> list[tuple[int, int]]:
    """Return (batch, acknowledged) of the device's stored batches."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(
            "SELECT batch, acknowledged FROM push_batches WHERE device = ? "
            "ORDER BY batch",
            (device,),
        ).fetchall()
    finally:
        db.close()


def wait_for_rows(path: Path, device: str, expected: list, process) -> None:
    """Wait until the worker stored ``expected`` as the device's batches."""
    deadline = time.monotonic() + 30
    while True:
        try:
            rows = stored_rows(path, device)
        except sqlite3.OperationalError:
            # The worker has not created the file or its tables yet.
            rows = None
        if rows == expected:
            return
        assert process.poll() is None, "the worker exited"
        assert time.monotonic() < deadline, f"stored batches of {device}: {rows}"
        time.sleep(0.05)


def undo_last_batch(path: Path) -> None:
    """Turn the state into what a kill just before porch's last charge leaves.

    The stored row and the charge both go, because ``store_push_batch`` makes
    them in one transaction.
    """
    db = sqlite3.connect(path)
    db.execute("DELETE FROM push_batches WHERE device = 'porch' AND batch = 2")
    db.commit()
    db.close()
    state = HubState(path, "editor")
    state.refund_releases("porch", 8, 8.0)
    state.close()


# unacknowledged: porch's last update was published, and w1 was killed while
# waiting for its PUBACK. terminated: the same, but w1 got SIGTERM. stale: as
# unacknowledged, with the stored updates made four hours before a restart
# with a push expiry_s of three hours.
# uncharged: w1 was killed before it charged porch's last batch.
# data_changed: as uncharged, and the data file changed before the restart.
# key_replaced: as unacknowledged, and porch got a new key before the restart.
# keys_dir_dropped: as unacknowledged, and keys_dir left the hub config.
# teacher_changed: as unacknowledged, and the hub serves another teacher file.
def age_batches(path: Path, seconds: float) -> None:
    """Move the creation time of every stored batch ``seconds`` back."""
    db = sqlite3.connect(path)
    db.execute("UPDATE push_batches SET created = created - ?", (seconds,))
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "cut",
    [
        "unacknowledged",
        "terminated",
        "stale",
        "uncharged",
        "data_changed",
        "key_replaced",
        "keys_dir_dropped",
        "teacher_changed",
    ],
)
def test_killed_mid_device_push_resumes(mlp_pair, mosquitto, tmp_path, cut) -> None:
    folder = tmp_path / "hub"
    # The broker delivers porch's third update, but w1 never gets its PUBACK.
    proxy = PubackProxy(mosquitto.port, "dslo/porch/updates", acknowledged=2)
    config = write_config(folder, proxy.port, mlp_pair.bundle)
    state_file = folder / "state.sqlite"
    keys = folder / "keys"
    subscribers = {device: device_updates(mosquitto.port, device) for device in DEVICES}
    received = {device: queue_ for device, (_, queue_) in subscribers.items()}
    logs = [tmp_path / "w1-first.log", tmp_path / "w1-second.log"]
    try:
        first = start_worker(config, "w1", logs[0])
        try:
            wait_for_rows(state_file, "porch", [(0, 1), (1, 1), (2, 0)], first)
            wait_for_updates(received["porch"], 3)
        finally:
            stop(first, signal.SIGTERM if cut == "terminated" else signal.SIGKILL)
        proxy.forward_all()
        first_run = {
            device: drain_updates(received[device], keys, device) for device in DEVICES
        }
        if cut in ("uncharged", "data_changed"):
            undo_last_batch(state_file)
        if cut == "stale":
            age_batches(state_file, 14400.0)
            config.write_text(
                config.read_text().replace(
                    "every_s = 3600", "expiry_s = 10800\nevery_s = 3600"
                )
            )
        if cut == "key_replaced":
            (keys / "porch.key").unlink()
            generate_key_file(keys / "porch.key")
        if cut == "keys_dir_dropped":
            config.write_text(config.read_text().replace('keys_dir = "keys"', ""))
            # The resumed run signs nothing, so nothing is verified.
            keys = folder / "no-keys"
        if cut == "teacher_changed":
            copy_bundle_with_new_teacher(mlp_pair.bundle, folder / "new-teacher")
            config.write_text(
                config.read_text().replace(
                    str(mlp_pair.bundle), str(folder / "new-teacher")
                )
            )
        if cut == "data_changed":
            data = folder / "data.npz"
            os.utime(data, ns=(time.time_ns(), time.time_ns()))

        second = start_worker(config, "w1", logs[1])
        try:
            resumed_log = wait_for_log(logs[1], "Push nightly sent", second)
            wait_for_updates(received["garage"], 3)
            time.sleep(0.5)
        finally:
            stop(second, signal.SIGTERM)
        resumed = {
            device: drain_updates(received[device], keys, device) for device in DEVICES
        }
    finally:
        proxy.close()
        for client, _ in subscribers.values():
            client.disconnect()
            client.loop_stop()

    first_ids = [message_id for message_id, _, _ in first_run["porch"]]
    assert [count for _, count, _ in first_run["kitchen"]] == [16, 16, 8]
    assert [count for _, count, _ in first_run["porch"]] == [16, 16, 8]
    assert first_run["garage"] == []
    assert resumed["kitchen"] == []
    assert [count for _, count, _ in resumed["garage"]] == [16, 16, 8]
    assert (
        "Push nightly resumes the run that was cut off: 2 of 3 devices remain "
        "(porch, garage)"
    ) in resumed_log
    stale_warning = (
        "Push nightly to device porch published again 1 of its updates that are "
        "older than the push's expiry_s of 10800 s; a device whose max_age_s is "
        "that long rejects them"
    )
    assert (stale_warning in resumed_log) == (cut == "stale")
    signed_again = (
        "Push nightly: the key of device porch changed since the first publish, "
        "so 1 of the updates published again carry its current key"
    )
    assert (signed_again in resumed_log) == (cut == "key_replaced")
    unsigned = (
        "Push nightly: the hub config sets no keys_dir now, so 1 of the "
        "updates published again to device porch go unsigned"
    )
    assert (unsigned in resumed_log) == (cut == "keys_dir_dropped")
    # The updates published again keep the labels and round of their first
    # publish, so the summary counts them apart from the run's new samples.
    resent = 0 if cut in ("uncharged", "data_changed") else 8
    new_samples = {"uncharged": 48}.get(cut, 40)
    summary = SUMMARY_LINE.search(resumed_log)
    assert summary, resumed_log
    assert int(summary["new"]) == new_samples
    assert int(summary["round"]) == (2 if cut == "teacher_changed" else 1)
    cut_short = cut in ("data_changed", "teacher_changed")
    partial = ", 1 of them only part of the dataset" if cut_short else ""
    again = (
        f", and {resent} samples again with the labels that the interrupted run "
        "gave them"
        if resent
        else ""
    )
    assert summary["rest"] == partial + again
    if cut == "teacher_changed":
        (republished,) = resumed["porch"]
        assert republished[2] == first_run["porch"][2][2]
        assert decode_update(verify_porch(keys, republished[2])).teacher_round == 1
        garage_key = load_key(keys / "garage.key")
        garage_rounds = [
            decode_update(verify(garage_key, GARAGE, payload)).teacher_round
            for _, _, payload in resumed["garage"]
        ]
        assert garage_rounds == [2, 2, 2]
        assert (
            "Push nightly to device porch stops after batch 3 (sample 40 of the "
            "dataset): the teacher file or the data file changed"
        ) in resumed_log
    if cut in ("unacknowledged", "terminated", "stale"):
        # The same bytes again, so the device skips the update by its id.
        assert [update[2] for update in resumed["porch"]] == [first_run["porch"][2][2]]
        assert len({*first_ids, resumed["porch"][0][0]}) == 3
        assert (
            "Push nightly resumes device porch after batch 3: skips 2 acknowledged "
            "before the stop and publishes 1 again unchanged"
        ) in resumed_log
    elif cut == "key_replaced":
        # drain_updates verified it with the new key. The body and the message
        # id are the first publish's, and only the envelope's tag differs.
        ((message_id, count, payload),) = resumed["porch"]
        first_payload = first_run["porch"][2][2]
        assert message_id == first_ids[2]
        assert count == 8
        assert payload != first_payload
        assert payload[HEADER_BYTES:] == first_payload[HEADER_BYTES:]
        assert (
            "Push nightly resumes device porch after batch 3: skips 2 acknowledged "
            "before the stop and publishes 1 again with the same bodies and "
            "message ids"
        ) in resumed_log
        assert "again unchanged" not in resumed_log
    elif cut == "keys_dir_dropped":
        # The stored body without its envelope, with the same message id.
        ((message_id, count, payload),) = resumed["porch"]
        assert message_id == first_ids[2]
        assert count == 8
        assert payload == first_run["porch"][2][2][HEADER_BYTES:]
    elif cut == "uncharged":
        # Batch 2 is labelled and charged again, with a new message id.
        assert [count for _, count, _ in resumed["porch"]] == [8]
        assert resumed["porch"][0][0] not in first_ids
        assert (
            "Push nightly resumes device porch after batch 2: skips 2 acknowledged "
            "before the stop and publishes 0 again unchanged"
        ) in resumed_log
    elif cut == "data_changed":
        assert resumed["porch"] == []
        assert (
            "Push nightly to device porch stops after batch 2 (sample 32 of the "
            "dataset): the teacher file or the data file changed"
        ) in resumed_log
    state = HubState(state_file, "reader")
    try:
        releases = {device: state.releases(device) for device in DEVICES}
        left = state.take_unfinished_run("nightly", time.time())
    finally:
        state.close()
    porch_charge = 32 if cut == "data_changed" else 40
    assert releases == {
        "kitchen": {8.0: 40},
        "porch": {8.0: porch_charge},
        "garage": {8.0: 40},
    }
    assert left is None
    assert stored_rows(state_file, "porch") == []


def batch(index: int, first: int, end: int) -> StoredBatch:
    return StoredBatch(index, first, end, "source", 100.0, bytes([index]) * 4)


def test_stored_batch_charged_with_its_row(tmp_path) -> None:
    state = HubState(tmp_path / "state.sqlite", "w1")
    spent = PrivacySettings(noise_multiplier=8.0, epsilon_budget=0.001)
    try:
        assert state.claim_run("nightly", 0.0, 3600.0, DEVICES)
        state.start_device_push("nightly", "porch")
        stored = state.store_push_batch("nightly", "porch", batch(0, 0, 16), SETTINGS)
        refused = state.store_push_batch("nightly", "porch", batch(1, 16, 32), spent)
        state.acknowledge_push_batches("nightly", "porch", [0])
        rows = state.stored_push_batches("nightly", "porch")
        releases = state.releases("porch")
    finally:
        state.close()

    assert stored == ""
    assert refused == (
        "labelling 16 more samples would raise the device's spent epsilon to "
        "3.19, above its budget of 0.001"
    )
    assert rows == [replace_acknowledged(batch(0, 0, 16))]
    assert releases == {8.0: 16}


def replace_acknowledged(stored: StoredBatch) -> StoredBatch:
    return StoredBatch(
        stored.batch,
        stored.first_sample,
        stored.end_sample,
        stored.source,
        stored.created,
        stored.payload,
        acknowledged=True,
    )


def test_stored_batches_deleted_when_push_ends(tmp_path) -> None:
    state = HubState(tmp_path / "state.sqlite", "w1")
    try:
        assert state.claim_run("nightly", 0.0, 3600.0, DEVICES)
        for device in DEVICES:
            state.start_device_push("nightly", device)
            state.store_push_batch("nightly", device, batch(0, 0, 16), None)
        state.end_device_push("nightly", "kitchen")
        after_device_end = {
            device: len(state.stored_push_batches("nightly", device))
            for device in DEVICES
        }
        unfinished = state.take_unfinished_run("nightly", 10.0)
        state.end_run("nightly")
        after_run_end = [state.stored_push_batches("nightly", d) for d in DEVICES]
        assert state.claim_run("nightly", 3600.0, 3600.0, DEVICES)
        state.start_device_push("nightly", "porch")
        state.store_push_batch("nightly", "porch", batch(0, 0, 16), None)
        assert state.claim_run("nightly", 7200.0, 3600.0, DEVICES)
        after_next_claim = state.stored_push_batches("nightly", "porch")
    finally:
        state.close()

    assert after_device_end == {"kitchen": 0, "porch": 1, "garage": 1}
    assert unfinished == UnfinishedRun(
        pending=(), interrupted=(), partly_sent=("porch", "garage")
    )
    assert after_run_end == [[], [], []]
    assert after_next_claim == []


def test_push_devices_without_batches_stored_migrated(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    # push_devices as dslo-edge wrote it before it stored batches.
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE schedule (name TEXT PRIMARY KEY, next_due REAL NOT NULL)")
    old.execute(
        "CREATE TABLE push_devices (name TEXT NOT NULL, device TEXT NOT NULL, "
        "position INTEGER NOT NULL, worker TEXT NOT NULL, "
        "started INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (name, device))"
    )
    old.execute("INSERT INTO schedule VALUES ('nightly', 3600.0)")
    old.executemany(
        "INSERT INTO push_devices VALUES ('nightly', ?, ?, 'w1', ?)",
        [("kitchen", 0, 1), ("porch", 1, 0)],
    )
    old.commit()
    old.close()

    state = HubState(path, "w1")
    try:
        unfinished = state.take_unfinished_run("nightly", 10.0)
    finally:
        state.close()

    assert unfinished == UnfinishedRun(pending=("porch",), interrupted=("kitchen",))


def test_batches_of_earlier_run_dropped_at_start(tmp_path) -> None:
    path = tmp_path / "state.sqlite"
    state = HubState(path, "w1")
    try:
        assert state.claim_run("nightly", 0.0, 3600.0, DEVICES)
        state.start_device_push("nightly", "porch")
        state.store_push_batch("nightly", "porch", batch(0, 0, 16), None)
        # A claim by an earlier dslo-edge version, which keeps push_batches.
        old = sqlite3.connect(path)
        old.execute("DELETE FROM push_devices")
        old.execute(
            "INSERT INTO push_devices (name, device, position, worker) "
            "VALUES ('nightly', 'porch', 0, 'w1')"
        )
        old.commit()
        old.close()
        state.start_device_push("nightly", "porch")
        at_start = state.stored_push_batches("nightly", "porch")
    finally:
        state.close()

    assert at_start == []


def test_refunded_update_not_published_again(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    # porch has no subscriber at first, so the broker drops its updates unread
    # and w1 refunds them. Their PUBACKs arrive except that of the second.
    proxy = PubackProxy(
        mosquitto.port, "dslo/porch/updates", None, withheld=frozenset({2})
    )
    config = write_config(folder, proxy.port, mlp_pair.bundle)
    state_file = folder / "state.sqlite"
    keys = folder / "keys"
    subscribers = {
        device: device_updates(mosquitto.port, device)
        for device in ("kitchen", "garage")
    }
    logs = [tmp_path / "w1-first.log", tmp_path / "w1-second.log"]
    porch = None
    try:
        first = start_worker(config, "w1", logs[0])
        try:
            # A dropped update is marked only with its refund, which waits for
            # the withheld PUBACK, so all three stay unmarked until the stop.
            wait_for_rows(state_file, "porch", [(0, 0), (1, 0), (2, 0)], first)
            # The PUBACKs of the first and third updates, which the refund needs.
            time.sleep(1.0)
        finally:
            stop(first, signal.SIGTERM)
        state = HubState(state_file, "reader")
        try:
            charged_at_stop = state.releases("porch")
        finally:
            state.close()
        proxy.forward_all()
        porch = device_updates(mosquitto.port, "porch")
        second = start_worker(config, "w1", logs[1])
        try:
            wait_for_log(logs[1], "Push nightly sent", second)
            wait_for_updates(subscribers["garage"][1], 3)
            time.sleep(0.5)
        finally:
            stop(second, signal.SIGTERM)
        received = [count for _, count, _ in drain_updates(porch[1], keys, "porch")]
    finally:
        proxy.close()
        for client, _ in [*subscribers.values(), *([porch] if porch else [])]:
            client.disconnect()
            client.loop_stop()

    state = HubState(state_file, "reader")
    try:
        charged = state.releases("porch")
    finally:
        state.close()
    # The first and third updates were dropped unread and refunded; only the
    # second, whose PUBACK never came, stays charged.
    assert charged_at_stop == {8.0: 16}
    # Each update porch received is charged: none goes out after its refund.
    assert received == [16]
    assert charged == {8.0: sum(received)}


def test_terminated_push_stops_at_next_batch(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    # One sample per update, so kitchen's push takes far longer than the stop.
    total = 10000
    x = np.random.default_rng(1).random((total, 64), dtype=np.float32)
    config = nightly_push_config(folder, mosquitto.port, mlp_pair.bundle, x)
    config.write_text(config.read_text().replace("batch_size = 16", "batch_size = 1"))
    state_file = folder / "state.sqlite"
    client, received = device_updates(mosquitto.port, "kitchen")
    logs = [tmp_path / "w1-first.log", tmp_path / "w1-second.log"]
    try:
        first = start_worker(config, "w1", logs[0])
        try:
            wait_for_updates(received, 1, timeout_s=30)
            first.send_signal(signal.SIGTERM)
            first.wait(30)
        finally:
            if first.poll() is None:
                stop(first, signal.SIGKILL)
        rows_at_stop = stored_rows(state_file, "kitchen")
        stored_at_stop = len(rows_at_stop)

        second = start_worker(config, "w1", logs[1])
        try:
            wait_for_updates(received, total, timeout_s=120)
            resumed_log = wait_for_log(logs[1], "Push nightly sent", second)
            time.sleep(0.5)
        finally:
            stop(second, signal.SIGTERM)
        updates = drain_updates(received, folder / "keys", "kitchen")
    finally:
        client.disconnect()
        client.loop_stop()

    first_log = logs[0].read_text()
    message_ids = {message_id for message_id, _, _ in updates}
    # The worker stops after the batch under way, before kitchen's push ends.
    # Before, the push went on until the stop closed the state file under it.
    assert first.returncode == 0
    assert 0 < stored_at_stop < total
    assert "closed database" not in first_log
    assert "Push nightly to device kitchen stops with" in first_log
    assert "Push nightly resumes device kitchen after batch" in resumed_log
    # The broker acknowledged every published update before the stop ended,
    # so each is marked and the resumed run publishes none again.
    assert [acknowledged for _, acknowledged in rows_at_stop] == [1] * stored_at_stop
    # Each sample reached kitchen once, by message id.
    assert len(message_ids) == total
    assert len(updates) == total
    assert stored_rows(state_file, "kitchen") == []


def test_terminated_push_skips_missing_pubacks(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    total = 200
    x = np.random.default_rng(3).random((total, 64), dtype=np.float32)
    # The broker's PUBACKs of kitchen's updates after the fifth never reach
    # w1, as when they are still on the way at the stop.
    proxy = PubackProxy(mosquitto.port, "dslo/kitchen/updates", 5)
    config = nightly_push_config(folder, proxy.port, mlp_pair.bundle, x)
    config.write_text(config.read_text().replace("batch_size = 16", "batch_size = 1"))
    state_file = folder / "state.sqlite"
    client, received = device_updates(mosquitto.port, "kitchen")
    log = tmp_path / "w1.log"
    try:
        worker = start_worker(config, "w1", log)
        try:
            # Five acknowledged updates and a full window that waits for room.
            wait_for_updates(received, 5 + PUBLISH_WINDOW, timeout_s=30)
            time.sleep(0.5)
            stop(worker, signal.SIGTERM)
        finally:
            if worker.poll() is None:
                stop(worker, signal.SIGKILL)
        rows = stored_rows(state_file, "kitchen")
    finally:
        proxy.close()
        client.disconnect()
        client.loop_stop()

    text = log.read_text()
    # A stop is no failed push: the resumed run publishes the unmarked rest.
    assert worker.returncode == 0
    assert "Push nightly to device kitchen failed" not in text
    assert "Push nightly to device kitchen stops with 5 samples acknowledged" in text
    assert rows == [(batch, int(batch < 5)) for batch in range(5 + PUBLISH_WINDOW)]


RESUME_LINE = re.compile(
    r"Push nightly resumes device kitchen after batch (\d+): skips (\d+) "
    r"acknowledged before the stop and publishes (\d+) again unchanged"
)


def test_killed_push_skips_acknowledged_updates(mlp_pair, mosquitto, tmp_path) -> None:
    folder = tmp_path / "hub"
    # One sample per update, so the kill lands part way through kitchen's push.
    total = 3000
    x = np.random.default_rng(2).random((total, 64), dtype=np.float32)
    config = nightly_push_config(folder, mosquitto.port, mlp_pair.bundle, x)
    config.write_text(config.read_text().replace("batch_size = 16", "batch_size = 1"))
    state_file = folder / "state.sqlite"
    client, received = device_updates(mosquitto.port, "kitchen")
    logs = [tmp_path / "w1-first.log", tmp_path / "w1-second.log"]
    try:
        first = start_worker(config, "w1", logs[0])
        try:
            wait_for_updates(received, 500, timeout_s=60)
        finally:
            stop(first, signal.SIGKILL)
        # Updates that the broker took before the kill may still be on the way.
        time.sleep(0.5)
        before_kill = drain_updates(received, folder / "keys", "kitchen")
        delivered_before = len({message_id for message_id, _, _ in before_kill})

        second = start_worker(config, "w1", logs[1])
        try:
            wait_for_updates(received, total - delivered_before, timeout_s=120)
            resumed_log = wait_for_log(logs[1], "Push nightly sent", second)
            time.sleep(0.5)
        finally:
            stop(second, signal.SIGTERM)
        after_restart = drain_updates(received, folder / "keys", "kitchen")
    finally:
        client.disconnect()
        client.loop_stop()

    resumed = RESUME_LINE.search(resumed_log)
    assert resumed is not None, resumed_log
    last_batch, skipped, republished = (int(group) for group in resumed.groups())
    receipts = Counter(
        message_id for message_id, _, _ in [*before_kill, *after_restart]
    )
    # Kitchen subscribes, so the broker drops none of its updates. Then at most
    # PUBLISH_WINDOW stored updates lack the acknowledged mark at any time, so
    # the resumed run publishes at most that many again, and the device can
    # have received only those twice.
    assert skipped + republished == last_batch
    assert republished <= PUBLISH_WINDOW
    assert skipped >= delivered_before - PUBLISH_WINDOW
    assert len(receipts) == total
    assert sum(receipts.values()) - total <= PUBLISH_WINDOW
    assert max(receipts.values()) <= 2
    assert stored_rows(state_file, "kitchen") == []


def test_unacknowledged_window_stops_charges(
    mlp_pair, tmp_path, caplog, monkeypatch
) -> None:
    monkeypatch.setattr(hub_push_batches, "PUBLISH_TIMEOUT_S", 1.0)
    x = np.random.default_rng(0).random((40, 64), dtype=np.float32)
    extra = {"privacy": "noise_multiplier = 8.0\nepsilon_budget = 20.0"}
    config = nightly_push_config(tmp_path / "hub", 1883, mlp_pair.bundle, x, extra)
    config.write_text(config.read_text().replace("batch_size = 16", "batch_size = 1"))
    worker = HubWorker(load_hub_config(config, "w1"))
    assert worker.pushes is not None
    [schedule] = worker.config.pushes
    caplog.set_level("ERROR", logger="dslo_edge.hub_pushes")

    # The worker never connected, so no PUBACK arrives and the window fills.
    started = time.monotonic()
    worker.pushes.run_once(schedule)
    duration = time.monotonic() - started
    releases = worker.state.releases("kitchen")
    worker.state.close()

    errors = [record.getMessage() for record in caplog.records]
    assert errors == [
        f"Push nightly to device kitchen failed: {PUBLISH_WINDOW} of "
        f"{PUBLISH_WINDOW} updates were not acknowledged by the broker (timed "
        "out after 1 s without a broker connection); paho sends the queued ones "
        "if the worker reconnects before it stops"
    ]
    # Only the window's updates are charged, not the whole dataset.
    assert releases == {8.0: PUBLISH_WINDOW}
    # One timeout, for the oldest update, and no second wait after it.
    assert duration < 5.0
