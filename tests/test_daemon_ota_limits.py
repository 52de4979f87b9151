"""Hostile model update transfers that the running daemon must reject cheaply."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
import tracemalloc

import pytest

from dslo_edge.cli_device import ota_send
from dslo_edge.ota import (
    _HEADER,
    FORMAT_VERSION,
    MAGIC,
    MIN_CHUNK_BYTES,
    ota_topics,
    split_archive,
)
from dslo_edge.ota_sender import pack_bundle
from dslo_edge.protocol import Topics
from tests.test_daemon_ota import (
    DEVICE,
    hub_client,
    start_daemon,
    status_listener,
    wait_until,
)

MIB = 2**20


def empty_members_archive(count: int) -> bytes:
    """Return a tar archive of ``count`` empty files, 512 header bytes each."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(count):
            tar.addfile(tarfile.TarInfo(f"m{index}"))
    return buffer.getvalue()


def test_many_members_rejected_without_reading_all(
    mlp_pair, mosquitto, tmp_path
) -> None:
    # 40,000 headers in a 20 MiB archive. Reading every header before the
    # member count check held about 17 MiB of TarInfo objects.
    chunks = split_archive(empty_members_archive(40_000), 256 * 1024)
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto)
    listener, statuses = status_listener(mosquitto)
    hub = hub_client(mosquitto)
    chunk_topic = ota_topics(Topics.for_device(DEVICE))[0]
    try:
        for chunk in chunks[:-1]:
            hub.publish(chunk_topic, chunk, qos=1).wait_for_publish(10)
        waiting = (len(chunks) - 1, len(chunks))
        wait_until(lambda: daemon.updater.receiver.progress == waiting)
        # Only the install that the last chunk starts is measured.
        tracemalloc.start()
        try:
            hub.publish(chunk_topic, chunks[-1], qos=1).wait_for_publish(10)
            wait_until(lambda: statuses)
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        bundle_after = daemon.bundle.path
    finally:
        daemon.stop()
        for client in (hub, listener):
            client.loop_stop()
            client.disconnect()

    assert len(chunks) == 79
    assert statuses[-1]["state"] == "rejected"
    assert statuses[-1]["reason"] == "bad_bundle"
    assert "at most 16 are allowed" in statuses[-1]["detail"]
    assert peak_bytes < 4 * MIB
    assert bundle_after == mlp_pair.bundle


def bundle_with_extra_member(bundle, extra: tarfile.TarInfo) -> bytes:
    """Return the archive ota-send packs for ``bundle``, with ``extra`` added."""
    buffer = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(pack_bundle(bundle))) as source,
        tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member))
        tar.addfile(extra, io.BytesIO(b""))
    return buffer.getvalue()


def send_archive(mosquitto, tmp_path, bundle, archive: bytes):
    """Send ``archive`` to a daemon running ``bundle``.

    Returns the last OTA status, the ``model_updates`` counts and the bundle
    that the daemon runs after it.
    """
    daemon = start_daemon(tmp_path, bundle, mosquitto)
    listener, statuses = status_listener(mosquitto)
    hub = hub_client(mosquitto)
    chunk_topic = ota_topics(Topics.for_device(DEVICE))[0]
    try:
        for chunk in split_archive(archive, 8192):
            hub.publish(chunk_topic, chunk, qos=1).wait_for_publish(10)
        wait_until(lambda: statuses)
        counts = daemon.model_updates.report()
        running = daemon.bundle.path
    finally:
        daemon.stop()
        for client in (hub, listener):
            client.loop_stop()
            client.disconnect()
    return statuses[-1], counts, running


def state_bytes(state) -> int:
    return sum(path.stat().st_size for path in state.rglob("*") if path.is_file())


def test_sparse_member_rejected(mlp_pair, mosquitto, tmp_path) -> None:
    # A GNU sparse member (PAX format 0.1) that declares 80 MiB and stores no
    # data. The archive of the 64-16-10 bundle has about 50 KiB.
    sparse = tarfile.TarInfo("zeros")
    sparse.pax_headers = {"GNU.sparse.map": "0,0", "GNU.sparse.size": str(80 * MIB)}
    archive = bundle_with_extra_member(mlp_pair.bundle, sparse)

    status, counts, running = send_archive(
        mosquitto, tmp_path, mlp_pair.bundle, archive
    )

    assert len(archive) < MIB
    assert status["state"] == "rejected"
    assert status["reason"] == "bad_bundle"
    assert "'zeros' is a sparse file of 83886080 bytes" in status["detail"]
    assert counts["rejected"] == {"bad_bundle": 1}
    assert counts["installed"] == 0
    assert running == mlp_pair.bundle
    assert state_bytes(tmp_path / "state") < MIB


@pytest.mark.parametrize(
    ("pax_path", "shown"),
    [("a" * 300, "a" * 64), ("a\x00b", "a\x00b")],
    ids=["300-byte name", "NUL in name"],
)
def test_invalid_member_name_rejected(
    mlp_pair, mosquitto, tmp_path, pax_path, shown
) -> None:
    # A PAX header sets the name, because a ustar header has no room for
    # either name.
    member = tarfile.TarInfo("placeholder")
    member.pax_headers = {"path": pax_path}
    archive = bundle_with_extra_member(mlp_pair.bundle, member)

    status, counts, running = send_archive(
        mosquitto, tmp_path, mlp_pair.bundle, archive
    )

    assert status["state"] == "rejected"
    assert status["reason"] == "bad_bundle"
    assert f"archive member {shown!r} is not a valid file name" in status["detail"]
    assert counts["rejected"] == {"bad_bundle": 1}
    assert running == mlp_pair.bundle
    assert list((tmp_path / "state" / "bundles").iterdir()) == []


def test_member_outside_manifest_rejected(mlp_pair, mosquitto, tmp_path) -> None:
    archive = bundle_with_extra_member(mlp_pair.bundle, tarfile.TarInfo("notes.txt"))

    status, counts, running = send_archive(
        mosquitto, tmp_path, mlp_pair.bundle, archive
    )

    assert status["state"] == "rejected"
    assert status["reason"] == "bad_bundle"
    assert status["detail"] == (
        "archive member 'notes.txt' is not a file that manifest.json names; "
        "the device accepts only manifest.json, the files it names, probe.npz "
        "and ota-release.json, which is all that a current 'dslo-edge ota-send' "
        "packs, but an older one packed every file of the bundle folder; remove "
        "'notes.txt' from the bundle folder or update dslo-edge on the sending "
        "machine, then send the bundle again"
    )
    assert counts["rejected"] == {"bad_bundle": 1}
    assert counts["installed"] == 0
    assert running == mlp_pair.bundle
    assert list((tmp_path / "state" / "bundles").iterdir()) == []


def test_tiny_chunks_rejected(mlp_pair, mosquitto, tmp_path) -> None:
    # One-byte chunks of a 60 MiB archive would take 62,914,560 messages,
    # each adding an index to the set of received chunks.
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, b"t" * 16, 60 * MIB, 1, 0, 60 * MIB, b"\0" * 32
    )
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto)
    listener, statuses = status_listener(mosquitto)
    hub = hub_client(mosquitto)
    chunk_topic = ota_topics(Topics.for_device(DEVICE))[0]
    try:
        hub.publish(chunk_topic, header + b"x", qos=1).wait_for_publish(10)
        wait_until(lambda: statuses or daemon.updater.receiver.progress)
        progress = daemon.updater.receiver.progress
    finally:
        daemon.stop()
        for client in (hub, listener):
            client.loop_stop()
            client.disconnect()

    assert progress is None
    assert statuses[-1]["state"] == "rejected"
    assert statuses[-1]["reason"] == "malformed"
    assert "chunk size 1 is below 1024 bytes" in statuses[-1]["detail"]
    assert list((tmp_path / "state" / "ota").glob("*.part")) == []


def test_ota_send_chunk_size_floor_matches_device() -> None:
    # The device's rejection message names ota-send as the fix, so
    # every --chunk-size that ota-send takes must pass the device's check.
    (option,) = [p for p in ota_send.params if p.name == "chunk_size"]
    assert option.type.min == MIN_CHUNK_BYTES


def test_chunk_queue_bounded_by_bytes(mlp_pair, mosquitto, tmp_path) -> None:
    archive = os.urandom(40 * MIB)
    chunks = split_archive(archive, MIB)
    daemon = start_daemon(tmp_path, mlp_pair.bundle, mosquitto)
    listener, statuses = status_listener(mosquitto)
    hub = hub_client(mosquitto)
    chunk_topic = ota_topics(Topics.for_device(DEVICE))[0]
    # The trainer stops in the first chunk's handler, so the rest wait.
    handle_chunk = daemon.updater.handle_chunk
    holding = threading.Event()
    release = threading.Event()

    def held_handle_chunk(*args, **kwargs):
        if not holding.is_set():
            holding.set()
            release.wait(60)
        return handle_chunk(*args, **kwargs)

    daemon.updater.handle_chunk = held_handle_chunk
    try:
        hub.publish(chunk_topic, chunks[0], qos=1).wait_for_publish(10)
        wait_until(holding.is_set)
        for chunk in chunks[1:]:
            hub.publish(chunk_topic, chunk, qos=1).wait_for_publish(10)
        wait_until(lambda: daemon.ota_chunks.qsize() >= 15)
        # Gives the network thread time to queue chunks past the bound.
        time.sleep(1.0)
        queued = daemon.ota_chunks.qsize()
        release.set()
        # Chunks left out are delivered again after the device reconnects.
        wait_until(lambda: statuses, timeout=120)
        received = daemon.updater.receiver.finished.outcome(chunks[0][5:21])
    finally:
        release.set()
        daemon.stop()
        for client in (hub, listener):
            client.loop_stop()
            client.disconnect()

    assert len(chunks) == 40
    # 16 MiB fits 15 chunks of 1 MiB plus their 73-byte headers.
    assert queued == 15
    assert statuses[-1]["reason"] == "bad_bundle"
    assert received == "complete"
