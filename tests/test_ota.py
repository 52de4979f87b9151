"""Model updates over the air: chunks, verification, install, swap, rollback."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import queue
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from dslo_edge.broker import Broker
from dslo_edge.bundle import Bundle, load_bundle
from dslo_edge.checkpoint import save_checkpoint
from dslo_edge.config import render_config
from dslo_edge.errors import BundleError
from dslo_edge.finished_transfers import FINISHED_TRANSFERS_FILE
from dslo_edge.model_update import ModelUpdater, UpdateOutcome
from dslo_edge.ota import (
    DEFAULT_MAX_ARCHIVE_BYTES,
    HEADER_BYTES,
    OtaError,
    OtaReceiver,
    ReceivedArchive,
    ReleaseOptions,
    ota_topics,
    peek_transfer_id,
    read_release_options,
    split_archive,
)
from dslo_edge.ota_sender import StatusWatcher, pack_bundle, send_bundle
from dslo_edge.protocol import Topics
from dslo_edge.swap import (
    BundleStore,
    KeptCheckpoints,
    carry_over_weights,
    check_student_health,
    lost_weights,
    model_change,
    model_id,
    release_id,
    swap_student,
)
from tests.bundle_files import write_bundle
from tests.cli_process import run_cli
from tests.sysfs_tree import FakeClock

TIMEOUT_S = 10.0
TOPICS = Topics.for_device("kitchen-cam")


def receive_all(receiver: OtaReceiver, chunks: list[bytes]) -> ReceivedArchive:
    results = [receiver.receive(chunk) for chunk in chunks]
    assert all(result is None for result in results[:-1])
    assert results[-1] is not None
    return results[-1]


class FakeStudent:
    """A student with plain weight arrays and a softmax over zero logits."""

    def __init__(self, bundle: Bundle, seed: int = 0, broken: bool = False):
        rng = np.random.default_rng(seed)
        self.bundle = bundle
        self.broken = broken
        self.weights = {
            name: rng.normal(size=shape).astype(np.float32)
            for name, shape in bundle.weight_shapes.items()
        }

    def get_weights(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self.weights.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = {name: np.array(value) for name, value in weights.items()}

    def infer(self, x: np.ndarray) -> np.ndarray:
        value = np.nan if self.broken else 1.0 / self.bundle.class_count
        return np.full((len(x), self.bundle.class_count), value, dtype=np.float32)


# Chunking and assembly


def test_archive_round_trip_in_chunks(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", student_bytes=200_000)
    archive = pack_bundle(bundle)
    assert pack_bundle(bundle) == archive  # deterministic
    chunks = split_archive(archive, chunk_bytes=32 * 1024)
    assert len(chunks) == -(-len(archive) // (32 * 1024))
    assert all(len(c) <= HEADER_BYTES + 32 * 1024 for c in chunks)

    received = receive_all(OtaReceiver(tmp_path / "ota"), chunks)

    assert received.path.read_bytes() == archive
    assert received.size == len(archive)
    assert not list((tmp_path / "ota").glob("*.part"))


def archive_members(archive: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return tar.getnames()


def test_pack_takes_only_bundle_files(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    (bundle / "extra.bin").write_bytes(b"x" * 100_000)
    (bundle / "notes").mkdir()
    (bundle / "notes" / "todo.txt").write_text("not part of the bundle")
    np.savez(bundle / "probe.npz", x=np.zeros((2, 64)), y=np.zeros(2))

    archive = pack_bundle(bundle)

    assert archive_members(archive) == [
        "manifest.json",
        "probe.npz",
        "student.tflite",
        "teacher.tflite",
        "ota-release.json",
    ]
    assert len(archive) < 100_000


def test_pack_rejects_archive_above_limit(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", student_bytes=50_000)
    size = len(pack_bundle(bundle))
    assert size % 10_240 == 0  # tar pads to records of 20 blocks
    with pytest.raises(
        BundleError, match=r"packs to about 0\.1 MiB, above the 0\.0585938 MiB"
    ):
        pack_bundle(bundle, max_archive_bytes=size - 10_240)
    assert len(pack_bundle(bundle, max_archive_bytes=size)) == size


def test_pack_names_missing_manifest_file(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["student_int8"] = {
        "file": "student-int8.tflite",
        "sha256": "0" * 64,
        "bytes": 1024,
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        BundleError, match="bundle file .*student-int8.tflite is missing"
    ):
        pack_bundle(bundle)


def test_pack_rejects_probe_device_rejects(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    np.savez(bundle / "probe.npz", x=np.zeros((2, 64)), y=np.array([0, 12]))

    with pytest.raises(BundleError) as caught:
        pack_bundle(bundle)

    assert str(bundle / "probe.npz") in str(caught.value)
    assert "has labels 0..12, but the student has 10 classes" in str(caught.value)


def test_release_options_travel_in_archive(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    plain = pack_bundle(bundle)
    allowed = pack_bundle(bundle, options=ReleaseOptions(allow_model_change=True))
    assert plain != allowed
    for name, archive, expected in (("a", plain, False), ("b", allowed, True)):
        path = tmp_path / f"{name}.tar"
        path.write_bytes(archive)
        assert read_release_options(path).allow_model_change is expected
        release = BundleStore(tmp_path / "state").install_archive(path)
        assert not (release / "ota-release.json").exists()


def test_release_options_reject_bad_json() -> None:
    with pytest.raises(OtaError, match="is not JSON") as caught:
        ReleaseOptions.from_json(b"{")
    assert caught.value.reason == "bad_bundle"
    with pytest.raises(OtaError, match="is not JSON") as caught:
        ReleaseOptions.from_json(b'{"format_version": 1' + b"0" * 5000 + b"}")
    assert caught.value.reason == "bad_bundle"
    with pytest.raises(OtaError, match="is not JSON") as caught:
        ReleaseOptions.from_json(b"[" * 100_000 + b"]" * 100_000)
    assert caught.value.reason == "bad_bundle"
    with pytest.raises(OtaError, match='expected {"format_version": 1'):
        ReleaseOptions.from_json(b'{"format_version": 1, "allow_model_change": 1}')


def test_peek_transfer_id_of_signed_chunk(tmp_path: Path) -> None:
    from dslo_edge.signing import sign

    transfer = bytes(range(16))
    chunk = split_archive(b"archive bytes", 1024, transfer)[0]
    assert peek_transfer_id(chunk) == transfer.hex()
    assert peek_transfer_id(sign(b"k" * 32, "dslo/x/ota", chunk)) == transfer.hex()
    assert peek_transfer_id(b"garbage") is None


def test_chunks_out_of_order_and_repeated(tmp_path: Path) -> None:
    archive = pack_bundle(write_bundle(tmp_path / "bundle", student_bytes=100_000))
    chunks = split_archive(archive, chunk_bytes=16 * 1024)
    receiver = OtaReceiver(tmp_path / "ota")
    order = list(reversed(chunks)) + [chunks[0]]
    for chunk in order[:-2]:
        assert receiver.receive(chunk) is None
    assert receiver.receive(chunks[-1]) is None  # a repeat
    assert receiver.progress == (len(chunks) - 1, len(chunks))
    received = receiver.receive(order[-2])
    assert received is not None
    assert received.path.read_bytes() == archive
    assert receiver.progress is None


def test_stored_chunk_is_on_disk_before_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon acknowledges a chunk once receive returns, and the broker
    # never sends it again, so the data and its entry in the list of stored
    # chunks must survive a power cut by then.
    archive = pack_bundle(write_bundle(tmp_path / "bundle", student_bytes=50_000))
    chunks = split_archive(archive, chunk_bytes=16 * 1024)
    folder = tmp_path / "ota"
    synced: list[str] = []
    real_fsync = os.fsync

    def record(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", record)
    receiver = OtaReceiver(folder)
    assert receiver.receive(chunks[1]) is None
    monkeypatch.undo()

    transfer = peek_transfer_id(chunks[1])
    part = str(folder / f"{transfer}.part")
    listed = str(folder / f"{transfer}.received")
    assert part in synced, synced
    assert listed in synced, synced
    assert str(folder) in synced, synced
    # The data first, so the list never names a chunk that is not on disk.
    assert synced.index(part) < len(synced) - 1 - synced[::-1].index(listed)
    assert synced[-1] == listed


@pytest.mark.parametrize("stopped_in", ["_verify", "sha256_file"])
def test_restart_before_check_completes_transfer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped_in: str
) -> None:
    # A daemon killed after it stored the last chunk, before or while it
    # checked the archive, did not acknowledge that chunk, so the broker
    # sends it again after the restart. Every other chunk was acknowledged.
    from dslo_edge import ota

    archive = pack_bundle(write_bundle(tmp_path / "bundle", student_bytes=50_000))
    chunks = split_archive(archive, chunk_bytes=16 * 1024)
    folder = tmp_path / "ota"
    before = OtaReceiver(folder)
    for chunk in chunks[:-1]:
        assert before.receive(chunk) is None

    def killed(*_: Any) -> None:
        raise KeyboardInterrupt

    if stopped_in == "_verify":
        monkeypatch.setattr(OtaReceiver, "_verify", killed)
    else:
        monkeypatch.setattr(ota, "sha256_file", killed)
    with pytest.raises(KeyboardInterrupt):
        before.receive(chunks[-1])
    monkeypatch.undo()

    received = OtaReceiver(folder).receive(chunks[-1])

    assert received is not None
    assert received.path.read_bytes() == archive
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [FINISHED_TRANSFERS_FILE, received.path.name]
    )


def test_restart_does_not_mix_two_archives(tmp_path: Path) -> None:
    # A sender that reuses a transfer id for another archive of the same
    # size after a restart: the chunks stored before must not be kept.
    transfer = b"t" * 16
    first = split_archive(os.urandom(50_000), 16 * 1024, transfer)
    archive = os.urandom(50_000)
    second = split_archive(archive, 16 * 1024, transfer)
    folder = tmp_path / "ota"
    for chunk in first[:2]:
        assert OtaReceiver(folder).receive(chunk) is None

    received = receive_all(OtaReceiver(folder), second)

    assert received.path.read_bytes() == archive


def test_new_transfer_deletes_abandoned_part(tmp_path: Path) -> None:
    archive = pack_bundle(write_bundle(tmp_path / "bundle", student_bytes=50_000))
    chunks = split_archive(archive, chunk_bytes=16 * 1024)
    folder = tmp_path / "ota"
    folder.mkdir()
    # Left by a transfer that a daemon restart cut off.
    abandoned = folder / ("ab" * 16 + ".part")
    abandoned.write_bytes(b"\0" * 51_200)

    received = receive_all(OtaReceiver(folder), chunks)

    assert not abandoned.exists()
    assert received.path.read_bytes() == archive
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [FINISHED_TRANSFERS_FILE, received.path.name]
    )


def test_new_transfer_deletes_archive_left_by_install(tmp_path: Path) -> None:
    archive = pack_bundle(write_bundle(tmp_path / "bundle", student_bytes=50_000))
    chunks = split_archive(archive, chunk_bytes=16 * 1024)
    folder = tmp_path / "ota"
    folder.mkdir()
    # Left by a kill during the install of another transfer.
    abandoned = folder / ("ab" * 16 + ".tar")
    abandoned.write_bytes(b"\0" * 51_200)

    received = receive_all(OtaReceiver(folder), chunks)

    assert not abandoned.exists()
    assert received.path.read_bytes() == archive
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [FINISHED_TRANSFERS_FILE, received.path.name]
    )


def test_damaged_archive_left_by_install_is_received_again(tmp_path: Path) -> None:
    archive = pack_bundle(write_bundle(tmp_path / "bundle", student_bytes=50_000))
    chunks = split_archive(archive, chunk_bytes=16 * 1024)
    folder = tmp_path / "ota"
    folder.mkdir()
    transfer = chunks[0][5:21].hex()
    damaged = folder / f"{transfer}.tar"
    damaged.write_bytes(b"\0" * len(archive))

    receiver = OtaReceiver(folder)
    outcomes = [receiver.receive(chunk) for chunk in chunks]

    assert outcomes[:-1] == [None] * (len(chunks) - 1)
    assert outcomes[-1] is not None
    assert outcomes[-1].path.read_bytes() == archive


def test_kill_while_deleting_leaves_no_orphan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = split_archive(os.urandom(50_000), 16 * 1024, b"a" * 16)
    archive = os.urandom(50_000)
    second = split_archive(archive, 16 * 1024, b"b" * 16)
    folder = tmp_path / "ota"
    assert OtaReceiver(folder).receive(first[0]) is None
    # Left by another kill after _verify renamed the archive of a transfer.
    orphan = folder / ("cd" * 16 + ".received")
    orphan.write_bytes(b"\0" * 64)
    deleted: list[str] = []
    unlink = Path.unlink

    def killed_after_one(path: Path, missing_ok: bool = False) -> None:
        if deleted:
            raise KeyboardInterrupt
        deleted.append(path.name)
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        OtaReceiver(folder).receive(second[0])
    monkeypatch.undo()
    left = sorted(p.name for p in folder.iterdir())

    received = receive_all(OtaReceiver(folder), second)

    assert deleted == [("61" * 16) + ".received"]
    assert ("61" * 16) + ".part" in left
    assert received.path.read_bytes() == archive
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [FINISHED_TRANSFERS_FILE, received.path.name]
    )


def test_file_as_folder_rejects_transfer_once(tmp_path: Path) -> None:
    archive = pack_bundle(write_bundle(tmp_path / "bundle", student_bytes=50_000))
    chunks = split_archive(archive, chunk_bytes=16 * 1024)
    folder = tmp_path / "ota"
    folder.write_text("not a folder")
    receiver = OtaReceiver(folder)

    with pytest.raises(OtaError) as caught:
        receiver.receive(chunks[0])
    later = [receiver.receive(chunk) for chunk in chunks[1:]]
    content_after = folder.read_text()
    folder.unlink()
    again = split_archive(archive, chunk_bytes=16 * 1024)
    received = receive_all(receiver, again)

    assert caught.value.reason == "state_dir_invalid"
    assert str(caught.value) == (
        f"{folder} in device.state_dir is a file, expected the folder of "
        "incoming over-the-air transfers; move the file away, then send the "
        "release again"
    )
    assert len(chunks) > 1
    assert later == [None] * (len(chunks) - 1)
    assert content_after == "not a folder"
    assert received.path.read_bytes() == archive


def test_bundle_store_rejects_file_as_folder(tmp_path: Path) -> None:
    archive = tmp_path / "release.tar"
    archive.write_bytes(pack_bundle(write_bundle(tmp_path / "bundle")))
    state = tmp_path / "state"
    state.mkdir()
    (state / "bundles").symlink_to("missing-folder")

    with pytest.raises(OtaError) as caught:
        BundleStore(state).install_archive(archive)

    assert caught.value.reason == "state_dir_invalid"
    assert str(caught.value) == (
        f"{state / 'bundles'} in device.state_dir is a symlink that leads to no "
        "directory (a loop, or a missing or non-directory target), expected the "
        "folder of over-the-air releases; remove the symlink or point it at a "
        "directory, then send the release again"
    )
    assert not (state / "missing-folder").exists()


class FullDiskFile:
    """A real file whose writes fail with ENOSPC once ``DiskSpace`` runs out."""

    def __init__(self, stream: Any, space: DiskSpace):
        self._stream = stream
        self._space = space

    def write(self, data: bytes) -> int:
        if self._space.writes_left == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._space.writes_left -= 1
        return self._stream.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __enter__(self) -> FullDiskFile:
        return self

    def __exit__(self, *_: object) -> None:
        self._stream.close()


class DiskSpace:
    """An ``open`` for one module: ``writes`` writes succeed, later ones fail."""

    def __init__(self, writes: int):
        self.writes_left = writes

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        stream = open(file, mode, *args, **kwargs)
        if mode in ("r", "rb"):
            return stream
        return FullDiskFile(stream, self)


def test_full_disk_rejects_transfer_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dslo_edge import ota

    factory = write_bundle(tmp_path / "factory")
    current = FakeStudent(load_bundle(factory))
    updater = ModelUpdater(tmp_path / "state", FakeStudent)  # type: ignore[arg-type]
    archive = pack_bundle(write_bundle(tmp_path / "new", student_bytes=30_000))
    chunks = split_archive(archive, 8 * 1024)
    folder = tmp_path / "state" / "ota"
    # The first chunk and its entry in the list of stored chunks are written,
    # the second chunk finds the file system full.
    monkeypatch.setattr(ota, "open", DiskSpace(writes=2).open, raising=False)

    with caplog.at_level(logging.INFO, logger="dslo_edge"):
        outcomes = [
            updater.handle_chunk(chunk, current)  # type: ignore[arg-type]
            for chunk in chunks
        ]
    files_after = list(folder.iterdir())
    monkeypatch.undo()
    # With space again, the same receiver takes a new transfer of the bundle.
    received = receive_all(updater.receiver, split_archive(archive, 8 * 1024))

    detail = (
        f"cannot store the transfer in {folder}: No space left on device "
        f"(ENOSPC); free space on the file system of {folder} (the release "
        "archive is 50 KiB), then send the release again"
    )
    assert len(archive) == 51_200
    assert len(chunks) == 7
    statuses = [json.loads(o.status) if o.status else None for o in outcomes]
    assert statuses[0] is None
    assert statuses[1] is not None
    assert statuses[1]["state"] == "rejected"
    assert statuses[1]["reason"] == "state_dir_write_failed"
    assert statuses[1]["detail"] == detail
    assert statuses[2:] == [None] * 5
    assert all(outcome.candidate is None for outcome in outcomes)
    assert [p.name for p in files_after] == [FINISHED_TRANSFERS_FILE]
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1
    assert problems[0].levelno == logging.ERROR
    assert problems[0].exc_info is None
    assert detail in problems[0].getMessage()
    assert received.path.read_bytes() == archive


def test_install_full_disk_leaves_no_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dslo_edge import swap

    archive = tmp_path / "release.tar"
    archive.write_bytes(pack_bundle(write_bundle(tmp_path / "bundle")))
    store = BundleStore(tmp_path / "state")
    monkeypatch.setattr(swap, "open", DiskSpace(writes=0).open, raising=False)

    with pytest.raises(OtaError) as caught:
        store.install_archive(archive)

    assert caught.value.reason == "state_dir_write_failed"
    assert str(caught.value) == (
        f"cannot unpack the release into {store.folder}: No space left on device "
        f"(ENOSPC); free space on the file system of {store.folder} (the release "
        f"archive is {-(-archive.stat().st_size // 1024)} KiB), then send the "
        "release again"
    )
    assert list(store.folder.iterdir()) == []


def test_activate_full_disk_rejects_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dslo_edge import swap
    from dslo_edge.model_update import ReleaseCandidate

    updater = ModelUpdater(tmp_path / "state", FakeStudent)  # type: ignore[arg-type]
    release = install(tmp_path, updater.store, 1)
    bundle = load_bundle(release)
    student = FakeStudent(bundle)
    candidate = ReleaseCandidate("ab12", release, bundle, student, False)  # type: ignore[arg-type]

    def no_space(*_: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(swap.os, "symlink", no_space)
    with pytest.raises(OtaError) as caught:
        updater.activate(candidate)
    monkeypatch.undo()
    status = json.loads(updater.reject(candidate, caught.value))

    folder = updater.store.folder
    detail = (
        f"cannot point {folder / 'active'} at release {release.name}: No space "
        f"left on device (ENOSPC); free space on the file system of {folder}, "
        "then send the release again"
    )
    assert caught.value.reason == "state_dir_write_failed"
    assert str(caught.value) == detail
    assert status["state"] == "rejected"
    assert status["reason"] == "state_dir_write_failed"
    assert status["detail"] == detail
    assert updater.store.active_release() is None
    assert not release.exists()


def test_rollback_on_full_disk_restores_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dslo_edge import swap

    store = BundleStore(tmp_path / "state")
    first = install(tmp_path, store, 1)
    store.activate(first)
    second = install(tmp_path, store, 2)
    store.activate(second)

    def no_space(*_: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # A new link needs a new inode, which a full file system may not have.
    monkeypatch.setattr(swap.os, "symlink", no_space)
    restored = store.rollback()
    monkeypatch.undo()

    assert restored == first
    assert store.active_release() == first
    assert not (store.folder / "previous").is_symlink()


def test_unaccepted_release_is_not_started(tmp_path: Path, caplog) -> None:
    factory = write_bundle(tmp_path / "factory")
    store = BundleStore(tmp_path / "state")
    first = install(tmp_path, store, 1)
    store.activate(first, pending=True)
    pending_first = store.active_path(factory)
    store.accept(first)
    second = install(tmp_path, store, 2)
    store.activate(second, pending=True)

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="dslo_edge.swap"):
        pending_second = store.active_path(factory)
    store.accept(second)
    accepted_second = store.active_path(factory)

    assert pending_first == factory
    assert pending_second == first
    assert caplog.messages == [
        f"Release {second.name} that {store.folder / 'active'} names was never "
        "accepted, because the daemon stopped during its switch or could not "
        "move the link back after a failed switch, so the daemon starts "
        f"{first} instead. Send the release again, after making the state "
        "directory writable if it is read-only"
    ]
    assert accepted_second == second


def test_failed_rollback_keeps_release_unstarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dslo_edge import swap
    from dslo_edge.model_update import ReleaseCandidate

    factory = write_bundle(tmp_path / "factory")
    updater = ModelUpdater(tmp_path / "state", FakeStudent)  # type: ignore[arg-type]
    first = install(tmp_path, updater.store, 1)
    updater.store.activate(first)
    release = install(tmp_path, updater.store, 2)
    bundle = load_bundle(release)
    candidate = ReleaseCandidate("ab12", release, bundle, FakeStudent(bundle), False)  # type: ignore[arg-type]
    activated = updater.activate(candidate)
    save_error = OSError(errno.EROFS, os.strerror(errno.EROFS))

    def read_only(*_: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    # A file system remounted read-only fails the checkpoint and the rollback.
    monkeypatch.setattr(swap.os, "replace", read_only)
    status = json.loads(updater.roll_back(candidate, activated, save_error))
    monkeypatch.undo()

    link = updater.store.folder / "active"
    assert activated
    assert status["state"] == "rejected"
    assert status["reason"] == "install_failed"
    assert f"cannot point {link} back at the release before: " in status["detail"]
    assert "Read-only file system (EROFS)" in status["detail"]
    assert status["detail"].endswith(
        f"Release {release.name} stays marked as not accepted, so the daemon "
        "does not start it"
    )
    assert link.resolve() == release
    assert updater.store.active_release() == first
    assert updater.active_bundle(factory) == first


def test_wrong_checksum_is_rejected(tmp_path: Path) -> None:
    archive = pack_bundle(write_bundle(tmp_path / "bundle"))
    wrong = hashlib.sha256(b"another archive").digest()
    chunks = split_archive(archive, chunk_bytes=8 * 1024, digest=wrong)
    receiver = OtaReceiver(tmp_path / "ota")
    for chunk in chunks[:-1]:
        receiver.receive(chunk)
    with pytest.raises(
        OtaError, match="archive sha256 is .* the hub announced"
    ) as caught:
        receiver.receive(chunks[-1])
    assert caught.value.reason == "checksum_mismatch"
    assert [p.name for p in (tmp_path / "ota").iterdir()] == [FINISHED_TRANSFERS_FILE]


def test_corrupted_chunk_fails_checksum(tmp_path: Path) -> None:
    archive = pack_bundle(write_bundle(tmp_path / "bundle"))
    chunks = split_archive(archive, chunk_bytes=8 * 1024)
    damaged = bytearray(chunks[1])
    damaged[HEADER_BYTES + 100] ^= 0xFF
    chunks[1] = bytes(damaged)
    with pytest.raises(OtaError) as caught:
        receive_all(OtaReceiver(tmp_path / "ota"), chunks)
    assert caught.value.reason == "checksum_mismatch"


@pytest.mark.parametrize(
    ("mutate", "reason", "message"),
    [
        (lambda c: c[:10], "malformed", "shorter than its header"),
        (lambda c: b"XXXX" + c[4:], "malformed", "expected b'DSLB'"),
        (lambda c: c + b"extra", "malformed", "carries"),
        (
            lambda c: c[:33] + (7).to_bytes(4, "little") + c[37:],
            "malformed",
            "does not fit",
        ),
    ],
)
def test_malformed_chunks_are_rejected(
    tmp_path: Path, mutate: Any, reason: str, message: str
) -> None:
    archive = pack_bundle(write_bundle(tmp_path / "bundle"))
    chunk = split_archive(archive, chunk_bytes=8 * 1024)[0]
    with pytest.raises(OtaError, match=message) as caught:
        OtaReceiver(tmp_path / "ota").receive(mutate(chunk))
    assert caught.value.reason == reason


def test_oversized_archive_is_rejected_before_writing(tmp_path: Path) -> None:
    archive = pack_bundle(write_bundle(tmp_path / "bundle"))
    receiver = OtaReceiver(tmp_path / "ota", max_archive_bytes=1024)
    with pytest.raises(OtaError, match="exceeds the limit of 1024 bytes") as caught:
        receiver.receive(split_archive(archive)[0])
    assert caught.value.reason == "too_large"
    assert not (tmp_path / "ota").exists()


def test_new_transfer_replaces_unfinished_one(tmp_path: Path) -> None:
    first = split_archive(pack_bundle(write_bundle(tmp_path / "a")), 8 * 1024)
    second_archive = pack_bundle(write_bundle(tmp_path / "b", seed=1))
    second = split_archive(second_archive, 8 * 1024)
    receiver = OtaReceiver(tmp_path / "ota")
    receiver.receive(first[0])
    received = receive_all(receiver, second)
    assert received.path.read_bytes() == second_archive
    assert list((tmp_path / "ota").glob("*.part")) == []


def test_paused_transfer_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = pack_bundle(write_bundle(tmp_path / "a"))
    chunks = split_archive(archive, 8 * 1024)
    clock = FakeClock()
    receiver = OtaReceiver(tmp_path / "ota", stale_after_s=60, clock=clock)
    receiver.receive(chunks[0])
    clock.advance(61)

    with caplog.at_level(logging.INFO, logger="dslo_edge.ota"):
        received = receive_all(receiver, chunks[1:])

    assert received.path.read_bytes() == archive
    assert "goes on after 61 s without a chunk" in caplog.text


# Installing and switching releases


def test_install_activate_and_rollback(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    factory = write_bundle(tmp_path / "factory")
    assert store.active_path(factory) == factory

    releases = []
    for seed in (1, 2, 3):
        archive = tmp_path / f"update-{seed}.tar"
        archive.write_bytes(pack_bundle(write_bundle(tmp_path / f"b{seed}", seed=seed)))
        releases.append(store.install_archive(archive))
        store.activate(releases[-1])

    assert store.active_path(factory) == releases[2]
    assert load_bundle(store.active_path(factory)).manifest["class_count"] == 10
    installed = {p.name for p in store.folder.iterdir() if not p.is_symlink()}
    assert installed == {releases[1].name, releases[2].name}

    assert store.rollback() == releases[1]
    assert store.active_path(factory) == releases[1]
    assert store.rollback() is None
    assert store.active_path(factory) == factory


def test_activate_same_release_keeps_previous(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    first = install(tmp_path, store, 1)
    assert store.activate(first)
    second = install(tmp_path, store, 2)
    assert store.activate(second)

    assert not store.activate(second)

    assert store.active_release() == second
    assert store.rollback() == first


def write_probe(bundle: Path, labels: list[int]) -> bytes:
    """Write a probe.npz for the 64-input, 10-class test bundle; return its bytes."""
    x = np.full((len(labels), 64), len(labels), dtype=np.float32)
    np.savez(bundle / "probe.npz", x=x, y=np.array(labels))
    return (bundle / "probe.npz").read_bytes()


def install_bundle(tmp_path: Path, store: BundleStore, bundle: Path) -> Path:
    archive = tmp_path / "update.tar"
    archive.write_bytes(pack_bundle(bundle))
    return store.install_archive(archive)


def test_changed_probe_gets_new_release(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    bundle = write_bundle(tmp_path / "bundle")
    first_probe = write_probe(bundle, [0, 1])
    first = install_bundle(tmp_path, store, bundle)
    assert store.activate(first)

    second_probe = write_probe(bundle, [2, 3, 4])
    second = install_bundle(tmp_path, store, bundle)

    assert second != first
    assert (second / "probe.npz").read_bytes() == second_probe
    assert (first / "probe.npz").read_bytes() == first_probe
    assert store.activate(second)
    assert store.rollback() == first

    (bundle / "probe.npz").unlink()
    without_probe = install_bundle(tmp_path, store, bundle)

    assert without_probe not in (first, second)
    assert not (without_probe / "probe.npz").exists()
    assert without_probe.name == release_id(bundle) == model_id(bundle)


def test_kept_checkpoint_found_with_other_probe(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    write_probe(bundle, [0, 1])
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint(checkpoints, {"w": np.arange(3, dtype=np.float32)}, {"n": 1})
    kept = KeptCheckpoints(tmp_path / "state")
    assert kept.keep(load_bundle(bundle), checkpoints) is not None

    write_probe(bundle, [2, 3, 4])
    restored = kept.load(load_bundle(bundle))

    assert restored is not None
    assert restored.tensors["w"].tolist() == [0.0, 1.0, 2.0]


# A fixed past time for a tie, and a time after the next write, as after the
# clock of a board without a real-time clock stepped back.
EQUAL_MTIMES_NS = [1_700_000_000 * 10**9, 4_000_000_000 * 10**9]


@pytest.mark.parametrize("mtime_ns", EQUAL_MTIMES_NS)
def test_kept_checkpoints_equal_mtimes_prune_oldest(
    tmp_path: Path, mtime_ns: int
) -> None:
    checkpoints = tmp_path / "checkpoints"
    kept = KeptCheckpoints(tmp_path / "state")
    models = []
    for seed in range(4):
        bundle = load_bundle(write_bundle(tmp_path / f"bundle-{seed}", seed=seed))
        weights = {"w": np.full(2, seed, dtype=np.float32)}
        save_checkpoint(checkpoints, weights, {"n": seed})
        if seed == 3:
            # The three kept folders get one mtime, so the sequence numbers
            # of their checkpoints decide which one is the oldest.
            for model in models:
                os.utime(kept.folder / model, ns=(mtime_ns, mtime_ns))
        assert kept.keep(bundle, checkpoints) is not None
        models.append(model_id(bundle.path))

    remaining = sorted(path.name for path in kept.folder.iterdir())

    assert remaining == sorted(models[1:])
    newest = kept.load(load_bundle(tmp_path / "bundle-3"))
    assert newest is not None
    assert newest.tensors["w"].tolist() == [3.0, 3.0]


def test_active_link_loop_is_named(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    first = install(tmp_path, store, 1)
    factory = write_bundle(tmp_path / "factory")
    store.folder.joinpath("active").symlink_to("active")

    with pytest.raises(BundleError) as caught:
        store.active_path(factory)

    link = store.folder / "active"
    assert str(caught.value) == (
        f"{link} is a symlink loop, expected a link to a release directory in "
        f"{store.folder}; remove {link} so that the daemon starts from "
        f"device.bundle {factory}, or point it at one of the release directories "
        "there"
    )
    assert store.active_release() is None
    # Activating a release replaces the loop, which does not become "previous".
    assert store.activate(first)
    assert store.active_path(factory) == first
    assert not (store.folder / "previous").is_symlink()


def test_daemon_with_active_link_loop_exits_78(mlp_pair, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "bundles").mkdir(parents=True)
    link = state / "bundles" / "active"
    link.symlink_to("active")
    config = tmp_path / "device.toml"
    config.write_text(render_config("dev-a", mlp_pair.bundle, state, 9))

    result = run_cli("run", "--config", str(config))

    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {link} is a symlink loop")
    assert link.is_symlink()


def test_install_rejects_unsafe_archive(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    archive = tmp_path / "evil.tar"
    archive.write_bytes(buffer.getvalue())
    store = BundleStore(tmp_path / "state")
    with pytest.raises(OtaError, match="not a plain top-level file") as caught:
        store.install_archive(archive)
    assert caught.value.reason == "bad_bundle"
    assert not (tmp_path / "escape.txt").exists()
    assert [p.name for p in store.folder.iterdir()] == []


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (None, "received bundle is invalid: the archive has no manifest.json"),
        (b"{", "received bundle is invalid: manifest.json is not valid JSON"),
        (b"[]", "received bundle is invalid: manifest.json contains"),
    ],
    ids=["missing", "not JSON", "not an object"],
)
def test_install_rejects_archive_without_manifest(
    tmp_path: Path, manifest: bytes | None, message: str
) -> None:
    files = {"student.tflite": b"model"}
    if manifest is not None:
        files["manifest.json"] = manifest
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "release.tar"
    archive.write_bytes(buffer.getvalue())
    store = BundleStore(tmp_path / "state")

    with pytest.raises(OtaError) as caught:
        store.install_archive(archive)

    assert caught.value.reason == "bad_bundle"
    assert str(caught.value).startswith(message)
    assert list(store.folder.iterdir()) == []


def pack_every_file(bundle: Path) -> Path:
    """Pack every top-level file of a bundle folder, as an older ota-send did.

    That ota-send also wrote no ota-release.json.
    """
    archive = bundle.parent / "older-ota-send.tar"
    with tarfile.open(archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(bundle.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def test_install_older_sender_archive(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    store = BundleStore(tmp_path / "state")

    release = store.install_archive(pack_every_file(bundle))

    assert release.parent == store.folder
    assert (release / "student.tflite").is_file()


def test_install_older_sender_stray_file(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    (bundle / "notes.txt").write_text("trained on the March data\n")
    store = BundleStore(tmp_path / "state")

    with pytest.raises(OtaError) as caught:
        store.install_archive(pack_every_file(bundle))

    assert caught.value.reason == "bad_bundle"
    # The sender did use ota-send, so the message names the fixes that work.
    assert str(caught.value) == (
        "archive member 'notes.txt' is not a file that manifest.json names; "
        "the device accepts only manifest.json, the files it names, probe.npz "
        "and ota-release.json, which is all that a current 'dslo-edge ota-send' "
        "packs, but an older one packed every file of the bundle folder; remove "
        "'notes.txt' from the bundle folder or update dslo-edge on the sending "
        "machine, then send the bundle again"
    )
    assert list(store.folder.iterdir()) == []


def test_install_rejects_bundle_with_bad_file(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    archive_bytes = pack_bundle(bundle)
    (bundle / "student.tflite").write_bytes(b"changed after packing")
    buffer = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive_bytes)) as source,
        tarfile.open(fileobj=buffer, mode="w") as target,
    ):
        for member in source.getmembers():
            data = source.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "student.tflite":
                data = b"corrupt"
                member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    archive = tmp_path / "bad.tar"
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(OtaError, match="received bundle is invalid: checksum mismatch"):
        BundleStore(tmp_path / "state").install_archive(archive)


# Weight carry-over and the swap


def test_carry_over_matches_name_and_shape() -> None:
    old = {
        "dense_kernel": np.ones((64, 16)),
        "dense_bias": np.ones(16),
        "dense_1_kernel": np.ones((16, 10)),
        "dense_1_bias": np.ones(10),
    }
    new = {
        "dense_kernel": np.zeros((64, 24)),
        "dense_bias": np.zeros(24),
        "dense_1_kernel": np.zeros((24, 10)),
        "dense_1_bias": np.zeros(10),
        "extra_bias": np.zeros(3),
    }
    carry = carry_over_weights(old, new)
    assert carry.carried == ("dense_1_bias",)
    assert carry.reset == ("dense_kernel", "dense_bias", "dense_1_kernel", "extra_bias")
    assert np.all(carry.weights["dense_1_bias"] == 1)
    assert np.all(carry.weights["dense_kernel"] == 0)


def test_lost_weights_skip_optimizer_state() -> None:
    old = {
        "dense_kernel": np.ones((64, 16)),
        "dense_bias": np.ones(16),
        "optimizer__m__dense_kernel": np.ones((64, 16)),
    }
    same_model_sgd = {"dense_kernel": np.zeros((64, 16)), "dense_bias": np.zeros(16)}
    wider = {"dense_kernel": np.zeros((64, 24)), "dense_bias": np.zeros(24)}
    renamed = {"hidden_kernel": np.zeros((64, 16)), "dense_bias": np.zeros(16)}

    assert lost_weights(old, old) is None
    assert lost_weights(old, same_model_sgd) is None
    assert lost_weights(old, wider) == (
        "another student: dense_kernel of shape (64, 24), not (64, 16); "
        "dense_bias of shape (24,), not (16,)"
    )
    assert lost_weights(old, renamed) == "another student: no weight dense_kernel"


def install(tmp_path: Path, store: BundleStore, seed: int, **shape: int) -> Path:
    archive = tmp_path / f"update-{seed}.tar"
    archive.write_bytes(
        pack_bundle(write_bundle(tmp_path / f"b{seed}", seed=seed, **shape))
    )
    return store.install_archive(archive)


def test_swap_carries_weights_and_activates(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    current = FakeStudent(load_bundle(write_bundle(tmp_path / "factory")), seed=5)
    release = install(tmp_path, store, 1)

    result = swap_student(store, release, current, lambda b: FakeStudent(b, seed=9))

    assert result.swapped
    assert result.student is not current
    assert set(result.carried) == set(current.weights)
    for name, value in current.get_weights().items():
        np.testing.assert_array_equal(result.student.get_weights()[name], value)
    assert store.active_path(tmp_path) == release


def test_swap_rolls_back_on_failed_health_check(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    current = FakeStudent(load_bundle(write_bundle(tmp_path / "factory")))
    good = install(tmp_path, store, 1)
    first = swap_student(store, good, current, FakeStudent)
    assert first.swapped
    bad = install(tmp_path, store, 2)

    result = swap_student(
        store, bad, first.student, lambda b: FakeStudent(b, broken=True)
    )

    assert not result.swapped
    assert result.student is first.student
    assert "NaN or infinity" in (result.reason or "")
    assert result.release == good
    assert store.active_path(tmp_path) == good


def test_health_check_names_running_not_unaccepted(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    factory = write_bundle(tmp_path / "factory")
    running = install(tmp_path, store, 1)
    store.activate(running, pending=True)
    store.accept(running)
    # The daemon stopped after switching to this release, before accepting it,
    # so at its next start it runs the release before.
    unaccepted = install(tmp_path, store, 2)
    store.activate(unaccepted, pending=True)
    current = FakeStudent(load_bundle(store.active_path(factory)))
    bad = install(tmp_path, store, 3)

    result = swap_student(store, bad, current, lambda b: FakeStudent(b, broken=True))

    assert current.bundle.path == running
    assert not result.swapped
    assert result.release == running
    assert store.active_release() == running


def test_swap_keeps_current_when_bundle_cannot_load(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    current = FakeStudent(load_bundle(write_bundle(tmp_path / "factory")))
    release = install(tmp_path, store, 1)
    (release / "student.tflite").write_bytes(b"damaged on disk")
    result = swap_student(store, release, current, FakeStudent)
    assert not result.swapped
    assert "checksum mismatch" in (result.reason or "")
    assert store.active_path(tmp_path / "factory") == tmp_path / "factory"


def test_failed_health_check_leaves_factory_active(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "state")
    factory = write_bundle(tmp_path / "factory")
    current = FakeStudent(load_bundle(factory))
    release = install(tmp_path, store, 1)

    result = swap_student(
        store, release, current, lambda b: FakeStudent(b, broken=True)
    )

    assert not result.swapped
    assert result.release is None
    assert store.active_release() is None
    assert store.active_path(factory) == factory


def manifest_bundle(inputs: int, classes: int | dict[str, int]) -> Bundle:
    manifest: dict[str, Any] = {"input": {"shape": [None, inputs]}}
    if isinstance(classes, int):
        manifest["class_count"] = classes
    else:
        manifest["heads"] = [
            {"name": name, "class_count": count} for name, count in classes.items()
        ]
    return Bundle(Path("bundle"), manifest)


@pytest.mark.parametrize(
    ("new", "change"),
    [
        (manifest_bundle(64, 10), None),
        (
            manifest_bundle(32, 10),
            "input 32 and 10 classes, but the running model has input 64 and "
            "10 classes",
        ),
        (manifest_bundle(64, 5), "input 64 and 5 classes, but"),
        (manifest_bundle(64, {"kind": 10}), "input 64 and heads kind 10 (classes)"),
    ],
)
def test_model_change_single_head(new: Bundle, change: str | None) -> None:
    described = model_change(manifest_bundle(64, 10), new)
    if change is None:
        assert described is None
    else:
        assert described is not None
        assert described.startswith(change)


def test_model_change_heads() -> None:
    current = manifest_bundle(64, {"kind": 3, "size": 4})
    assert model_change(current, manifest_bundle(64, {"kind": 3, "size": 4})) is None
    changed = model_change(current, manifest_bundle(64, {"kind": 3, "size": 5}))
    assert changed == (
        "input 64 and heads kind 3, size 5 (classes), but the running model has "
        "input 64 and heads kind 3, size 4 (classes)"
    )
    renamed = model_change(current, manifest_bundle(64, {"kind": 3, "shape": 4}))
    assert renamed is not None


def send_to_updater(
    updater: ModelUpdater, current: FakeStudent, archive: bytes
) -> UpdateOutcome:
    outcomes = [
        updater.handle_chunk(chunk, current)  # type: ignore[arg-type]
        for chunk in split_archive(archive, 8 * 1024)
    ]
    assert all(outcome.status is None for outcome in outcomes[:-1])
    return outcomes[-1]


def test_updater_without_key_names_signed_chunk(tmp_path: Path) -> None:
    from dslo_edge.signing import sign

    factory = write_bundle(tmp_path / "factory")
    current = FakeStudent(load_bundle(factory))
    updater = ModelUpdater(tmp_path / "state", FakeStudent)  # type: ignore[arg-type]
    chunk = split_archive(pack_bundle(factory), 1 << 20)[0]

    outcome = updater.handle_chunk(
        sign(b"k" * 32, "dslo/porch/ota", chunk),
        current,  # type: ignore[arg-type]
    )

    assert outcome.status is not None
    status = json.loads(outcome.status)
    assert status["state"] == "rejected"
    assert status["reason"] == "unexpected_signature"
    assert "this device has no HMAC key" in status["detail"]


def test_rejected_transfer_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dslo_edge.model_update import REJECTION_LOG_INTERVAL_S

    clock = FakeClock()
    factory = write_bundle(tmp_path / "factory")
    current = FakeStudent(load_bundle(factory))
    updater = ModelUpdater(
        tmp_path / "state",
        FakeStudent,  # type: ignore[arg-type]
        clock=clock,
    )
    updater.receiver.max_archive_bytes = 1024
    archive = pack_bundle(write_bundle(tmp_path / "new"))
    first = split_archive(archive, 4096)
    second = split_archive(archive, 4096)

    with caplog.at_level(logging.INFO, logger="dslo_edge"):
        outcomes = [
            updater.handle_chunk(chunk, current)  # type: ignore[arg-type]
            for chunk in first[:-1]
        ]
        clock.advance(REJECTION_LOG_INTERVAL_S + 1)
        outcomes.append(updater.handle_chunk(first[-1], current))  # type: ignore[arg-type]
        for chunk in second:
            updater.handle_chunk(chunk, current)  # type: ignore[arg-type]

    first_id = peek_transfer_id(first[0])
    second_id = peek_transfer_id(second[0])
    rejection = (
        f"(too_large): bundle archive of {len(archive)} bytes exceeds the limit "
        "of 1024 bytes"
    )
    assert len(first) == 10
    assert [record.getMessage() for record in caplog.records] == [
        f"Rejected model transfer {first_id} {rejection}",
        f"Rejected model transfer {first_id} {rejection} (8 more chunks rejected "
        "for this reason since the last line)",
        f"Rejected model transfer {second_id} {rejection}",
    ]
    assert {record.levelno for record in caplog.records} == {logging.WARNING}
    # Every chunk still gets its status, so a sender that joins late learns it.
    statuses = [json.loads(outcome.status or "null") for outcome in outcomes]
    assert [status["reason"] for status in statuses] == ["too_large"] * 10
    assert {status["transfer"] for status in statuses} == {first_id}


def test_updater_rejects_other_model(tmp_path: Path) -> None:
    factory = write_bundle(tmp_path / "factory")
    current = FakeStudent(load_bundle(factory), seed=5)
    before = current.get_weights()
    updater = ModelUpdater(tmp_path / "state", FakeStudent)  # type: ignore[arg-type]
    other = write_bundle(tmp_path / "other", inputs=32, classes=5, seed=3)

    outcome = send_to_updater(updater, current, pack_bundle(other))

    assert outcome.status is not None
    status = json.loads(outcome.status)
    assert status["state"] == "rejected"
    assert status["reason"] == "model_mismatch"
    assert status["transfer"] is not None
    assert (
        "has input 32 and 5 classes, but the running model has input 64 and "
        in (status["detail"])
    )
    assert "'ota-send --allow-model-change'" in status["detail"]
    assert outcome.candidate is None
    assert updater.store.active_path(factory) == factory
    assert list(updater.store.folder.iterdir()) == []
    for name, value in before.items():
        np.testing.assert_array_equal(current.get_weights()[name], value)


# Through a real broker


class DeviceReceiver:
    """A device-side client that feeds OTA chunks into an OtaReceiver."""

    def __init__(self, broker: Broker, receiver: OtaReceiver):
        self.receiver = receiver
        self.results: queue.Queue[ReceivedArchive | OtaError] = queue.Queue()
        subscribed = threading.Event()
        chunk_topic, _ = ota_topics(TOPICS)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="device")
        self.client.on_connect = lambda client, *_: client.subscribe(chunk_topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert subscribed.wait(TIMEOUT_S), "subscription timed out"

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            result = self.receiver.receive(bytes(message.payload))
        except OtaError as error:
            self.results.put(error)
            return
        if result is not None:
            self.results.put(result)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def hub_client(broker: Broker) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hub")
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    return client


def test_update_over_broker_is_installed(tmp_path: Path, broker: Broker) -> None:
    store = BundleStore(tmp_path / "state")
    device = DeviceReceiver(broker, OtaReceiver(tmp_path / "state/ota"))
    hub = hub_client(broker)
    bundle = write_bundle(tmp_path / "new", student_bytes=300_000, seed=4)

    transfer = send_bundle(hub, TOPICS, bundle, chunk_bytes=32 * 1024)

    result = device.results.get(timeout=TIMEOUT_S)
    assert isinstance(result, ReceivedArchive)
    assert result.transfer_id == transfer
    release = store.install_archive(result.path)
    store.activate(release)
    assert load_bundle(store.active_path(tmp_path)).path == release
    assert (release / "student.tflite").read_bytes() == (
        bundle / "student.tflite"
    ).read_bytes()
    hub.disconnect()
    hub.loop_stop()
    device.close()


def test_bad_checksum_over_broker_keeps_old(tmp_path: Path, broker: Broker) -> None:
    store = BundleStore(tmp_path / "state")
    old = install(tmp_path, store, 1)
    store.activate(old)
    device = DeviceReceiver(broker, OtaReceiver(tmp_path / "state/ota"))
    hub = hub_client(broker)
    archive = pack_bundle(write_bundle(tmp_path / "new", seed=2))
    chunk_topic, _ = ota_topics(TOPICS)
    wrong = hashlib.sha256(b"not this archive").digest()

    for chunk in split_archive(archive, 8 * 1024, digest=wrong):
        hub.publish(chunk_topic, chunk, qos=1).wait_for_publish(timeout=TIMEOUT_S)

    result = device.results.get(timeout=TIMEOUT_S)
    assert isinstance(result, OtaError)
    assert result.reason == "checksum_mismatch"
    assert store.active_path(tmp_path) == old
    assert [p.name for p in (tmp_path / "state/ota").iterdir()] == [
        FINISHED_TRANSFERS_FILE
    ]
    hub.disconnect()
    hub.loop_stop()
    device.close()


# With real converted students


@pytest.fixture(scope="module")
def converted_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Convert three 64-input students: two 64-16-10 and one 64-24-10.

    The layers are named, because weight names come from layer names and
    Keras numbers unnamed layers per process.
    """
    keras = pytest.importorskip("keras")
    from converters.bundle import convert_bundle

    folder = tmp_path_factory.mktemp("ota-students")
    bundles = {}
    for name, hidden, seed in (("old", 16, 1), ("same", 16, 2), ("wider", 24, 3)):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(hidden, activation="relu", name="hidden"),
                keras.layers.Dense(10, activation="softmax", name="scores"),
            ]
        )
        bundles[name] = folder / name
        convert_bundle(model, model, bundles[name])
    return bundles


@pytest.mark.slow
def test_real_students_swap_and_carry_weights(
    tmp_path: Path, converted_bundles: dict[str, Path]
) -> None:
    from dslo_edge.models import StudentModel

    current = StudentModel(load_bundle(converted_bundles["old"]))
    adapted = {name: value + 0.5 for name, value in current.get_weights().items()}
    current.set_weights(adapted)
    check_student_health(current)
    store = BundleStore(tmp_path / "state")

    for name in ("same", "wider"):
        archive = tmp_path / f"{name}.tar"
        archive.write_bytes(pack_bundle(converted_bundles[name]))
        release = store.install_archive(archive)
        result = swap_student(store, release, current, StudentModel)
        assert result.swapped, result.reason
        weights = result.student.get_weights()
        if name == "same":
            assert set(result.carried) == set(adapted)
            for key, value in adapted.items():
                np.testing.assert_allclose(weights[key], value, rtol=1e-6)
        else:
            assert result.carried == ("scores_bias",)
            np.testing.assert_allclose(weights["scores_bias"], adapted["scores_bias"])
            assert weights["hidden_kernel"].shape == (64, 24)
        probabilities = result.student.infer(np.zeros((3, 64), dtype=np.float32))
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert store.active_path(tmp_path) == release


@pytest.mark.slow
def test_health_check_of_two_head_student(two_head_bundle: Path) -> None:
    from dslo_edge.multihead_model import MultiHeadStudentModel

    student = MultiHeadStudentModel(load_bundle(two_head_bundle))
    check_student_health(student)

    weights = student.get_weights()
    weights["shape_bias"] = np.full_like(weights["shape_bias"], np.nan)
    student.set_weights(weights)
    with pytest.raises(OtaError, match="head 'shape' output contains NaN") as error:
        check_student_health(student)
    assert error.value.reason == "health_check"


def ota_send(broker: Broker, bundle: Path, *options: str) -> Any:
    from click.testing import CliRunner

    from dslo_edge.cli import main

    arguments = [
        "ota-send",
        str(bundle),
        "--device",
        "kitchen-cam",
        "--broker",
        f"mqtt://{broker.host}:{broker.port}",
        "--chunk-size",
        "4096",
        *options,
    ]
    return CliRunner().invoke(main, arguments)


def test_ota_send_times_out_without_outcome(tmp_path: Path, broker: Broker) -> None:
    # This receiver assembles the chunks but, unlike a daemon, reports nothing.
    device = DeviceReceiver(broker, OtaReceiver(tmp_path / "state/ota"))
    bundle = write_bundle(tmp_path / "new", seed=6)

    result = ota_send(broker, bundle, "--timeout", "1")

    device.close()
    received = device.results.get(timeout=TIMEOUT_S)
    assert isinstance(received, ReceivedArchive)
    assert f"as transfer {received.transfer_id}" in result.output
    assert received.path.read_bytes() == pack_bundle(bundle)
    assert result.exit_code == 1
    assert (
        f"error: device kitchen-cam reported no outcome for transfer "
        f"{received.transfer_id} within 1 s" in result.output
    )
    assert "raise --timeout" in result.output


def test_ota_send_rejects_oversized_bundle(tmp_path: Path, broker: Broker) -> None:
    bundle = write_bundle(tmp_path / "big", student_bytes=DEFAULT_MAX_ARCHIVE_BYTES)
    published: list[str] = []
    subscribed = threading.Event()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher")
    watcher.on_subscribe = lambda *_: subscribed.set()
    watcher.on_message = lambda _c, _u, message: published.append(message.topic)
    watcher.connect(broker.host, broker.port, keepalive=30)
    watcher.loop_start()
    watcher.subscribe("dslo/#", qos=1)
    assert subscribed.wait(TIMEOUT_S)

    result = ota_send(broker, bundle)

    # ota-send has exited, so any chunk it published reached the broker
    # before this marker, and the broker forwards both in that order.
    watcher.publish("dslo/marker", b"end", qos=1).wait_for_publish(TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while "dslo/marker" not in published and time.monotonic() < deadline:
        time.sleep(0.05)
    watcher.disconnect()
    watcher.loop_stop()
    assert result.exit_code == 1
    assert "packs to about 64.0 MiB, above the 64 MiB a device accepts" in (
        result.output
    )
    assert "sent" not in result.output
    assert published == ["dslo/marker"]


def test_status_payload_fields() -> None:
    import json

    from dslo_edge.ota import status_payload

    document = json.loads(
        status_payload("rejected", "ab12", reason="checksum_mismatch", detail="x")
    )
    assert document["state"] == "rejected"
    assert document["transfer"] == "ab12"
    assert document["reason"] == "checksum_mismatch"
    assert document["release"] is None
    with pytest.raises(ValueError, match="OTA state 'done' is invalid"):
        status_payload("done", None)


def test_check_outcome_messages() -> None:
    from dslo_edge.ota_sender import check_outcome

    installed = {"state": "installed", "transfer": "ab12", "release": "r1"}
    assert check_outcome(installed, TOPICS, "kitchen-cam", "ab12", 5) == (
        "device kitchen-cam installed release r1"
    )
    rolled_back = {
        "state": "rolled_back",
        "transfer": "ab12",
        "release": "r0",
        "reason": "health_check",
        "detail": "student output contains NaN or infinity",
    }
    with pytest.raises(OtaError) as caught:
        check_outcome(rolled_back, TOPICS, "kitchen-cam", "ab12", 5)
    assert caught.value.reason == "health_check"
    assert str(caught.value) == (
        "device kitchen-cam rolled back transfer ab12 and runs r0 again: "
        "health_check: student output contains NaN or infinity; the new student "
        "returns outputs that are not finite probabilities or has weights that "
        "are not finite, so convert the model again (with a softmax output) and "
        "send it again"
    )
    with pytest.raises(OtaError, match="no outcome for transfer ab12 within 5 s"):
        check_outcome(None, TOPICS, "kitchen-cam", "ab12", 5)


@pytest.mark.parametrize(
    ("reason", "detail", "step"),
    [
        (
            "too_large",
            "bundle archive of 9000 bytes exceeds the limit of 4096 bytes",
            "; shrink the model or install it with 'dslo-edge flash'",
        ),
        (
            "malformed",
            "chunk starts with b'DSLB' version 2, expected b'DSLB' version 1",
            "; the chunks do not follow the device's chunk format, so send the "
            "bundle with the 'dslo-edge ota-send' of the device's dslo-edge version",
        ),
        (
            "bad_signature",
            "signed envelope is truncated or of an unknown version",
            "; send it again with --hmac-key-file set to this device's key, the "
            "file that its security.hmac_key_file names",
        ),
        (
            "bad_bundle",
            "archive member 'a/b' is not a plain top-level file",
            "; check the bundle with 'dslo-edge inspect BUNDLE', and send a bundle "
            "directory that 'dslo-edge convert' wrote",
        ),
        (
            "install_failed",
            "RuntimeError: interpreter crashed",
            "; the device hit an unexpected error and logged its traceback: read "
            "the device's log, then send the bundle again",
        ),
        (
            "reason_from_a_newer_device",
            "something new",
            "; this dslo-edge version does not know the reason: read the device's log",
        ),
        # These details end with the fix, so nothing is added.
        ("checksum_mismatch", "archive sha256 is 00; so send it again", ""),
        ("state_dir_write_failed", "cannot store the transfer in /s/ota: ...", ""),
        ("model_mismatch", "release r1 has input 32 ... --allow-model-change", ""),
    ],
)
def test_check_outcome_adds_next_step(reason: str, detail: str, step: str) -> None:
    from dslo_edge.ota_sender import check_outcome

    status = {"state": "rejected", "transfer": "ab12", "reason": reason}
    status["detail"] = detail

    with pytest.raises(OtaError) as caught:
        check_outcome(status, TOPICS, "kitchen-cam", "ab12", 5)

    assert caught.value.reason == reason
    assert str(caught.value) == (
        f"device kitchen-cam rejected transfer ab12: {reason}: {detail}{step}"
    )


def test_release_after_unaccepted_one_rolls_back(tmp_path: Path) -> None:
    factory = write_bundle(tmp_path / "factory")
    store = BundleStore(tmp_path / "state")
    running = install(tmp_path, store, 1)
    store.activate(running, pending=True)
    store.accept(running)
    # The daemon stopped after switching to this release, before accepting it.
    unaccepted = install(tmp_path, store, 2)
    store.activate(unaccepted, pending=True)
    started = store.active_path(factory)
    failing = install(tmp_path, store, 3)

    store.activate(failing, pending=True)
    previous = store.folder / "previous"
    previous_target = previous.resolve()
    restored = store.rollback()

    assert started == running
    assert previous_target == running
    assert running.is_dir()
    assert restored == running
    assert store.active_path(factory) == running


@pytest.mark.parametrize(
    "unparsable",
    [
        # json.loads rejects an int of more than 4300 digits with a ValueError.
        b'{"state": "installed", "n": 1' + b"0" * 5000 + b"}",
        # Lists nested deeper than its recursion limit raise RecursionError.
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["int-too-long", "deep-lists"],
)
def test_status_watcher_survives_unparsable_json(broker, unparsable: bytes) -> None:
    topics = Topics.for_device("d1")
    watcher_client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    watcher_client.connect("127.0.0.1", broker.port)
    watcher_client.loop_start()
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    try:
        watcher = StatusWatcher(watcher_client, topics)
        watcher.subscribe(10)
        _, status_topic = ota_topics(topics)
        # The error of json.loads must not end the watcher's network thread.
        device.publish(status_topic, unparsable, qos=1).wait_for_publish(10)
        final = {"state": "installed", "transfer": "ab" * 16}
        device.publish(status_topic, json.dumps(final), qos=1).wait_for_publish(10)

        assert watcher.wait("ab" * 16, 10) == final
        assert watcher_client.is_connected()
    finally:
        for client in (watcher_client, device):
            client.disconnect()
            client.loop_stop()


def test_status_watcher_subscribes_again_after_reconnect(broker_factory) -> None:
    broker = broker_factory("mosquitto")
    topics = Topics.for_device("d1")
    watcher_client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    watcher_client.reconnect_delay_set(min_delay=1, max_delay=1)
    watcher_client.connect("127.0.0.1", broker.port)
    watcher_client.loop_start()
    device = None
    try:
        watcher = StatusWatcher(watcher_client, topics)
        watcher.subscribe(10)
        # The restarted broker has no session of the watcher's client.
        broker.restart()
        device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        device.connect("127.0.0.1", broker.port)
        device.loop_start()
        _, status_topic = ota_topics(topics)
        final = {"state": "installed", "transfer": "cd" * 16}
        device.publish(
            status_topic, json.dumps(final), qos=1, retain=True
        ).wait_for_publish(10)

        assert watcher.wait("cd" * 16, 15) == final
    finally:
        for client in (watcher_client, device):
            if client is not None:
                client.disconnect()
                client.loop_stop()
