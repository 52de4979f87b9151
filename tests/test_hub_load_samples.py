"""Reading the hub's .npz sample files: damaged files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dslo_edge.errors import ConfigError
from dslo_edge.hub import load_samples


def write_samples(path: Path, **arrays: np.ndarray) -> Path:
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    np.savez(path, **{"x": x, **arrays})
    return path


def test_truncated_npz_is_config_error(tmp_path: Path) -> None:
    whole = write_samples(tmp_path / "whole.npz").read_bytes()
    path = tmp_path / "truncated.npz"
    path.write_bytes(whole[: len(whole) // 2])

    with pytest.raises(ConfigError, match="cannot read .*truncated.npz as .npz"):
        load_samples(path)


def test_npz_with_bad_crc_is_config_error(tmp_path: Path) -> None:
    data = bytearray(write_samples(tmp_path / "crc.npz").read_bytes())
    # A byte inside the x.npy member's data, past its local file header.
    data[200] ^= 0xFF
    path = tmp_path / "crc.npz"
    path.write_bytes(bytes(data))

    with pytest.raises(ConfigError, match="Bad CRC-32"):
        load_samples(path)
