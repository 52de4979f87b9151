"""Acknowledged marks of a push survive a failed write of the next batch.

The pusher marks the batches whose PUBACK arrived in the transaction that
stores the next batch. When SQLite fails that transaction, it rolls the
marks back with it, and the window keeps them for the next write.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from dslo_edge import hub_service
from dslo_edge.hub_state import HubState, StoredBatch
from dslo_edge.privacy import PrivacySettings
from tests.mqtt_proxy import PubackProxy
from tests.test_hub_push_batches import drain_updates, stored_rows
from tests.test_hub_push_overlap import close_worker, connected_worker
from tests.test_hub_push_resume import wait_for_updates
from tests.test_hub_service import device_updates, nightly_push_config

# The batch whose insert finds the state file full.
FULL_AT = 6
# SQLite's default max_page_count.
DEFAULT_MAX_PAGES = 0xFFFFFFFE

RESUME_LINE = re.compile(
    r"Push nightly resumes device kitchen after batch (\d+): skips (\d+) "
    r"acknowledged before the stop and publishes (\d+) again unchanged"
)


class StateFullAtOneBatch(HubState):
    """A real state file that reaches its page limit at batch ``FULL_AT``.

    The limit is SQLite's ``max_page_count``, set to the file's size for that
    one insert, so SQLite fails the whole transaction with SQLITE_FULL
    ("database or disk is full") as on a full disk, and rolls back the marks
    that the transaction contained.
    """

    # The proxy that withholds the PUBACKs until the batch before FULL_AT.
    proxy: PubackProxy
    failed_marks: list[int] | None = None

    def store_push_batch(
        self,
        name: str,
        device: str,
        batch: StoredBatch,
        privacy: PrivacySettings | None,
        acknowledged: Sequence[int] = (),
    ) -> str:
        if batch.batch != FULL_AT:
            refusal = super().store_push_batch(
                name, device, batch, privacy, acknowledged
            )
            if batch.batch == FULL_AT - 1:
                # The PUBACKs of the batches before arrive only now, after
                # this transaction, so the failing one contains their marks.
                self.proxy.release_held()
                time.sleep(0.5)
            return refusal
        self.failed_marks = list(acknowledged)
        with self._lock:
            (pages,) = self._db.execute("PRAGMA page_count").fetchone()
            self._db.execute(f"PRAGMA max_page_count = {pages}")
        try:
            return super().store_push_batch(name, device, batch, privacy, acknowledged)
        finally:
            with self._lock:
                self._db.execute(f"PRAGMA max_page_count = {DEFAULT_MAX_PAGES}")


def test_marks_survive_failed_batch_store(
    mlp_pair, mosquitto, tmp_path, monkeypatch, caplog
) -> None:
    folder = tmp_path / "hub"
    # Ten batches of 16 samples, each payload larger than one SQLite page,
    # so that each insert needs new pages.
    total = 160
    x = np.random.default_rng(4).random((total, 64), dtype=np.float32)
    proxy = PubackProxy(mosquitto.port, "dslo/kitchen/updates", 0)
    config = nightly_push_config(folder, proxy.port, mlp_pair.bundle, x)
    state_file = folder / "state.sqlite"
    client, received = device_updates(mosquitto.port, "kitchen")
    caplog.set_level(logging.INFO, logger="dslo_edge.hub_pushes")
    try:
        monkeypatch.setattr(hub_service, "HubState", StateFullAtOneBatch)
        monkeypatch.setattr(StateFullAtOneBatch, "proxy", proxy, raising=False)
        first = connected_worker(config, "w1", proxy.port)
        assert isinstance(first.state, StateFullAtOneBatch)
        assert first.pushes is not None
        [schedule] = first.config.pushes
        try:
            assert first.pushes._claim(schedule)
            with pytest.raises(sqlite3.OperationalError, match="full"):
                first.pushes.run_once(schedule)
            failed_marks = first.state.failed_marks
        finally:
            close_worker(first)
        # The worker stops here, as when it is killed after the failure.
        rows_after_failure = stored_rows(state_file, "kitchen")

        monkeypatch.setattr(hub_service, "HubState", HubState)
        second = connected_worker(config, "w1", proxy.port)
        assert second.pushes is not None
        try:
            second.pushes._resume_unfinished()
            wait_for_updates(received, total // 16, timeout_s=30)
            time.sleep(0.5)
        finally:
            close_worker(second)
        updates = drain_updates(received, folder / "keys", "kitchen")
    finally:
        proxy.close()
        client.disconnect()
        client.loop_stop()

    marked = {batch for batch, acknowledged in rows_after_failure if acknowledged}
    unmarked = [batch for batch, acknowledged in rows_after_failure if not acknowledged]
    resumed = RESUME_LINE.search(caplog.text)
    assert resumed is not None, caplog.text
    last_batch, skipped, republished = (int(group) for group in resumed.groups())
    receipts = Counter(message_id for message_id, _, _ in updates)

    # The first worker stored batches 0 to 5 and failed at batch 6.
    assert [batch for batch, _ in rows_after_failure] == list(range(FULL_AT))
    # The failed transaction contained the marks of batches 0 to 4, and
    # each of them was stored. Before, those marks were lost with it.
    assert failed_marks is not None
    assert set(range(FULL_AT - 1)) <= set(failed_marks)
    assert set(failed_marks) <= marked
    # Only batches whose PUBACK came after the failure can lack the mark.
    assert all(batch > max(failed_marks) for batch in unmarked)
    # The resumed run publishes again only the unmarked batches.
    assert last_batch == FULL_AT
    assert skipped == len(marked)
    assert republished == len(unmarked)
    # Kitchen got each of the 10 updates, and only the unmarked ones twice.
    assert len(receipts) == total // 16
    assert sum(receipts.values()) == total // 16 + len(unmarked)
    assert stored_rows(state_file, "kitchen") == []
