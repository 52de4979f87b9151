"""Sample ids the hub gives to data files that have none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dslo_edge.errors import ConfigError
from dslo_edge.hub import default_sample_ids, load_samples


def test_ids_follow_content_across_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    first = rng.random((4, 64), dtype=np.float32)
    second = np.concatenate([rng.random((3, 64), dtype=np.float32), first[:1]])
    np.savez(tmp_path / "a.npz", x=first)
    np.savez(tmp_path / "b.npz", x=second)

    ids_a = load_samples(tmp_path / "a.npz").ids
    ids_b = load_samples(tmp_path / "b.npz").ids

    # The shared input keeps its id, and the other inputs get new ones.
    assert ids_b[3] == ids_a[0]
    assert set(ids_b[:3]).isdisjoint(ids_a)
    assert all(len(sample_id) == 13 for sample_id in ids_a)


def test_repeated_rows_get_unique_ids() -> None:
    row = np.arange(64, dtype=np.float32)
    x = np.stack([row, row + 1, row, row])

    ids = default_sample_ids(x)

    assert ids[2] == ids[0] + "-2"
    assert ids[3] == ids[0] + "-3"
    assert len(set(ids)) == 4


def test_given_ids_are_kept(tmp_path: Path) -> None:
    x = np.zeros((2, 64), dtype=np.float32) + np.array([[0.0], [1.0]], np.float32)
    np.savez(tmp_path / "c.npz", x=x, ids=np.array(["left", "right"]))

    assert load_samples(tmp_path / "c.npz").ids == ["left", "right"]


def test_ids_over_255_bytes_are_rejected(tmp_path: Path) -> None:
    x = np.zeros((2, 64), dtype=np.float32) + np.array([[0.0], [1.0]], np.float32)
    # 128 two-byte characters: 256 bytes of UTF-8.
    np.savez(tmp_path / "long.npz", x=x, ids=np.array(["short", "é" * 128]))

    with pytest.raises(ConfigError) as caught:
        load_samples(tmp_path / "long.npz")

    assert "ids[1]" in str(caught.value)
    assert "is 256 bytes of UTF-8; expected at most 255" in str(caught.value)


def test_ids_that_are_not_utf8_are_rejected(tmp_path: Path) -> None:
    x = np.zeros((2, 64), dtype=np.float32) + np.array([[0.0], [1.0]], np.float32)
    np.savez(tmp_path / "surrogate.npz", x=x, ids=np.array(["a\ud800", "b"]))

    with pytest.raises(ConfigError, match=r"ids\[0\] .* is not valid Unicode text"):
        load_samples(tmp_path / "surrogate.npz")
