"""Datasets of the evaluation, each split five ways with a device shift.

Every dataset is real and ships inside a package, so the evaluation needs no
network:

- ``digits``: scikit-learn's 1,797 handwritten 8x8 digits, 10 classes, with
  the tilted, dimmed, noisy camera of ``dslo_edge.digits``.
- ``segment``: the UCI image segmentation data (2,310 outdoor image regions,
  18 colour and texture features, 7 classes) as shipped in the ``river``
  package. 224 of its rows repeat an earlier row exactly, so 2,086 distinct
  rows are split. The device's camera is darker and bluer: the intensity
  and colour means are scaled by 0.6, the blue means by a further 1.25, and
  every feature gets Gaussian noise of 0.15 of its standard deviation.

Splits:

- ``base`` (clean, labelled) trains the factory student and the teacher;
- ``hub`` (clean, labelled) is extra teacher data, also augmented;
- ``adapt`` (shifted) is the device's stream, used without labels;
- ``val`` (shifted, labelled) chooses hyper-parameters;
- ``test`` (shifted, labelled) is only reported.
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import zipfile
from dataclasses import dataclass

import numpy as np

from dslo_edge.digits import device_shift, hub_augment

DATASETS = ("digits", "segment")
# Fractions of base, hub, adapt and val; test is the rest.
SPLIT_FRACTIONS = (0.35, 0.15, 0.25, 0.125)

SEGMENT_SHIFT = {"exposure": 0.6, "blue_cast": 1.25, "noise_std": 0.15}
# Colour features of the segment data that a camera's exposure scales.
_SEGMENT_INTENSITY = (
    "intensity-mean",
    "rawred-mean",
    "rawblue-mean",
    "rawgreen-mean",
    "exred-mean",
    "exblue-mean",
    "exgreen-mean",
    "value-mean",
)
_SEGMENT_BLUE = ("rawblue-mean", "exblue-mean")


@dataclass(frozen=True)
class EvalSplits:
    """Inputs (float32) and labels (int32) of one dataset and seed.

    ``rows`` maps each split name (``base``, ``hub``, ``adapt``, ``val``,
    ``test``) to the dataset rows it was drawn from, as indices into the
    dataset in its shipped order.
    """

    name: str
    base: tuple[np.ndarray, np.ndarray]
    teacher: tuple[np.ndarray, np.ndarray]
    adapt: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    shift: dict[str, object]
    rows: dict[str, np.ndarray]

    @property
    def class_count(self) -> int:
        return int(self.base[1].max()) + 1


SPLIT_NAMES = ("base", "hub", "adapt", "val", "test")


def _split_order(features: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Split the distinct rows of ``features`` (N, ...) into the five splits.

    A row repeated in the dataset keeps only its first occurrence, because
    copies in different splits would put test or val samples into the
    training data.
    """
    flat = features.reshape(len(features), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    distinct = np.sort(first)
    cuts = (np.cumsum(SPLIT_FRACTIONS) * len(distinct)).astype(int)
    return np.split(distinct[rng.permutation(len(distinct))], cuts)


def _split_rows(parts: list[np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip(SPLIT_NAMES, parts, strict=True))


def load_eval_splits(name: str, seed: int) -> EvalSplits:
    """Load and split one dataset for one seed.

    Raises:
        ValueError: ``name`` is not in ``DATASETS``.
    """
    if name == "digits":
        return _digits(seed)
    if name == "segment":
        return _segment(seed)
    raise ValueError(f"unknown dataset {name!r}, expected one of {DATASETS}")


def _digits(seed: int) -> EvalSplits:
    from sklearn.datasets import load_digits

    from dslo_edge.digits import SHIFT_DESCRIPTION

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    parts = _split_order(images, rng)
    base, hub, adapt, val, test = parts

    def flat(batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1).astype(np.float32)

    def shifted(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return flat(device_shift(images[index], rng)), labels[index]

    clean = np.concatenate([base, hub])
    augmented = [hub_augment(images[clean], rng) for _ in range(3)]
    teacher_x = np.concatenate([flat(images[clean]), *map(flat, augmented)])
    teacher_y = np.concatenate([labels[clean]] * 4)
    return EvalSplits(
        name="digits",
        base=(flat(images[base]), labels[base]),
        teacher=(teacher_x, teacher_y),
        adapt=shifted(adapt),
        val=shifted(val),
        test=shifted(test),
        shift=dict(SHIFT_DESCRIPTION),
        rows=_split_rows(parts),
    )


def read_segment() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return the segment features (2310, 18), labels and feature names."""
    archive = importlib.resources.files("river") / "datasets" / "segment.csv.zip"
    with zipfile.ZipFile(io.BytesIO(archive.read_bytes())) as bundle:
        text = bundle.read(bundle.namelist()[0]).decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], rows[1:]
    names = header[:-1]
    classes = sorted({row[-1] for row in body})
    x = np.array([[float(v) for v in row[:-1]] for row in body], dtype=np.float64)
    y = np.array([classes.index(row[-1]) for row in body], dtype=np.int32)
    return x, y, names


def _segment(seed: int) -> EvalSplits:
    raw, labels, names = read_segment()
    rng = np.random.default_rng(seed)
    parts = _split_order(raw, rng)
    base, hub, adapt, val, test = parts
    mean = raw[base].mean(axis=0)
    std = raw[base].std(axis=0) + 1e-6
    intensity = np.array([names.index(n) for n in _SEGMENT_INTENSITY])
    blue = np.array([names.index(n) for n in _SEGMENT_BLUE])

    def scaled(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)

    def camera(index: np.ndarray, gain: np.ndarray) -> np.ndarray:
        x = raw[index].copy()
        x[:, intensity] *= gain[:, None]
        x[:, blue] *= SEGMENT_SHIFT["blue_cast"]
        noise = rng.normal(0.0, SEGMENT_SHIFT["noise_std"], size=x.shape) * std
        return scaled(x + noise)

    def shifted(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gain = np.full(len(index), SEGMENT_SHIFT["exposure"])
        return camera(index, gain), labels[index]

    clean = np.concatenate([base, hub])
    # The hub's teacher trains on many exposures, but not the device's colour cast.
    augmented = []
    for _ in range(3):
        x = raw[clean].copy()
        x[:, intensity] *= rng.uniform(0.6, 1.2, size=len(clean))[:, None]
        augmented.append(scaled(x + rng.normal(0.0, 0.1, size=x.shape) * std))
    teacher_x = np.concatenate([scaled(raw[clean]), *augmented])
    teacher_y = np.concatenate([labels[clean]] * 4)
    return EvalSplits(
        name="segment",
        base=(scaled(raw[base]), labels[base]),
        teacher=(teacher_x, teacher_y),
        adapt=shifted(adapt),
        val=shifted(val),
        test=shifted(test),
        shift=dict(SEGMENT_SHIFT),
        rows=_split_rows(parts),
    )
