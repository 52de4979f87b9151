"""Late chunks of finished OTA transfers: dropped, also after a restart."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from dslo_edge.finished_transfers import (
    COMPLETE,
    DEFAULT_CAPACITY,
    FAILED,
    FINISHED_TRANSFERS_FILE,
)
from dslo_edge.ota import (
    OtaError,
    OtaReceiver,
    ReceivedArchive,
    ReplacedTransfer,
    split_archive,
)

CHUNK_BYTES = 4096
ARCHIVE_BYTES = 10_000  # three chunks


def transfer(name: bytes) -> tuple[bytes, bytes, list[bytes]]:
    """Return the transfer id, archive and chunks of one transfer."""
    transfer_id = name * 16
    archive = os.urandom(ARCHIVE_BYTES)
    return transfer_id, archive, split_archive(archive, CHUNK_BYTES, transfer_id)


def complete(receiver: OtaReceiver, chunks: list[bytes]) -> ReceivedArchive:
    """Receive every chunk and delete the archive, as the daemon's install does."""
    outcomes = [receiver.receive(chunk) for chunk in chunks]
    assert outcomes[:-1] == [None] * (len(chunks) - 1)
    archive = outcomes[-1]
    assert archive is not None
    archive.path.unlink()
    return archive


def part_of(folder: Path, transfer_id: bytes) -> Path:
    return folder / f"{transfer_id.hex()}.part"


def test_late_chunks_of_older_transfers_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "ota"
    receiver = OtaReceiver(folder)
    first_id, _, first = transfer(b"a")
    second_id, _, second = transfer(b"b")
    third_id, _, third = transfer(b"c")
    current_id, current_archive, current = transfer(b"d")
    for chunks in (first, second, third):
        complete(receiver, chunks)
    assert receiver.receive(current[0]) is None

    # The second-last transfer, then a whole older archive again.
    late_second = receiver.receive(second[1])
    late_first = [receiver.receive(chunk) for chunk in first]
    progress_after = receiver.progress
    part_after = part_of(folder, current_id).read_bytes()
    rest = [receiver.receive(chunk) for chunk in current[1:]]

    assert late_second is None
    assert late_first == [None, None, None]
    assert progress_after == (1, 3)
    assert part_after[:CHUNK_BYTES] == current_archive[:CHUNK_BYTES]
    assert rest[0] is None
    assert rest[1] is not None
    assert rest[1].path.read_bytes() == current_archive
    assert not part_of(folder, first_id).exists()
    assert receiver.finished.ids(COMPLETE) == [
        first_id,
        second_id,
        third_id,
        current_id,
    ]


def test_drop_is_logged_once_per_transfer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = OtaReceiver(tmp_path / "ota")
    first_id, _, first = transfer(b"a")
    second_id, _, second = transfer(b"b")
    complete(receiver, first)
    complete(receiver, second)

    with caplog.at_level(logging.DEBUG, logger="dslo_edge.ota"):
        for chunk in first + second + first:
            assert receiver.receive(chunk) is None
    drops = [r for r in caplog.records if r.getMessage().startswith("Dropping")]

    assert len(drops) == 2
    assert all(record.levelno == logging.INFO for record in drops)
    assert drops[0].getMessage() == (
        f"Dropping chunk 0 of model transfer {first_id.hex()}, which already "
        "completed; later copies of its chunks are dropped without a log line"
    )
    assert f"chunk 0 of model transfer {second_id.hex()}," in drops[1].getMessage()


def test_memory_forgets_oldest_transfer(tmp_path: Path) -> None:
    folder = tmp_path / "ota"
    receiver = OtaReceiver(folder)
    transfers = [transfer(bytes([ord("a") + i])) for i in range(DEFAULT_CAPACITY + 1)]
    for _, _, chunks in transfers:
        complete(receiver, chunks)
    oldest_id, _, oldest = transfers[0]
    second_oldest_id, _, second_oldest = transfers[1]

    second_oldest_late = receiver.receive(second_oldest[0])
    progress_after_second_oldest = receiver.progress
    oldest_late = receiver.receive(oldest[0])
    stored = json.loads((folder / FINISHED_TRANSFERS_FILE).read_text())

    assert DEFAULT_CAPACITY == 16
    assert second_oldest_late is None
    assert progress_after_second_oldest is None
    # Forgotten, so the late chunk starts the transfer again.
    assert oldest_late is None
    assert receiver.progress == (1, 3)
    assert part_of(folder, oldest_id).exists()
    assert receiver.finished.ids(COMPLETE)[0] == second_oldest_id
    assert len(receiver.finished.ids(COMPLETE)) == 16
    assert stored["complete"][0] == second_oldest_id.hex()
    assert len(stored["complete"]) == 16
    assert oldest_id.hex() not in stored["complete"]


def test_late_chunk_after_restart_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "ota"
    before = OtaReceiver(folder)
    first_id, _, first = transfer(b"a")
    second_id, _, second = transfer(b"b")
    current_id, current_archive, current = transfer(b"c")
    complete(before, first)
    complete(before, second)
    assert before.receive(current[0]) is None

    restarted = OtaReceiver(folder)
    late = [restarted.receive(second[2]), restarted.receive(first[0])]
    part_after = part_of(folder, current_id).read_bytes()
    rest = [restarted.receive(chunk) for chunk in current[1:]]

    assert late == [None, None]
    assert part_after[:CHUNK_BYTES] == current_archive[:CHUNK_BYTES]
    assert rest[0] is None
    assert rest[1] is not None
    assert rest[1].path.read_bytes() == current_archive
    assert restarted.finished.ids(COMPLETE) == [first_id, second_id, current_id]


def test_failed_transfer_remembered_after_restart(tmp_path: Path) -> None:
    folder = tmp_path / "ota"
    before = OtaReceiver(folder)
    failed_id, _, failed = transfer(b"a")
    assert before.receive(failed[0]) is None
    # A folder in place of the list of stored chunks fails the next write.
    listed = folder / f"{failed_id.hex()}.received"
    listed.unlink()
    listed.mkdir()
    with pytest.raises(OtaError) as caught:
        before.receive(failed[1])
    listed.rmdir()
    current_id, current_archive, current = transfer(b"b")
    assert before.receive(current[0]) is None

    restarted = OtaReceiver(folder)
    late = restarted.receive(failed[2])
    rest = [restarted.receive(chunk) for chunk in current[1:]]

    assert caught.value.reason == "state_dir_write_failed"
    assert late is None
    assert not part_of(folder, failed_id).exists()
    assert restarted.finished.ids(FAILED) == [failed_id]
    assert rest[0] is None
    assert rest[1] is not None
    assert rest[1].path.read_bytes() == current_archive
    assert restarted.finished.ids(COMPLETE) == [current_id]


def test_restart_during_install_installs_again(tmp_path: Path) -> None:
    # The daemon acknowledges the last chunk after the install, so a kill
    # during the install makes the broker deliver that chunk again.
    folder = tmp_path / "ota"
    transfer_id, archive, chunks = transfer(b"a")
    before = OtaReceiver(folder)
    for chunk in chunks[:-1]:
        assert before.receive(chunk) is None
    left = before.receive(chunks[-1])
    assert left is not None

    restarted = OtaReceiver(folder)
    again = restarted.receive(chunks[-1])
    assert again is not None
    again.path.unlink()  # the install finished
    after_install = restarted.receive(chunks[-1])

    assert restarted.finished.ids(COMPLETE) == [transfer_id]
    assert again.path == left.path
    assert again.size == len(archive)
    assert after_install is None
    assert restarted.progress is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x00\xff garbage", "is damaged: not JSON"),
        (b'{"format_version": 1, "complete": ["61', "is damaged: not JSON"),
        (b"[]", "is damaged: expected a JSON object, found list"),
        # Deeper than Python's recursion limit, which json.loads hits.
        pytest.param(
            b"[" * 100_000 + b"]" * 100_000, "is damaged: not JSON", id="deep-lists"
        ),
        (b'{"format_version": 2}', "is damaged: format_version is 2, expected 1"),
        (
            b'{"format_version": 1, "complete": ["abcd"], "failed": []}',
            "is damaged: 'complete' contains 'abcd', expected 32 hex digits",
        ),
        (
            b'{"format_version": 1, "complete": []}',
            "is damaged: 'failed' is None, expected a list of transfer ids",
        ),
    ],
)
def test_damaged_memory_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, problem: str
) -> None:
    folder = tmp_path / "ota"
    current_id, current_archive, current = transfer(b"c")
    assert OtaReceiver(folder).receive(current[0]) is None
    path = folder / FINISHED_TRANSFERS_FILE
    path.write_bytes(content)

    with caplog.at_level(logging.WARNING, logger="dslo_edge"):
        restarted = OtaReceiver(folder)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    content_after_start = path.read_bytes()
    rest = [restarted.receive(chunk) for chunk in current[1:]]
    stored = json.loads(path.read_text())

    assert len(warnings) == 1
    assert (
        warnings[0]
        .getMessage()
        .startswith(
            f"Ignoring the record of finished model transfers {path}, which {problem}"
        )
    )
    assert restarted.finished.ids(COMPLETE) == [current_id]
    assert content_after_start == content
    # The transfer in progress resumes with the chunk stored before.
    assert rest[0] is None
    assert rest[1] is not None
    assert rest[1].path.read_bytes() == current_archive
    assert stored == {
        "format_version": 1,
        "complete": [current_id.hex()],
        "failed": [],
    }


def test_unwritable_memory_keeps_ids_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ota"
    folder.mkdir()
    # write_durably writes to this name first, and a folder cannot be opened.
    (folder / "finished-transfers.tmp").mkdir()
    transfer_id, archive, chunks = transfer(b"a")
    receiver = OtaReceiver(folder)

    with caplog.at_level(logging.WARNING, logger="dslo_edge"):
        received = complete(receiver, chunks)
    late = receiver.receive(chunks[0])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]

    assert received.size == len(archive)
    assert late is None
    assert receiver.finished.ids(COMPLETE) == [transfer_id]
    assert not (folder / FINISHED_TRANSFERS_FILE).exists()
    assert len(warnings) == 1
    assert (
        warnings[0]
        .getMessage()
        .startswith(
            f"Cannot record model transfer {transfer_id.hex()} as complete in "
            f"{folder / FINISHED_TRANSFERS_FILE}: [Errno 21] Is a directory"
        )
    )


def test_late_chunk_of_replaced_transfer_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "ota"
    receiver = OtaReceiver(folder)
    replaced_id, _, replaced = transfer(b"a")
    current_id, current_archive, current = transfer(b"b")
    assert receiver.receive(replaced[0]) is None
    assert receiver.receive(current[0]) is None

    late = receiver.receive(replaced[1])

    assert late is None
    assert receiver.finished.ids(FAILED) == [replaced_id]
    assert receiver.take_replaced() == [
        ReplacedTransfer(replaced_id.hex(), current_id.hex())
    ]
    assert part_of(folder, current_id).exists()
    assert not part_of(folder, replaced_id).exists()
    received = [receiver.receive(chunk) for chunk in current[1:]]
    assert received[-1] is not None
    assert received[-1].path.read_bytes() == current_archive


def test_transfer_cut_off_by_restart_then_replaced_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "ota"
    cut_id, _, cut = transfer(b"a")
    current_id, current_archive, current = transfer(b"b")
    assert OtaReceiver(folder).receive(cut[0]) is None

    restarted = OtaReceiver(folder)
    assert restarted.receive(current[0]) is None
    late = restarted.receive(cut[1])

    assert late is None
    assert restarted.finished.ids(FAILED) == [cut_id]
    # The transfer cut off by the restart is reported as replaced.
    assert restarted.take_replaced() == [
        ReplacedTransfer(cut_id.hex(), current_id.hex())
    ]
    assert restarted.take_replaced() == []
    assert part_of(folder, current_id).exists()
    received = [restarted.receive(chunk) for chunk in current[1:]]
    assert received[-1] is not None
    assert received[-1].path.read_bytes() == current_archive
