"""`dslo-edge push` and `ota-send` to a broker that is not running."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dslo_edge.broker import Broker, find_mosquitto
from tests.cli_process import run_cli

pytest.importorskip("keras")
if find_mosquitto() is None:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


@pytest.fixture
def stopped_broker_url(broker_factory: Callable[..., Broker]) -> str:
    """Return the URL of a mosquitto that ran on loopback and was stopped."""
    broker = broker_factory("mosquitto")
    port = broker.port
    broker.stop()
    return f"mqtt://127.0.0.1:{port}"


def _assert_names_broker_and_fix(result, url: str) -> None:
    address = url.removeprefix("mqtt://")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"error: cannot reach the broker at {address}: ")
    assert "Connection refused" in lines[0]
    assert "expected an MQTT broker listening there" in lines[0]
    assert lines[0].endswith("pass its URL with --broker")


def test_push_to_stopped_broker(mlp_pair, tmp_path: Path, stopped_broker_url) -> None:
    data = tmp_path / "samples.npz"
    np.savez(data, x=np.random.default_rng(0).random((5, 64), dtype=np.float32))

    result = run_cli(
        "push",
        "--bundle",
        str(mlp_pair.bundle),
        "--data",
        str(data),
        "--device",
        "kitchen",
        "--broker",
        stopped_broker_url,
    )

    _assert_names_broker_and_fix(result, stopped_broker_url)


def test_ota_send_to_stopped_broker(mlp_pair, stopped_broker_url) -> None:
    result = run_cli(
        "ota-send",
        str(mlp_pair.bundle),
        "--device",
        "kitchen",
        "--broker",
        stopped_broker_url,
    )

    _assert_names_broker_and_fix(result, stopped_broker_url)
