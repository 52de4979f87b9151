"""The TensorFlow side of ``dslo-edge bench``: the bundle and the reference step.

The reference is ``StudentModule.train_step``, the function that the converter
lowers to the bundle's ``train`` signature, run as a ``tf.function``. The
bench times the same step in TensorFlow and in the LiteRT interpreter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402  (after quieting TensorFlow's C++ logging)

from converters.bundle import convert_bundle  # noqa: E402
from converters.demo_models import build_student, build_teacher  # noqa: E402
from converters.layers import read_student  # noqa: E402
from converters.student_graph import StudentModule  # noqa: E402


def convert_digits_pair(out: Path, seed: int = 0) -> tuple[Any, Path]:
    """Convert an untrained digits student (64-32-10 MLP) and teacher.

    Returns:
        The Keras student and the bundle directory ``out/bundle``. The
        timings do not depend on the weights, so nothing is trained.
    """
    import keras

    keras.utils.set_random_seed(seed)
    student = build_student(64, 10)
    bundle = out / "bundle"
    convert_bundle(build_teacher(64, 10), student, bundle, overwrite=True)
    return student, bundle


class TensorFlowTrainStep:
    """One SGD step of the student's distillation loss as a ``tf.function``.

    TensorFlow runs with its default thread pools, as a workstation user
    would run it. The LiteRT interpreter in the bundle runs on one thread.
    """

    def __init__(self, student: Any):
        module = StudentModule(read_student(student))
        classes = module.class_count
        self._step = tf.function(
            module.train_step,
            input_signature=[
                tf.TensorSpec([None, *module.input_shape], tf.float32),
                tf.TensorSpec([None, classes], tf.float32),
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None], tf.float32),
                tf.TensorSpec([], tf.float32),
                tf.TensorSpec([], tf.float32),
            ],
        )

    def __call__(
        self,
        x: np.ndarray,
        soft: np.ndarray,
        hard: np.ndarray,
        alpha: np.ndarray,
        temperature: float,
        learning_rate: float,
    ) -> float:
        """Run one step on numpy inputs and return the loss."""
        loss = self._step(
            x, soft, hard, alpha, np.float32(temperature), np.float32(learning_rate)
        )
        return float(loss)
