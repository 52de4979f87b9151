"""Deferral of SIGINT and SIGTERM while files are moved into place.

``dslo-edge convert``, ``report`` and ``evaluate`` write their output into
a staging folder and then rename it into place. A KeyboardInterrupt raised
between two of those renames would leave the output half old and half new,
so the renames run inside ``signals_deferred``. This module imports only the
standard library, so both ``converters`` and the runtime can use it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class SigtermExit(SystemExit):
    """The SystemExit(143) that ``dslo_edge.cli.sigterm_as_exit`` raises on SIGTERM.

    It is defined here, not in ``dslo_edge.cli``, so that ``python -m
    dslo_edge.cli``, which loads that module twice, has one class to catch.
    """


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM while the block runs, then raise them again.

    Blocking the signals with pthread_sigmask would not do, because the
    kernel delivers a signal sent to the process to any thread that does
    not block it, such as the OpenBLAS worker threads that numpy starts.
    Python then runs the handler in the main thread at once. Only the main
    thread can set handlers, so in other threads the block runs without
    deferral.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, _frame: Any) -> None:
        received.append(signum)

    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        # None: a handler that Python did not install, which it cannot restore.
        if handler is not None:
            previous[number] = signal.signal(number, remember)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _raise_each(list(dict.fromkeys(received)))


def _raise_each(signals: list[int]) -> None:
    """Raise each signal in turn, also when the handler of an earlier one raises.

    So after SIGINT and SIGTERM, SIGTERM's handler runs even though SIGINT's
    raised KeyboardInterrupt, and its exception is the one that propagates.
    """
    if not signals:
        return
    try:
        signal.raise_signal(signals[0])
    finally:
        _raise_each(signals[1:])
