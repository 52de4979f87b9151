"""Limit repeated log lines to one per key and interval, with a count."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable


class RepeatLimiter:
    """A per-key limit on repeated log lines, with a count of those skipped.

    Args:
        interval_s: an event whose key was logged less than this many seconds
            ago is only counted.
        memory: keys remembered; beyond it, all are forgotten.
        clock: monotonic time in seconds.
    """

    def __init__(
        self,
        interval_s: float,
        memory: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.interval_s = interval_s
        self.memory = memory
        self._clock = clock
        # key -> (when last logged, events not logged since).
        self._logged: dict[Hashable, tuple[float, int]] = {}

    def skipped_before(self, key: Hashable) -> int | None:
        """Return None to skip logging this event, else the count skipped since."""
        now = self._clock()
        last, skipped = self._logged.get(key, (-math.inf, 0))
        if now - last < self.interval_s:
            self._logged[key] = (last, skipped + 1)
            return None
        if len(self._logged) >= self.memory:
            self._logged.clear()
        self._logged[key] = (now, 0)
        return skipped

    def forget(self, key: Hashable) -> None:
        """Drop ``key``, so that its next event is logged at once."""
        self._logged.pop(key, None)


def repeats_note(skipped: int, event: str, plural: str | None = None) -> str:
    """Return the suffix that counts the events skipped since the last line.

    The suffix is empty when none were skipped, and otherwise reads
    `` (1 more <event> since the last line)`` or, for more than one,
    `` (3 more <plural> since the last line)``, where ``plural`` defaults to
    ``event`` with an ``s`` appended.
    """
    if not skipped:
        return ""
    events = event if skipped == 1 else plural or f"{event}s"
    return f" ({skipped} more {events} since the last line)"
