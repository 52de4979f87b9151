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


def test_threads_keep_byte_count_consistent() -> None:
    updates = UpdateQueue(8, 300)
    sizes = [(i * 37) % 120 + 1 for i in range(5000)]
    received: list[int] = []
    lowest = [0]
    highest = [0]
    done = threading.Event()

    def produce() -> None:
        for size in sizes:
            updates.put(Item(bytes(size)), timeout=5.0)

    def consume() -> None:
        for _ in sizes:
            received.append(len(updates.get(timeout=5.0).payload))
            updates.task_done()

    def watch() -> None:
        while not done.is_set():
            with updates.mutex:
                lowest[0] = min(lowest[0], updates.queued_bytes)
                highest[0] = max(highest[0], updates.queued_bytes)
            updates.qsize()
            updates.empty()

    threads = [threading.Thread(target=f) for f in (produce, consume, watch)]
    for thread in threads:
        thread.start()
    threads[0].join(timeout=30.0)
    threads[1].join(timeout=30.0)
    updates.join()
    done.set()
    threads[2].join(timeout=5.0)

    assert received == sizes
    assert lowest[0] == 0
    assert highest[0] <= 300
    assert updates.queued_bytes == 0
    assert updates.unfinished_tasks == 0


def test_get_wakes_every_put_that_now_fits() -> None:
    updates = UpdateQueue(10, 15)
    updates.put(Item(bytes(5)))
    updates.put(Item(bytes(5)))
    small_done = threading.Event()

    def put_large() -> None:
        # Waits until the queue is empty: 5 + 11 is past 15.
        updates.put(Item(bytes(11)), timeout=2.0)

    def put_small() -> None:
        updates.put(Item(bytes(6)), timeout=2.0)
        small_done.set()

    large = threading.Thread(target=put_large)
    large.start()
    time.sleep(0.05)
    small = threading.Thread(target=put_small)
    small.start()
    time.sleep(0.05)
    assert len(updates.get().payload) == 5

    # 5 + 6 fits, so the small put must not wait for the large one.
    assert small_done.wait(1.0)
    assert updates.queued_bytes == 11
    while updates.qsize():
        updates.get()
    large.join(timeout=5.0)
    small.join(timeout=5.0)
