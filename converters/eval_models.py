"""Keras side of ``dslo-edge evaluate``: teacher rounds and the student bundle.

The evaluation trains everything on the device side through the converted
LiteRT student. Only the hub's teacher and the factory student are trained
here, with Keras, and the teacher's outputs per round are returned as arrays
so the evaluation needs no teacher conversion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402  (after quieting TensorFlow's C++ logging)

from converters.bundle import convert_bundle  # noqa: E402
from converters.demo_models import build_student, build_teacher  # noqa: E402


@dataclass(frozen=True)
class EvalModels:
    """A converted student bundle and the teacher's probabilities per round.

    Attributes:
        bundle: bundle directory with the factory student and final teacher.
        teacher_rounds: one dict per round, mapping each name passed in
            ``predict_on`` to the teacher probabilities (N, K) on that set.
    """

    bundle: Path
    teacher_rounds: list[dict[str, np.ndarray]]


def train_eval_models(
    student_data: tuple[np.ndarray, np.ndarray],
    teacher_data: tuple[np.ndarray, np.ndarray],
    predict_on: dict[str, np.ndarray],
    out: Path,
    *,
    seed: int,
    round_epochs: list[int],
    student_hidden: int,
    student_epochs: int,
    teacher_rate: float = 3e-4,
) -> EvalModels:
    """Train the factory student and the teacher rounds, then convert.

    The teacher trains with a low Adam rate and is read out after each
    cumulative epoch count in ``round_epochs``, so early rounds are unsure
    and late ones sharp, as a hub's improving teacher would be.
    """
    keras.utils.set_random_seed(seed)
    x, y = student_data
    class_count = int(max(y.max(), teacher_data[1].max())) + 1
    student = build_student(x.shape[1], class_count, student_hidden)
    student.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy"
    )
    student.fit(x, y, epochs=student_epochs, batch_size=64, verbose=0)

    teacher = build_teacher(x.shape[1], class_count)
    teacher.compile(
        optimizer=keras.optimizers.Adam(teacher_rate),
        loss="sparse_categorical_crossentropy",
    )
    rounds = []
    done = 0
    for epochs in round_epochs:
        teacher.fit(
            *teacher_data, epochs=epochs - done, batch_size=64, verbose=0, shuffle=True
        )
        done = epochs
        rounds.append(
            {
                name: teacher.predict(inputs, verbose=0, batch_size=1024)
                for name, inputs in predict_on.items()
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    bundle = out / "bundle"
    convert_bundle(teacher, student, bundle, overwrite=True)
    return EvalModels(bundle, rounds)
