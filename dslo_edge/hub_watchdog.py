"""The hub worker's watchdog: progress beats of its threads and the stall check.

Each long-running worker thread that can block records a beat
(``Heartbeat.beat``) where it is known to move. It beats at each idle loop
turn, each chunk of teacher labelling and each update or response
published. It also beats when a bounded PUBACK wait ends, timed out or not.
``HubWatchdog`` checks the beats every second. A thread that died, or that
went ``hub.watchdog_stall_s`` without a beat, makes it log one critical
line and exit the process with ``EXIT_WATCHDOG``. The kernel then releases
the worker's lock (``hub_worker_lock``), so another worker can take over
the push run that the hung thread claimed. systemd restarts the worker
(``Restart=on-failure``).
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
    """A worker thread that the watchdog checks.

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
    watched: Sequence[WatchedThread], now: float, stall_s: float
) -> str | None:
    """Return how the first dead or stalled thread fails, or None if all are well.

    A thread stalls when its last beat is more than ``stall_s`` seconds
    before ``now`` (``time.monotonic``).
    """
    for thread in watched:
        if not thread.is_alive():
            return f"the {thread.name} thread died"
        if thread.heartbeat is None:
            continue
        stalled = now - thread.heartbeat.at
        if stalled > stall_s:
            return (
                f"the {thread.name} thread made no progress for {stalled:.0f} s, "
                f"more than hub.watchdog_stall_s = {stall_s:g}"
            )
    return None


class HubWatchdog(threading.Thread):
    """Exits the worker process when one of its threads died or hung.

    Args:
        worker_id: the worker id, for the log line.
        watched: the threads to check, in the order their problems are named.
        stall_s: seconds without a beat after which a thread counts as hung.
    """

    def __init__(
        self, worker_id: str, watched: Sequence[WatchedThread], stall_s: float
    ):
        super().__init__(name="dslo-hub-watchdog", daemon=True)
        self.worker_id = worker_id
        self.watched = tuple(watched)
        self.stall_s = stall_s
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Stop checking, because the worker stops its threads on purpose."""
        self._stopped.set()

    def run(self) -> None:
        ping_every = systemd.watchdog_interval_s()
        last_ping = 0.0
        while not self._stopped.wait(CHECK_EVERY_S):
            problem = thread_problem(self.watched, time.monotonic(), self.stall_s)
            if problem and not self._stopped.is_set():
                self._exit(problem)
            if ping_every and time.monotonic() - last_ping >= ping_every:
                systemd.notify("WATCHDOG=1")
                last_ping = time.monotonic()

    def _exit(self, problem: str) -> None:
        logger.critical(
            "Hub worker %s watchdog: %s; exiting with status %d, which releases "
            "its worker lock so that another worker can take over its push runs",
            self.worker_id,
            problem,
            EXIT_WATCHDOG,
        )
        logging.shutdown()
        os._exit(EXIT_WATCHDOG)
