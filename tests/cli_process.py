"""Run the dslo-edge command line in a child process, as a user would."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m dslo_edge.cli ARGS`` and return its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "dslo_edge.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
