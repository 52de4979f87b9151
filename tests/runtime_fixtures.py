"""Locate the fixtures written by ``tests.make_runtime_fixtures``.

Runtime tests read the directory named by ``DSLO_RUNTIME_FIXTURES`` and run
the interpreter package named by ``DSLO_RUNTIME`` ("auto", "ai-edge-litert"
or "tflite-runtime"). They are skipped when the variable is unset, because
making the fixtures needs TensorFlow and about a minute.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES_VARIABLE = "DSLO_RUNTIME_FIXTURES"
RUNTIME_VARIABLE = "DSLO_RUNTIME"


def fixture_dir() -> Path:
    """Return the fixture directory, or skip the calling test."""
    value = os.environ.get(FIXTURES_VARIABLE)
    if not value:
        pytest.skip(
            f"{FIXTURES_VARIABLE} is not set; write the fixtures with "
            "'python -m tests.make_runtime_fixtures DIR' and point it at DIR"
        )
    path = Path(value)
    if not (path / "cases").is_dir():
        pytest.fail(f"{FIXTURES_VARIABLE}={path} has no cases/ directory")
    return path


def runtime_name() -> str:
    """Return the interpreter package the runtime tests must use."""
    return os.environ.get(RUNTIME_VARIABLE, "auto")


def case_names() -> list[str]:
    """Return the case names present in the fixture directory (may be empty)."""
    value = os.environ.get(FIXTURES_VARIABLE)
    if not value or not (Path(value) / "cases").is_dir():
        return ["fixtures-missing"]
    return sorted(path.stem for path in (Path(value) / "cases").glob("*.tflite"))
