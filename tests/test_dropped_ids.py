"""The record of dropped update ids, written to and read from real files."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from pathlib import Path

import pytest

from dslo_edge.dropped_ids import (
    DROPPED_IDS_FILE,
    DROPPED_IDS_RESERVE_FILE,
    DroppedIds,
)


def ids(*numbers: int) -> list[bytes]:
    return [number.to_bytes(16, "big") for number in numbers]


def test_recorded_ids_read_back(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / DROPPED_IDS_FILE
    DroppedIds(path, 10).record(ids(1, 2))
    DroppedIds(path, 10).record(ids(3))  # a new record does not read the file

    loaded = DroppedIds(path, 10)
    loaded.load()

    assert list(loaded) == ids(3)
    assert path.stat().st_size == 16 + 32
    assert not path.with_suffix(".tmp").exists()


def test_record_keeps_loaded_ids(tmp_path: Path) -> None:
    path = tmp_path / DROPPED_IDS_FILE
    DroppedIds(path, 10).record(ids(1, 2))
    record = DroppedIds(path, 10)
    record.load()
    record.record(ids(3))

    loaded = DroppedIds(path, 10)
    loaded.load()

    assert list(loaded) == ids(1, 2, 3)


def test_capacity_evicts_oldest_ids(tmp_path: Path) -> None:
    path = tmp_path / DROPPED_IDS_FILE
    DroppedIds(path, 2).record(ids(1, 2, 3))

    loaded = DroppedIds(path, 2)
    loaded.load()

    assert list(loaded) == ids(2, 3)


def test_missing_file_is_empty(tmp_path: Path) -> None:
    record = DroppedIds(tmp_path / DROPPED_IDS_FILE, 10)
    record.load()

    assert len(record) == 0


def test_damaged_file_ignored_with_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / DROPPED_IDS_FILE
    DroppedIds(path, 10).record(ids(1, 2))
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x01" * 20)
    uneven = tmp_path / "uneven.bin"
    body = b"\x02" * 20
    uneven.write_bytes(body + hashlib.sha256(body).digest())

    for damaged in (path, short, uneven):
        record = DroppedIds(damaged, 10)
        with caplog.at_level(logging.WARNING, logger="dslo_edge.dropped_ids"):
            record.load()
        assert len(record) == 0, damaged
    assert caplog.text.count("Ignoring damaged record of dropped updates") == 3


def limit_folder(monkeypatch, folder: Path, free_bytes: int) -> None:
    """Make os.fsync raise ENOSPC while the files in ``folder`` exceed ``free_bytes``.

    It simulates a small disk for tests that cannot mount one. The files
    are real, and the error comes where a file system with delayed allocation
    reports a full disk: at the fsync of the data written.
    """
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        used = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
        if used > free_bytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)


def test_reserve_size_follows_record(tmp_path: Path) -> None:
    record = DroppedIds(tmp_path / DROPPED_IDS_FILE, 10, headroom=4)
    reserve = tmp_path / DROPPED_IDS_RESERVE_FILE

    wrote_first = record.reserve()
    first_size = reserve.stat().st_size
    wrote_again = record.reserve()
    record.record(ids(1, 2, 3))
    grew = record.reserve()
    grown_size = reserve.stat().st_size
    record.record(ids(4, 5, 6, 7, 8))
    record.reserve()

    assert wrote_first
    assert first_size == 4 * 16 + 32
    assert not wrote_again
    assert grew
    assert grown_size == (3 + 4) * 16 + 32
    # The record keeps at most capacity ids, so the reserve stops there.
    assert reserve.stat().st_size == 10 * 16 + 32
    assert reserve.read_bytes() == bytes(10 * 16 + 32)


def test_full_disk_record_uses_reserve(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / DROPPED_IDS_FILE
    record = DroppedIds(path, 10, headroom=4)
    record.reserve()
    limit_folder(monkeypatch, tmp_path, record.reserved_bytes())

    released = record.record(ids(1, 2))

    loaded = DroppedIds(path, 10)
    loaded.load()
    assert released
    assert not record.unwritten
    assert list(loaded) == ids(1, 2)
    assert not (tmp_path / DROPPED_IDS_RESERVE_FILE).exists()
    assert not path.with_suffix(".tmp").exists()


def test_full_disk_without_reserve_raises(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / DROPPED_IDS_FILE
    record = DroppedIds(path, 10, headroom=4)
    limit_folder(monkeypatch, tmp_path, 0)

    with pytest.raises(OSError) as raised:
        record.record(ids(1, 2))

    assert raised.value.errno == errno.ENOSPC
    assert record.unwritten
    assert list(record) == ids(1, 2)
    assert not path.exists()
    assert not path.with_suffix(".tmp").exists()


def test_failed_reserve_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    record = DroppedIds(tmp_path / DROPPED_IDS_FILE, 10, headroom=4)
    limit_folder(monkeypatch, tmp_path, 16)

    with pytest.raises(OSError) as raised:
        record.reserve()

    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_failed_reserve_growth_keeps_old_reserve(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / DROPPED_IDS_FILE
    reserve = tmp_path / DROPPED_IDS_RESERVE_FILE
    record = DroppedIds(path, 10, headroom=4)
    record.reserve()
    old_size = reserve.stat().st_size
    record.record(ids(1, 2, 3))
    # Room for the record and the old reserve, not for the grown reserve.
    limit_folder(monkeypatch, tmp_path, path.stat().st_size + old_size)

    with pytest.raises(OSError) as raised:
        record.reserve()
    size_after_failure = reserve.stat().st_size if reserve.exists() else 0
    released = record.record(ids(4))

    assert raised.value.errno == errno.ENOSPC
    assert old_size == 4 * 16 + 32
    assert size_after_failure == old_size
    # The old reserve still frees its blocks for the next record on a full disk.
    assert released
    assert not reserve.exists()
    loaded = DroppedIds(path, 10)
    loaded.load()
    assert list(loaded) == ids(1, 2, 3, 4)
