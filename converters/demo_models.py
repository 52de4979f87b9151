"""Small Keras teacher and student for the digits demo (workstation side)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402  (after quieting TensorFlow's C++ logging)


def build_student(input_size: int, class_count: int, hidden: int = 32) -> keras.Model:
    """Return the MLP student: input, one ReLU hidden layer, softmax output."""
    return keras.Sequential(
        [
            keras.Input((input_size,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(class_count, activation="softmax"),
        ],
        name="student",
    )


def build_teacher(input_size: int, class_count: int) -> keras.Model:
    """Return the larger teacher MLP."""
    return keras.Sequential(
        [
            keras.Input((input_size,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(class_count, activation="softmax"),
        ],
        name="teacher",
    )


def _fit(
    model: keras.Model, x: np.ndarray, y: np.ndarray, epochs: int, rate: float
) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, shuffle=True)


def train_student(
    x: np.ndarray, y: np.ndarray, seed: int, path: Path, epochs: int = 40
) -> Path:
    """Train the student on hard labels and save it as ``.keras``."""
    keras.utils.set_random_seed(seed)
    model = build_student(x.shape[1], int(y.max()) + 1)
    _fit(model, x, y, epochs, 3e-3)
    model.save(path)
    return path


def train_teacher_rounds(
    x: np.ndarray, y: np.ndarray, seed: int, folder: Path, round_epochs: list[int]
) -> list[Path]:
    """Train the teacher and save a snapshot after each listed epoch count.

    Early snapshots are uncertain (soft outputs), later ones sharp: the
    rounds a hub would publish while its teacher keeps training.
    """
    keras.utils.set_random_seed(seed)
    model = build_teacher(x.shape[1], int(y.max()) + 1)
    # A low rate keeps the first rounds visibly unsure.
    model.compile(
        optimizer=keras.optimizers.Adam(3e-4), loss="sparse_categorical_crossentropy"
    )
    paths = []
    done = 0
    for index, epochs in enumerate(round_epochs, start=1):
        model.fit(x, y, epochs=epochs - done, batch_size=64, verbose=0, shuffle=True)
        done = epochs
        path = folder / f"teacher-round-{index}.keras"
        model.save(path)
        paths.append(path)
    return paths
