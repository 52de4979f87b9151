"""Entry point of the ``dslo-edge`` command.

It imports the command line inside a handler for Ctrl-C, because importing
click, numpy and the commands takes a noticeable part of a second, and a
SIGINT in that time would otherwise print a traceback.
"""

from __future__ import annotations

import signal
import sys

# 128 + SIGINT, as in dslo_edge.cli.
EXIT_INTERRUPTED = 130


def ignore_late_interrupts() -> None:
    """Ignore SIGINT and SIGTERM once the command has returned or exited.

    The exit status is decided by then, but the interpreter's shutdown can
    take a noticeable time. With Python 3.11, a SIGINT sent up to 0.2 s
    after convert printed its `wrote` line ended the process as killed by
    SIGINT (status -2 in subprocess), although the bundle was complete.
    Ignored signals keep the command's status.
    """
    # NOTE: a shutdown that hangs, such as on a thread that never ends, then
    # needs SIGKILL.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def main() -> None:
    """Run the dslo-edge command line; exit with status 130 on an early Ctrl-C."""
    try:
        from dslo_edge.cli import main as cli_main
    except KeyboardInterrupt:
        print(
            "error: dslo-edge was interrupted by Ctrl-C (SIGINT) while it "
            "started, so no command ran",
            file=sys.stderr,
        )
        sys.exit(EXIT_INTERRUPTED)
    try:
        cli_main()
    finally:
        ignore_late_interrupts()


if __name__ == "__main__":
    main()
