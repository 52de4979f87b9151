"""A push's counts from the device's metrics before and after it."""

from __future__ import annotations

from dslo_edge.push_progress import DeviceCounts, handled_count

BEFORE = {"applied_total": 10, "processed_total": 11, "rejected": {"stale": 1}}
# 40 updates applied and 2 rejected as unsigned, and 42 copies of applied
# updates that the broker delivered again after a device restart.
AFTER = {
    "applied_total": 50,
    "processed_total": 95,
    "rejected": {"stale": 1, "duplicate": 42, "unsigned": 2},
}


def test_counts_split_duplicates_from_failures() -> None:
    counts = DeviceCounts.between(BEFORE, AFTER)

    assert counts.applied == 40
    assert counts.rejected == {"duplicate": 42, "unsigned": 2}
    assert counts.rejected_count == 44
    assert counts.duplicates == 42
    assert counts.failed == {"unsigned": 2}
    assert counts.failed_count == 2
    assert counts.reasons(failed_only=True) == "unsigned: 2"
    assert counts.describe() == "applied 40, rejected 44 (duplicate: 42, unsigned: 2)"


def test_duplicates_alone_are_no_failure() -> None:
    after = {"applied_total": 50, "rejected": {"stale": 1, "duplicate": 7}}

    counts = DeviceCounts.between(BEFORE, after)

    assert counts.applied == 40
    assert counts.duplicates == 7
    assert counts.failed_count == 0


def test_handled_count_leaves_out_duplicates() -> None:
    assert handled_count(BEFORE) == 11
    assert handled_count(AFTER) == 53
    # Without applied_total (an older daemon), applied is read instead.
    assert handled_count({"applied": 3, "rejected": {"duplicate": 5}}) == 3
