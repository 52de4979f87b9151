"""The per-key limit on repeated log lines."""

from __future__ import annotations

from dslo_edge.repeat_log import RepeatLimiter, repeats_note


def test_repeats_counted_until_interval() -> None:
    now = [0.0]
    limiter = RepeatLimiter(60.0, 8, clock=lambda: now[0])

    first = limiter.skipped_before("cam")
    repeats = [limiter.skipped_before("cam") for _ in range(3)]
    other = limiter.skipped_before("porch")
    now[0] = 60.0
    after_interval = limiter.skipped_before("cam")

    assert first == 0
    assert repeats == [None, None, None]
    assert other == 0
    assert after_interval == 3


def test_forget_logs_next_event_at_once() -> None:
    limiter = RepeatLimiter(60.0, 8, clock=lambda: 0.0)
    limiter.skipped_before("cam")
    limiter.skipped_before("cam")

    limiter.forget("cam")
    limiter.forget("never seen")

    assert limiter.skipped_before("cam") == 0


def test_full_memory_forgets_every_key() -> None:
    limiter = RepeatLimiter(60.0, 2, clock=lambda: 0.0)
    limiter.skipped_before("a")
    limiter.skipped_before("b")

    # A third key clears the memory, so "a" is logged again at once.
    assert limiter.skipped_before("c") == 0
    assert limiter.skipped_before("a") == 0


def test_repeats_note_counts_skipped() -> None:
    assert repeats_note(0, "failed run") == ""
    assert repeats_note(3, "failed run") == (
        " (3 more failed runs since the last line)"
    )


def test_repeats_note_counts_one_event() -> None:
    assert repeats_note(1, "failed run") == " (1 more failed run since the last line)"
    assert repeats_note(1, "run sent nothing", "runs sent nothing") == (
        " (1 more run sent nothing since the last line)"
    )
    assert repeats_note(2, "run sent nothing", "runs sent nothing") == (
        " (2 more runs sent nothing since the last line)"
    )
