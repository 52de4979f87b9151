"""The record of dropped update ids, written to and read from real files."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from dslo_edge.dropped_ids import DROPPED_IDS_FILE, DroppedIds


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
