"""Reading the hub's .npz sample files: damaged files and bad labels."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from dslo_edge.errors import ConfigError
from dslo_edge.hub import check_samples, load_samples


def write_samples(path: Path, **arrays: np.ndarray) -> Path:
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    np.savez(path, **{"x": x, **arrays})
    return path


def test_truncated_npz_is_config_error(tmp_path: Path) -> None:
    whole = write_samples(tmp_path / "whole.npz").read_bytes()
    path = tmp_path / "truncated.npz"
    path.write_bytes(whole[: len(whole) // 2])

    with pytest.raises(ConfigError) as caught:
        load_samples(path)

    message = str(caught.value)
    assert message.startswith(f"cannot read {path} as .npz: ")
    assert message.endswith(
        "; the file is damaged or incomplete, so write it again with "
        "numpy.savez(path, x=x)"
    )


def test_unreadable_npz_path_is_not_called_damaged(tmp_path: Path) -> None:
    # The open fails before numpy reads any bytes, so no message calls the file
    # damaged, because writing it again would not help.
    folder = tmp_path / "samples.npz"
    folder.mkdir()

    with pytest.raises(ConfigError) as caught:
        load_samples(folder)

    message = str(caught.value)
    assert message.startswith(f"cannot read {folder} as .npz: [Errno 21] ")
    assert "damaged" not in message
    assert "numpy.savez" not in message


def test_object_array_names_pickle_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    ragged = np.empty(2, dtype=object)
    ragged[0] = [0.1]
    ragged[1] = [0.1, 0.2]
    np.savez(path, x=ragged)

    with pytest.raises(ConfigError) as caught:
        load_samples(path)

    assert str(caught.value) == (
        f"cannot read {path} as .npz: it contains an object array, which needs "
        "pickle; save x, y and ids as numeric or string arrays"
    )


def test_npz_with_bad_crc_is_config_error(tmp_path: Path) -> None:
    data = bytearray(write_samples(tmp_path / "crc.npz").read_bytes())
    # A byte inside the x.npy member's data, past its local file header.
    data[200] ^= 0xFF
    path = tmp_path / "crc.npz"
    path.write_bytes(bytes(data))

    with pytest.raises(ConfigError, match="Bad CRC-32"):
        load_samples(path)


def test_damaged_compressed_npz_is_config_error(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    np.savez_compressed(tmp_path / "compressed.npz", x=x)
    data = bytearray((tmp_path / "compressed.npz").read_bytes())
    # The local file header of the only member, x.npy, is 30 bytes, then its
    # name and extra field. The deflate data follows them.
    name_length, extra_length = struct.unpack_from("<HH", data, 26)
    start = 30 + name_length + extra_length
    # A final block of the reserved type 3, which zlib rejects.
    data[start] = 0b111
    path = tmp_path / "damaged.npz"
    path.write_bytes(bytes(data))

    with pytest.raises(ConfigError, match="cannot read .*damaged.npz as .npz: "):
        load_samples(path)


def test_text_file_is_not_called_pickle(tmp_path: Path) -> None:
    path = tmp_path / "samples.npz"
    path.write_text("0.1,0.2,0.3\n")

    with pytest.raises(ConfigError) as caught:
        load_samples(path)

    assert str(caught.value) == (
        f"cannot read {path} as .npz: it is not a zip archive (it starts with "
        "b'0.1,0.'); save the arrays with numpy.savez(path, x=x)"
    )
    assert "pickle" not in str(caught.value)


def test_empty_file_is_named_empty(tmp_path: Path) -> None:
    path = tmp_path / "samples.npz"
    path.write_bytes(b"")

    with pytest.raises(ConfigError) as caught:
        load_samples(path)

    assert str(caught.value) == (
        f"cannot read {path} as .npz: it is not a zip archive (it is empty); "
        "save the arrays with numpy.savez(path, x=x)"
    )


@pytest.mark.parametrize(
    ("labels", "shown"),
    [
        (np.array([0.0, 1.5, 2.0]), "y[1] is 1.5"),
        (np.array([0.0, np.nan, 2.0]), "y[1] is nan"),
        (np.array([0, 2**32 + 3, 2], dtype=np.int64), "y[1] is 4294967299"),
    ],
)
def test_labels_that_change_in_int32_are_rejected(
    tmp_path: Path, labels: np.ndarray, shown: str
) -> None:
    path = write_samples(tmp_path / "labels.npz", y=labels)

    with pytest.raises(ConfigError) as caught:
        load_samples(path)

    assert shown in str(caught.value)
    assert "expected a whole class index that fits int32" in str(caught.value)


def test_whole_float_labels_are_read(tmp_path: Path) -> None:
    path = write_samples(tmp_path / "labels.npz", y=np.array([0.0, 1.0, 9.0]))

    labels = load_samples(path).y

    assert labels is not None
    assert labels.dtype == np.int32
    assert labels.tolist() == [0, 1, 9]


def test_one_hot_labels_are_rejected(tmp_path: Path) -> None:
    path = write_samples(tmp_path / "one_hot.npz", y=np.eye(10)[[1, 2, 3]])

    with pytest.raises(ConfigError) as caught:
        load_samples(path)

    assert "y has shape (3, 10); expected one class index per sample" in str(
        caught.value
    )
    assert "y.argmax(axis=1)" in str(caught.value)


@pytest.mark.parametrize(
    ("arrays", "shown"),
    [
        ({"y": np.array([0, 1])}, "x has 3 samples (shape (3, 64)), but y has 2"),
        (
            {"ids": np.array(["a", "b", "c", "d"])},
            "x has 3 samples (shape (3, 64)), but ids has 4",
        ),
        (
            {"y": np.array([0]), "ids": np.array(["a"])},
            "but y has 1 and ids has 1",
        ),
    ],
)
def test_length_mismatch_names_lengths(
    tmp_path: Path, arrays: dict[str, np.ndarray], shown: str
) -> None:
    path = write_samples(tmp_path / "lengths.npz", **arrays)

    with pytest.raises(ConfigError) as caught:
        load_samples(path)

    assert shown in str(caught.value)
    assert "expected one entry per row of x" in str(caught.value)


def test_shape_mismatch_of_same_size_suggests_reshape(tmp_path: Path) -> None:
    images = np.zeros((3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "images.npz", x=images)
    samples = load_samples(tmp_path / "images.npz")

    with pytest.raises(ConfigError) as caught:
        check_samples(samples, (8, 8, 1), 10, "images.npz")

    assert (
        "x has samples of shape (8, 8), but the bundle's student takes (8, 8, 1)"
        in (str(caught.value))
    )
    assert "save x.reshape(len(x), 8, 8, 1)" in str(caught.value)


def test_shape_mismatch_of_other_size_has_no_reshape(tmp_path: Path) -> None:
    np.savez(tmp_path / "narrow.npz", x=np.zeros((3, 32), dtype=np.float32))
    samples = load_samples(tmp_path / "narrow.npz")

    with pytest.raises(ConfigError) as caught:
        check_samples(samples, (64,), 10, "narrow.npz")

    assert "x has samples of shape (32,), but the bundle's student takes (64,)" in (
        str(caught.value)
    )
    assert "reshape" not in str(caught.value)


def test_skip_keeps_head_labels_aligned(tmp_path: Path) -> None:
    # dslo-edge push --skip-samples with --hard-labels resumes a multi-head
    # push, so each head's labels must stay with their samples and ids.
    path = write_samples(
        tmp_path / "heads.npz",
        ids=np.array(["a", "b", "c"]),
        y_digit=np.array([7, 8, 9]),
        y_shape=np.array([0, 1, 2]),
    )
    samples = load_samples(path, heads=["digit", "shape"])

    rest = samples.skip(1)

    assert samples.y is None
    assert samples.head_y is not None
    assert rest.head_y is not None
    assert rest.ids == ["b", "c"]
    np.testing.assert_array_equal(rest.x, samples.x[1:])
    assert rest.head_y["digit"].tolist() == [8, 9]
    assert rest.head_y["shape"].tolist() == [1, 2]
    assert rest.head_y["digit"].dtype == np.int32


def test_misspelt_head_label_is_named(tmp_path: Path) -> None:
    path = write_samples(
        tmp_path / "heads.npz",
        y_digit=np.array([7, 8, 9]),
        y_shpae=np.array([0, 1, 2]),
    )

    with pytest.raises(ConfigError) as caught:
        load_samples(path, heads=["digit", "shape"])

    message = str(caught.value)
    assert f"{path} lacks y_shape and has y_shpae, which names no head" in message
    assert "numpy.savez(path, x=x, y_digit=..., y_shape=...)" in message


def test_labels_of_two_unknown_heads_are_named(tmp_path: Path) -> None:
    path = write_samples(
        tmp_path / "heads.npz",
        y_digit=np.array([7, 8, 9]),
        y_shape=np.array([0, 1, 2]),
        y_cat=np.array([0, 1, 2]),
        y_dog=np.array([0, 1, 2]),
    )

    with pytest.raises(ConfigError) as caught:
        load_samples(path, heads=["digit", "shape"])

    assert f"{path} has y_cat, y_dog, which name no head of" in str(caught.value)


def test_minus_one_label_is_accepted(tmp_path: Path) -> None:
    path = write_samples(tmp_path / "labels.npz", y=np.array([-1, 4, -1]))
    samples = load_samples(path)

    check_samples(samples, (64,), 10, "labels.npz")

    assert samples.y is not None
    assert samples.y.tolist() == [-1, 4, -1]


def test_minus_one_head_label_is_accepted(tmp_path: Path) -> None:
    path = write_samples(
        tmp_path / "heads.npz",
        y_digit=np.array([-1, -1, -1]),
        y_shape=np.array([2, -1, 0]),
    )
    samples = load_samples(path, heads=["digit", "shape"])

    check_samples(
        samples, (64,), 0, "heads.npz", head_classes={"digit": 10, "shape": 3}
    )

    assert samples.head_y is not None
    assert samples.head_y["digit"].tolist() == [-1, -1, -1]
    assert samples.head_y["shape"].tolist() == [2, -1, 0]


@pytest.mark.parametrize(
    ("labels", "index", "value"),
    [([0, -2, 9], 1, -2), ([-1, 3, -5], 2, -5), ([-1, -1, -2], 2, -2)],
)
def test_label_below_minus_one_is_rejected(
    tmp_path: Path, labels: list[int], index: int, value: int
) -> None:
    path = write_samples(tmp_path / "labels.npz", y=np.array(labels))
    samples = load_samples(path)

    with pytest.raises(ConfigError) as caught:
        check_samples(samples, (64,), 10, "labels.npz")

    assert str(caught.value) == (
        f"labels.npz: y[{index}] is {value}; expected a class index 0..9, or -1 "
        "for a sample without a hard label (invalid labels: 1 of 3)"
    )


def test_head_label_below_minus_one_is_rejected(tmp_path: Path) -> None:
    path = write_samples(
        tmp_path / "heads.npz",
        y_digit=np.array([7, 8, 9]),
        y_shape=np.array([-1, -3, 3]),
    )
    samples = load_samples(path, heads=["digit", "shape"])

    with pytest.raises(ConfigError) as caught:
        check_samples(
            samples, (64,), 0, "heads.npz", head_classes={"digit": 10, "shape": 3}
        )

    assert str(caught.value) == (
        "heads.npz: y_shape[1] is -3; expected a class index 0..2 of head "
        "'shape', or -1 for a sample without a hard label (invalid labels: 2 of 3)"
    )


def test_input_beyond_float32_is_named(tmp_path: Path) -> None:
    x = np.zeros((3, 64))
    x[2, 5] = 1e40
    path = tmp_path / "samples.npz"
    np.savez(path, x=x)

    # A RuntimeWarning from the float32 cast would print above the error.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError) as caught:
            load_samples(path)

    assert str(caught.value) == (
        f"{path}: x[2, 5] is 1e+40, beyond the float32 range of +-3.403e+38 "
        "that the student reads; scale x as the student's training data was "
        "scaled"
    )
