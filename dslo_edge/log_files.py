"""Size-capped log files that report a failing disk once, not per line."""

from __future__ import annotations

import logging
import logging.handlers
import sys


class RotatingLogFile(logging.handlers.RotatingFileHandler):
    """A ``RotatingFileHandler`` that reports write errors once per outage.

    The standard handler prints a traceback to stderr for every record it
    cannot write. On a full or read-only disk the daemon logs a metrics
    report several times a second, so stderr (the journal under systemd)
    would fill with tracebacks. This handler prints one line when writes
    start failing and one when they work again, with the count of lines
    that failed in between. Some of those may still reach the file, because
    the stream keeps unwritten bytes in its buffer and retries them.
    """

    def __init__(self, filename: str, max_bytes: int, backups: int):
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups)
        self.dropped = 0
        self._failed = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)
        if not self._failed and self.dropped:
            sys.stderr.write(
                f"dslo-edge: writing {self.baseFilename} again; "
                f"{self.dropped} lines failed to write and may be missing\n"
            )
            self.dropped = 0

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self._failed = True
        if not self.dropped:
            sys.stderr.write(
                f"dslo-edge: cannot write {self.baseFilename}: "
                f"{error.strerror or error}; its lines may be lost until a write "
                "succeeds; free space on that disk or make it writable\n"
            )
        self.dropped += 1
