"""Entry point of the ``dslo-edge`` command.

It imports the command line inside a handler for Ctrl-C, because importing
click, numpy and the commands takes a noticeable part of a second, and a
SIGINT in that time would otherwise print a traceback.
"""

from __future__ import annotations

import sys

# 128 + SIGINT, as in dslo_edge.cli.
EXIT_INTERRUPTED = 130


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
    cli_main()


if __name__ == "__main__":
    main()
