"""SIGINT held back while files move into place, then raised again."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from dslo_edge.signal_deferral import signals_deferred


def test_sigint_raised_after_block_ends() -> None:
    steps: list[str] = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                steps.append("after the signal")
            steps.append("after the block")
        handler = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)

    assert steps == ["after the signal"]
    assert handler is signal.default_int_handler


def test_block_without_signal_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)

    with signals_deferred():
        inside = signal.getsignal(signal.SIGTERM)

    assert inside is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_other_thread_runs_block_without_deferral() -> None:
    handlers: list[object] = []
    before = signal.getsignal(signal.SIGINT)

    def run() -> None:
        with signals_deferred():
            handlers.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()

    assert handlers == [before]


def test_sigterm_after_sigint_still_raised() -> None:
    def exit_on_sigterm(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        # BaseException, so that a lone KeyboardInterrupt fails the test
        # rather than stopping pytest.
        with pytest.raises(BaseException) as caught:
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)

    assert isinstance(caught.value, SystemExit)
    assert caught.value.code == 128 + signal.SIGTERM
    assert isinstance(caught.value.__context__, KeyboardInterrupt)
