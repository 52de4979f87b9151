"""A device configured for an interpreter package that is not installed."""

from __future__ import annotations

import importlib.util

import pytest

from dslo_edge.config import render_config
from dslo_edge.errors import ConfigError, RuntimeMissing
from dslo_edge.runtime import interpreter_class
from tests.cli_process import run_cli

needs_missing_package = pytest.mark.skipif(
    importlib.util.find_spec("tflite_runtime") is not None,
    reason="tflite-runtime is installed here",
)


@needs_missing_package
def test_missing_runtime_names_its_package() -> None:
    with pytest.raises(RuntimeMissing) as caught:
        interpreter_class("tflite-runtime")

    assert isinstance(caught.value, ConfigError)
    assert "install one with: pip install tflite-runtime" in str(caught.value)
    assert "ai-edge-litert" not in str(caught.value)


@needs_missing_package
def test_run_without_runtime_exits_78(mlp_pair, tmp_path) -> None:
    config = tmp_path / "device.toml"
    overrides = {"device": {"runtime": "tflite-runtime"}}
    config.write_text(
        render_config(
            "dev-a", mlp_pair.bundle, tmp_path / "state", 9, overrides=overrides
        )
    )

    result = run_cli("run", "--config", str(config))

    assert result.returncode == 78
    assert "pip install tflite-runtime" in result.stderr
    assert "Traceback" not in result.stderr
