"""The CI scripts install what the tests import on a fresh machine."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# The tflite-runtime venv runs the interpreter tests with tflite-runtime 2.14
# in place of ai-edge-litert, and with "numpy<2", which that wheel needs.
REPLACED_IN_TFLITE_VENV = ("ai-edge-litert", "numpy")


def install_words(script: Path) -> list[str]:
    """Return the words of the script's pip install lines, continuations joined."""
    text = script.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if " -m pip install " in line]
    return [word for line in lines for word in shlex.split(line)]


def test_tflite_venv_gets_device_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    words = install_words(ROOT / ".ci/runtime-tests.sh")

    for requirement in project["dependencies"]:
        if requirement.startswith(REPLACED_IN_TFLITE_VENV):
            continue
        assert requirement in words, (
            f"{requirement!r} from pyproject.toml is missing in .ci/runtime-tests.sh"
        )
    assert "tflite-runtime==2.14.0" in words
    assert "numpy<2" in words
