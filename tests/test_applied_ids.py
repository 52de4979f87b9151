"""The bounded record of applied message ids that checkpoints store."""

import numpy as np
import pytest

from dslo_edge.applied_ids import ID_BYTES, AppliedIds


def message_id(number: int) -> bytes:
    return number.to_bytes(ID_BYTES, "big")


def numbers(record: AppliedIds) -> list[int]:
    return [int.from_bytes(row.tobytes(), "big") for row in record.to_array()]


def test_empty_record_gives_an_empty_table():
    table = AppliedIds(5).to_array()
    assert table.shape == (0, ID_BYTES)
    assert table.dtype == np.uint8


def test_eviction_keeps_the_newest_ids_in_order():
    record = AppliedIds(capacity=3)
    for number in range(1, 8):
        record.add(message_id(number))
    assert numbers(record) == [5, 6, 7]
    assert len(record) == 3
    assert message_id(4) not in record
    assert message_id(5) in record


def test_table_order_after_many_evictions():
    record = AppliedIds(capacity=10)
    for number in range(1000):
        record.add(message_id(number))
        if number % 97 == 0:
            assert numbers(record) == list(range(max(0, number - 9), number + 1))
    assert numbers(record) == list(range(990, 1000))


def test_known_id_keeps_its_place():
    record = AppliedIds(capacity=3)
    for number in (1, 2, 1, 3):
        record.add(message_id(number))
    assert numbers(record) == [1, 2, 3]
    record.add(message_id(4))
    assert numbers(record) == [2, 3, 4]


def test_table_round_trips_through_from_array():
    record = AppliedIds(capacity=4)
    for number in range(6):
        record.add(message_id(number))
    restored = AppliedIds.from_array(record.to_array(), capacity=4)
    assert numbers(restored) == [2, 3, 4, 5]
    restored.add(message_id(6))
    assert numbers(restored) == [3, 4, 5, 6]


def test_table_is_a_copy():
    record = AppliedIds(capacity=4)
    record.add(message_id(1))
    table = record.to_array()
    record.add(message_id(2))
    assert numbers(record) == [1, 2]
    assert table.shape == (1, ID_BYTES)


def test_wrong_length_id_rejected():
    record = AppliedIds(capacity=4)
    with pytest.raises(ValueError, match="message ids have 16 bytes, got 3"):
        record.add(b"abc")
    assert len(record) == 0
    assert record.to_array().shape == (0, ID_BYTES)


def test_non_bytes_id_rejected():
    record = AppliedIds(capacity=4)
    with pytest.raises(TypeError):
        record.add("0123456789abcdef")  # type: ignore[arg-type]
    record.add(memoryview(message_id(9)))
    assert numbers(record) == [9]
    assert message_id(9) in record


def test_failed_append_leaves_record_unchanged():
    record = AppliedIds(capacity=2)
    record.add(message_id(1))
    view = np.frombuffer(record._joined, dtype=np.uint8)
    with pytest.raises(BufferError):
        record.add(message_id(2))
    del view
    assert message_id(2) not in record
    for number in (3, 4):
        record.add(message_id(number))
    assert numbers(record) == [3, 4]
