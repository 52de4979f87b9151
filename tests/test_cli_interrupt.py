"""Ctrl-C (SIGINT) while the dslo-edge command starts or runs a command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import click
from click.testing import CliRunner

from dslo_edge.cli import EXIT_INTERRUPTED, InterruptibleGroup, sigterm_as_exit

# Sends a real SIGINT to itself while dslo_edge.cli is being imported, the
# window before any command installs its own handler.
INTERRUPT_DURING_IMPORT = """
import importlib.abc
import os
import signal
import sys

from dslo_edge.console import main


class InterruptOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "dslo_edge.cli":
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, InterruptOnImport())
sys.argv = ["dslo-edge", "profiles", "list"]
main()
"""


def test_sigint_during_import_exits_130():
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPT_DURING_IMPORT],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == EXIT_INTERRUPTED
    assert "Traceback" not in result.stderr
    assert "KeyboardInterrupt" not in result.stderr
    assert result.stderr.strip() == (
        "error: dslo-edge was interrupted by Ctrl-C (SIGINT) while it "
        "started, so no command ran"
    )
    assert result.stdout == ""


def test_console_entry_runs_command():
    result = subprocess.run(
        [sys.executable, "-m", "dslo_edge.console", "profiles", "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0
    assert "raspberry-pi-4b" in result.stdout


def test_sigint_in_command_exits_130():
    @click.group(cls=InterruptibleGroup)
    def group() -> None:
        pass

    @group.command()
    def slow() -> None:
        raise KeyboardInterrupt

    result = CliRunner().invoke(group, ["slow"])

    assert result.exit_code == EXIT_INTERRUPTED
    assert "Aborted!" not in result.output
    assert result.output.strip() == (
        "error: dslo-edge slow stopped on Ctrl-C (SIGINT) before it completed"
    )


def test_sigterm_in_command_prints_line():
    @click.group(cls=InterruptibleGroup)
    def group() -> None:
        pass

    @group.command()
    def slow() -> None:
        with sigterm_as_exit():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()

    result = CliRunner().invoke(group, ["slow"])

    assert result.exit_code == 128 + signal.SIGTERM
    assert result.output.strip() == (
        "error: dslo-edge slow stopped on SIGTERM before it completed"
    )
