"""Ids of finished over-the-air transfers, kept across restarts of the daemon.

A transfer is finished when all its chunks arrived, whether or not the
archive matched its sha256, when its file could not be written, or when
another transfer replaced it before it completed and its partial file was
deleted. The broker may deliver a chunk of a finished transfer again, for
example a QoS 1 copy after a reconnect. With MQTT 3.1.1 the daemon's session
(``clean_session`` False) outlives a restart, so the broker also delivers
such a copy after a restart. Such a chunk would start its transfer again,
which deletes the partial file of the transfer in progress, and copies of
every chunk would install the old release again. So ``OtaReceiver`` drops
the chunks of the transfers listed here.

The file is JSON, written atomically, with each list oldest first::

    {"format_version": 1, "complete": ["<32 hex digits>", ...], "failed": [...]}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dslo_edge.checkpoint import write_durably
from dslo_edge.json_input import parse_json

logger = logging.getLogger(__name__)

FINISHED_TRANSFERS_FILE = "finished-transfers.json"
# Ids kept per outcome. Each ota-send run sends one transfer and waits for
# its outcome, so late copies come from the last few. 16 is a margin, not a
# measured number.
DEFAULT_CAPACITY = 16
COMPLETE = "complete"
FAILED = "failed"
OUTCOMES = (COMPLETE, FAILED)
_FORMAT_VERSION = 1
_ID_BYTES = 16


class FinishedTransfers:
    """The ids of the newest ``capacity`` complete and unfinished transfers.

    Unfinished transfers failed or were replaced, and are kept as ``FAILED``.

    Args:
        path: the JSON file that keeps them across restarts.
        capacity: ids kept per outcome. The oldest is forgotten first.
    """

    def __init__(self, path: Path, capacity: int = DEFAULT_CAPACITY):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.path = path
        self.capacity = capacity
        # Dicts keep insertion order, so the first key is the oldest.
        self._ids: dict[str, dict[bytes, None]] = {name: {} for name in OUTCOMES}

    def outcome(self, transfer_id: bytes) -> str | None:
        """Return ``COMPLETE`` or ``FAILED`` for a finished transfer, else None."""
        for name in OUTCOMES:
            if transfer_id in self._ids[name]:
                return name
        return None

    def ids(self, outcome: str) -> list[bytes]:
        """Return the ids kept for ``outcome``, oldest first."""
        return list(self._ids[outcome])

    def load(self) -> None:
        """Read the ids from the file, if it exists.

        A damaged or unreadable file is logged as a warning and gives no
        ids, so the daemon still starts. Late copies of chunks of transfers
        that finished before the restart may then start those transfers
        again. The next ``add`` replaces the file.
        """
        try:
            data = self.path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            # The receiver reports a folder that is a file when a chunk arrives.
            return
        except OSError as error:
            self._warn_unusable(f"cannot be read: {error}")
            return
        try:
            loaded = _parse(data)
        except ValueError as error:
            self._warn_unusable(f"is damaged: {error}")
            return
        for name in OUTCOMES:
            self._ids[name] = dict.fromkeys(loaded[name][-self.capacity :])

    def add(self, transfer_id: bytes, outcome: str) -> None:
        """Record a finished transfer and write the file before returning.

        The id stays in memory when the write fails.

        Raises:
            OSError: the file cannot be written, for example on a full disk.
        """
        for ids in self._ids.values():
            ids.pop(transfer_id, None)
        same_outcome = self._ids[outcome]
        same_outcome[transfer_id] = None
        while len(same_outcome) > self.capacity:
            del same_outcome[next(iter(same_outcome))]
        document: dict[str, object] = {"format_version": _FORMAT_VERSION}
        for name in OUTCOMES:
            document[name] = [transfer.hex() for transfer in self._ids[name]]
        write_durably(self.path, json.dumps(document).encode() + b"\n")

    def _warn_unusable(self, problem: str) -> None:
        logger.warning(
            "Ignoring the record of finished model transfers %s, which %s; "
            "late copies of chunks of transfers that finished before this start "
            "may start them again. The next finished transfer replaces the file",
            self.path,
            problem,
        )


def _parse(data: bytes) -> dict[str, list[bytes]]:
    """Parse the file's content into ids per outcome.

    Raises:
        ValueError: the content is not the documented JSON.
    """
    try:
        document: Any = parse_json(data)
    except ValueError as error:
        raise ValueError(f"not JSON ({error})") from error
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, found {type(document).__name__}")
    version = document.get("format_version")
    if version != _FORMAT_VERSION:
        raise ValueError(f"format_version is {version!r}, expected {_FORMAT_VERSION}")
    return {name: _parse_ids(document.get(name), name) for name in OUTCOMES}


def _parse_ids(values: Any, name: str) -> list[bytes]:
    if not isinstance(values, list):
        raise ValueError(f"{name!r} is {values!r}, expected a list of transfer ids")
    ids = []
    for value in values:
        try:
            transfer_id = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            transfer_id = b""
        if len(transfer_id) != _ID_BYTES:
            raise ValueError(
                f"{name!r} contains {value!r}, expected {2 * _ID_BYTES} hex digits"
            )
        ids.append(transfer_id)
    return ids
