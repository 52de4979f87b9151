"""The daemon's update queue: bounded by count and by payload bytes."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import pytest

from dslo_edge.update_queue import UpdateQueue


@dataclass(frozen=True)
class Item:
    payload: bytes


def test_count_limit_rejects_extra_item() -> None:
    updates = UpdateQueue(2, 1000)
    updates.put(Item(b"a"))
    updates.put(Item(b"b"))
    with pytest.raises(queue.Full):
        updates.put(Item(b"c"), block=False)
    assert updates.qsize() == 2
    assert updates.queued_bytes == 2


def test_byte_limit_rejects_item_that_overflows() -> None:
    updates = UpdateQueue(10, 100)
    updates.put(Item(bytes(60)))
    with pytest.raises(queue.Full):
        updates.put(Item(bytes(41)), timeout=0.01)
    updates.put(Item(bytes(40)), block=False)
    assert updates.qsize() == 2
    assert updates.queued_bytes == 100


def test_oversized_item_enters_empty_queue() -> None:
    updates = UpdateQueue(10, 100)
    updates.put(Item(bytes(500)), block=False)
    assert updates.queued_bytes == 500
    with pytest.raises(queue.Full):
        updates.put_nowait(Item(b"x"))
    assert updates.get_nowait().payload == bytes(500)
    assert updates.queued_bytes == 0


def test_get_frees_bytes_in_fifo_order() -> None:
    updates = UpdateQueue(10, 100)
    for size in (10, 20, 30):
        updates.put(Item(bytes(size)))
    assert [len(updates.get().payload) for _ in range(3)] == [10, 20, 30]
    assert updates.queued_bytes == 0
    assert updates.empty()


def test_waiting_put_resumes_after_get() -> None:
    updates = UpdateQueue(10, 100)
    updates.put(Item(bytes(80)))
    finished = threading.Event()

    def put_large() -> None:
        updates.put(Item(bytes(50)), timeout=5.0)
        finished.set()

    thread = threading.Thread(target=put_large)
    thread.start()
    time.sleep(0.05)
    assert not finished.is_set()
    assert len(updates.get().payload) == 80
    thread.join(timeout=5.0)
    assert finished.is_set()
    assert updates.queued_bytes == 50


def test_put_timeout_waits_before_full() -> None:
    updates = UpdateQueue(1, 100)
    updates.put(Item(b"a"))
    started = time.monotonic()
    with pytest.raises(queue.Full):
        updates.put(Item(b"b"), timeout=0.1)
    assert time.monotonic() - started >= 0.1


def test_invalid_limits_rejected() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        UpdateQueue(0, 100)
    with pytest.raises(ValueError, match="must be positive"):
        UpdateQueue(10, 0)


def test_negative_timeout_rejected() -> None:
    updates = UpdateQueue(1, 100)
    updates.put(Item(b"a"))
    with pytest.raises(ValueError, match="non-negative"):
        updates.put(Item(b"b"), timeout=-1.0)
