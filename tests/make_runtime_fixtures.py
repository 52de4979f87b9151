"""Write the converted models and TensorFlow results that runtime tests replay.

The runtime tests (``tests/test_runtime_*.py``) import neither TensorFlow nor
Keras, so they can run in an environment that has only an interpreter
package, for example tflite-runtime 2.14 with numpy < 2. This script runs in
the full environment and writes, into OUT_DIR:

- ``cases/NAME.tflite`` and ``cases/NAME.npz`` for each student in
  ``tests.converter_cases``: 50 batches, the loss of each step and the
  weights after step 1 and step 50 as computed by TensorFlow autodiff and
  ``keras.optimizers.SGD``;
- ``mobilenet/``: a bundle with the MobileNetV2-style student (Adam);
- ``digits.npz``: scikit-learn's digits (8x8) and labels.

Usage: python -m tests.make_runtime_fixtures OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tests.converter_cases import CASES
from tests.converter_parity import (
    KerasReference,
    convert_student,
    make_batches,
)

LEARNING_RATE = 0.05
STEPS = 50


def write_case(build, folder: Path) -> None:  # type: ignore[no-untyped-def]
    """Convert one case and record its TensorFlow trajectory."""
    import keras

    keras.utils.set_random_seed(1)
    model = build()
    reference = KerasReference(model, keras.optimizers.SGD())
    _, tflite = convert_student(model)
    input_shape = tuple(model.input_shape[1:])
    classes = int(model.output_shape[-1])
    batches = make_batches(input_shape, classes, STEPS, size=8)

    arrays: dict[str, np.ndarray] = {
        "x": np.stack([b.x for b in batches]),
        "soft": np.stack([b.soft for b in batches]),
        "hard": np.stack([b.hard for b in batches]),
        "alpha": np.stack([b.alpha for b in batches]),
        "learning_rate": np.float32(LEARNING_RATE),
    }
    losses = []
    for step, batch in enumerate(batches):
        losses.append(reference.train_step(batch, LEARNING_RATE))
        if step == 0:
            arrays.update(_prefixed("step1/", reference.weights()))
    arrays["loss"] = np.asarray(losses, np.float32)
    arrays.update(_prefixed("final/", reference.weights()))
    logits = np.asarray(reference.logits(batches[0].x, training=False))
    arrays["infer_log_softmax"] = _log_softmax(logits)

    name = build.__name__
    (folder / f"{name}.tflite").write_bytes(tflite)
    np.savez(folder / f"{name}.npz", **arrays)


def _prefixed(prefix: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + name: value for name, value in weights.items()}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def write_mobilenet(out: Path) -> None:
    """Convert the MobileNetV2-style student, with a small CNN teacher."""
    import keras
    from sklearn.datasets import load_digits

    from converters.bundle import convert_bundle
    from converters.mobilenet import build_mobilenet_student
    from converters.optimizers import OptimizerConfig

    keras.utils.set_random_seed(2)
    student = build_mobilenet_student()
    teacher = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, strides=4, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    convert_bundle(
        teacher,
        student,
        out / "mobilenet",
        overwrite=True,
        optimizer=OptimizerConfig("adam"),
    )
    digits = load_digits()
    np.savez(
        out / "digits.npz",
        images=digits.data.astype(np.float32),
        labels=digits.target.astype(np.int32),
    )


def main(out: Path) -> None:
    """Write every fixture into ``out``."""
    cases = out / "cases"
    cases.mkdir(parents=True, exist_ok=True)
    for build in CASES:
        write_case(build, cases)
    write_mobilenet(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.make_runtime_fixtures OUT_DIR")
    main(Path(sys.argv[1]))
