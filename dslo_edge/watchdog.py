"""Watchdog threads: progress beats of the threads they watch, and the stall check.

The device daemon and the hub worker each run one. A watched thread that
can block records a beat (``Heartbeat.beat``) where it is known to move.
``Watchdog`` checks the beats every second. A thread that died, or that
went longer than the stall limit without a beat, makes it log one critical
line and exit the process with ``EXIT_WATCHDOG``, so that systemd restarts
the service (``Restart=on-failure``) and the kernel releases its locks.
While all threads are healthy, it sends ``WATCHDOG=1`` at half of
systemd's ``WatchdogSec``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dslo_edge import systemd
from dslo_edge.systemd import EXIT_WATCHDOG

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0


@dataclass
class Heartbeat:
    """The time (``time.monotonic``) of a thread's last known progress."""

    at: float = field(default_factory=time.monotonic)

    def beat(self) -> None:
        """Record progress now."""
        self.at = time.monotonic()


@dataclass(frozen=True)
class WatchedThread:
    """A thread that the watchdog checks.

    Attributes:
        name: the thread's role in log lines, such as "push scheduler".
        is_alive: returns whether the thread still runs.
        heartbeat: the thread's progress, or None for a thread that is only
            checked for being alive.
    """

    name: str
    is_alive: Callable[[], bool]
    heartbeat: Heartbeat | None = None


def thread_problem(
    watched: Sequence[WatchedThread],
    now: float,
    stall_s: float,
    limit_name: str | None = None,
) -> str | None:
    """Return how the first dead or stalled thread fails, or None if all are well.

    A thread stalls when its last beat is more than ``stall_s`` seconds
    before ``now`` (``time.monotonic``). ``limit_name`` is the setting that
    gives ``stall_s``, for the message, or None for a fixed limit.
    """
    for thread in watched:
        if not thread.is_alive():
            return f"the {thread.name} thread died"
        if thread.heartbeat is None:
            continue
        stalled = now - thread.heartbeat.at
        if stalled > stall_s:
            limit = f"{limit_name} = {stall_s:g}" if limit_name else f"{stall_s:g} s"
            return (
                f"the {thread.name} thread made no progress for {stalled:.0f} s, "
                f"more than {limit}"
            )
    return None


class Watchdog(threading.Thread):
    """Exits the process when one of the watched threads died or hung.

    Args:
        owner: the service instance for the log line, such as "Device porch".
        watched: the threads to check, in the order their problems are named.
        stall_s: seconds without a beat after which a thread counts as hung.
        limit_name: the setting that gives ``stall_s``, for the log line.
        exit_note: text that follows the exit status in the log line.
        stopped: set when the service stops its threads on purpose, which
            ends the checks; ``stop`` sets it too.
    """

    def __init__(
        self,
        owner: str,
        watched: Sequence[WatchedThread],
        stall_s: float,
        *,
        limit_name: str | None = None,
        exit_note: str = "",
        stopped: threading.Event | None = None,
    ):
        super().__init__(name="dslo-watchdog", daemon=True)
        self.owner = owner
        self.watched = tuple(watched)
        self.stall_s = stall_s
        self.limit_name = limit_name
        self.exit_note = exit_note
        self._stopped = stopped or threading.Event()

    def stop(self) -> None:
        """Stop checking, because the service stops its threads on purpose."""
        self._stopped.set()

    def run(self) -> None:
        ping_every = systemd.watchdog_interval_s()
        last_ping = 0.0
        while not self._stopped.wait(CHECK_EVERY_S):
            problem = thread_problem(
                self.watched, time.monotonic(), self.stall_s, self.limit_name
            )
            if problem and not self._stopped.is_set():
                self._exit(problem)
            if ping_every and time.monotonic() - last_ping >= ping_every:
                systemd.notify("WATCHDOG=1")
                last_ping = time.monotonic()

    def _exit(self, problem: str) -> None:
        logger.critical(
            "%s watchdog: %s; exiting with status %d%s",
            self.owner,
            problem,
            EXIT_WATCHDOG,
            self.exit_note,
        )
        logging.shutdown()
        os._exit(EXIT_WATCHDOG)
