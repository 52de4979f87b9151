"""Reading the bundle's probe.npz: arrays that the health check cannot use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dslo_edge.errors import BundleError
from dslo_edge.health import load_multi_head_probe, load_probe

INPUT_SHAPE = (4,)
CLASSES = 3


def write_probe(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def inputs(rows: int = 3) -> np.ndarray:
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)


def test_valid_probe_is_read(tmp_path: Path) -> None:
    path = write_probe(tmp_path / "probe.npz", x=inputs(), y=np.array([0.0, 2.0, 1.0]))

    probe = load_probe(path, INPUT_SHAPE, CLASSES)

    assert probe.x.dtype == np.float32
    assert probe.x.shape == (3, 4)
    assert probe.y.dtype == np.int64
    assert probe.y.tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    ("arrays", "shown"),
    [
        ({"y": np.array([0.0, 1.5, 2.0])}, "y[1] is 1.5; expected a whole class"),
        ({"y": np.array([0.0, np.nan, 2.0])}, "y[1] is nan; expected a whole class"),
        (
            {"y": np.array([0, 5, 4])},
            "has labels 0..5, but the student has 3 classes; expected labels in 0..2",
        ),
        (
            {"y": np.array([-1, 0, 1])},
            "has labels -1..1, but the student has 3 classes",
        ),
    ],
)
def test_bad_labels_are_named(
    tmp_path: Path, arrays: dict[str, np.ndarray], shown: str
) -> None:
    path = write_probe(tmp_path / "probe.npz", x=inputs(), **arrays)

    with pytest.raises(BundleError) as caught:
        load_probe(path, INPUT_SHAPE, CLASSES)

    assert shown in str(caught.value)
    assert str(path) in str(caught.value)


def test_non_finite_input_is_rejected(tmp_path: Path) -> None:
    x = inputs()
    x[2, 1] = np.nan
    path = write_probe(tmp_path / "probe.npz", x=x, y=np.array([0, 1, 2]))

    with pytest.raises(BundleError) as caught:
        load_probe(path, INPUT_SHAPE, CLASSES)

    assert "x[2] contains NaN or infinity" in str(caught.value)


def test_missing_labels_list_arrays(tmp_path: Path) -> None:
    path = write_probe(tmp_path / "probe.npz", x=inputs(), labels=np.array([0, 1, 2]))

    with pytest.raises(BundleError) as caught:
        load_probe(path, INPUT_SHAPE, CLASSES)

    assert "has arrays ['labels', 'x']" in str(caught.value)
    assert "numpy.savez(path, x=x, y=y)" in str(caught.value)


def test_text_file_is_not_called_pickle(tmp_path: Path) -> None:
    path = tmp_path / "probe.npz"
    path.write_text("x,y\n1,2\n")

    with pytest.raises(BundleError) as caught:
        load_probe(path, INPUT_SHAPE, CLASSES)

    assert "is not an .npz archive (it starts with b'x,y\\n')" in str(caught.value)
    assert "pickle" not in str(caught.value)


def test_single_npy_array_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "probe.npz"
    with open(path, "wb") as stream:
        np.save(stream, inputs())

    with pytest.raises(BundleError) as caught:
        load_probe(path, INPUT_SHAPE, CLASSES)

    assert "is not an .npz archive" in str(caught.value)


HEADS = {"digit": 10, "shape": 3}


def test_multi_head_probe_is_read(tmp_path: Path) -> None:
    path = write_probe(
        tmp_path / "probe.npz",
        x=inputs(),
        y_digit=np.array([9, 0, 4]),
        y_shape=np.array([2.0, 1.0, 0.0]),
    )

    probe = load_multi_head_probe(path, INPUT_SHAPE, HEADS)

    assert probe.x.shape == (3, 4)
    assert list(probe.labels) == ["digit", "shape"]
    assert probe.labels["digit"].tolist() == [9, 0, 4]
    assert probe.labels["shape"].dtype == np.int64
    assert probe.labels["shape"].tolist() == [2, 1, 0]


@pytest.mark.parametrize(
    ("arrays", "shown"),
    [
        (
            {"y_digit": np.array([0, 1, 2]), "y_shape": np.array([0.0, 0.5, 2.0])},
            "y_shape[1] is 0.5; expected a whole class index from 0 to 2",
        ),
        (
            {"y_digit": np.array([0, 1, 2]), "y_shape": np.array([0, 3, 1])},
            "has y_shape labels 0..3, but head 'shape' has 3 classes; "
            "expected labels in 0..2",
        ),
        (
            {"y_digit": np.array([0, 10, 2]), "y_shape": np.array([0, 1, 2])},
            "has y_digit labels 0..10, but head 'digit' has 10 classes",
        ),
        (
            {"y_digit": np.array([0, 1]), "y_shape": np.array([0, 1, 2])},
            "has x (3, 4) and y_digit (2,); expected x (N, 4) and y_digit (N,)",
        ),
        (
            {"y_digit": np.array([0, 1, 2]), "y_shape": np.zeros((3, 3))},
            "has x (3, 4) and y_shape (3, 3); expected x (N, 4) and y_shape (N,)",
        ),
    ],
)
def test_bad_head_labels_are_named(
    tmp_path: Path, arrays: dict[str, np.ndarray], shown: str
) -> None:
    path = write_probe(tmp_path / "probe.npz", x=inputs(), **arrays)

    with pytest.raises(BundleError) as caught:
        load_multi_head_probe(path, INPUT_SHAPE, HEADS)

    assert shown in str(caught.value)
    assert str(path) in str(caught.value)


def test_single_label_array_names_head_arrays(tmp_path: Path) -> None:
    path = write_probe(tmp_path / "probe.npz", x=inputs(), y=np.array([0, 1, 2]))

    with pytest.raises(BundleError) as caught:
        load_multi_head_probe(path, INPUT_SHAPE, HEADS)

    message = str(caught.value)
    assert "has arrays ['x', 'y']: a single y fits only a single-head" in message
    assert "save each head's labels as y_<head>" in message
    assert "numpy.savez(path, x=x, y_digit=..., y_shape=...)" in message


def test_missing_head_labels_are_named(tmp_path: Path) -> None:
    path = write_probe(tmp_path / "probe.npz", x=inputs(), y_digit=np.arange(3))

    with pytest.raises(BundleError) as caught:
        load_multi_head_probe(path, INPUT_SHAPE, HEADS)

    message = str(caught.value)
    assert "has arrays ['x', 'y_digit'], without y_shape" in message
    assert "one label array per head (y_digit, y_shape)" in message


def test_labels_of_unknown_head_are_rejected(tmp_path: Path) -> None:
    path = write_probe(
        tmp_path / "probe.npz",
        x=inputs(),
        y_digit=np.arange(3),
        y_shape=np.arange(3),
        y_shapes=np.arange(3),
    )

    with pytest.raises(BundleError) as caught:
        load_multi_head_probe(path, INPUT_SHAPE, HEADS)

    assert "has y_shapes, which names no head of the student" in str(caught.value)


def test_probe_for_other_heads_names_missing(tmp_path: Path) -> None:
    path = write_probe(
        tmp_path / "probe.npz",
        x=inputs(),
        y_cat=np.arange(3),
        y_dog=np.arange(3),
    )

    with pytest.raises(BundleError) as caught:
        load_multi_head_probe(path, INPUT_SHAPE, HEADS)

    message = str(caught.value)
    assert "has y_cat, y_dog, which name no head of the student" in message
    assert "and lacks y_digit, y_shape;" in message


def test_misspelt_probe_head_names_both(tmp_path: Path) -> None:
    path = write_probe(
        tmp_path / "probe.npz",
        x=inputs(),
        y_digit=np.arange(3),
        y_shpae=np.arange(3),
    )

    with pytest.raises(BundleError) as caught:
        load_multi_head_probe(path, INPUT_SHAPE, HEADS)

    message = str(caught.value)
    assert "has y_shpae, which names no head of the student" in message
    assert "and lacks y_shape;" in message


def test_non_finite_input_of_multi_head_probe(tmp_path: Path) -> None:
    x = inputs()
    x[1, 0] = np.inf
    path = write_probe(
        tmp_path / "probe.npz", x=x, y_digit=np.arange(3), y_shape=np.arange(3)
    )

    with pytest.raises(BundleError) as caught:
        load_multi_head_probe(path, INPUT_SHAPE, HEADS)

    assert "x[1] contains NaN or infinity" in str(caught.value)
