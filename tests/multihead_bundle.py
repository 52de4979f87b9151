"""A converted two-head student and updates for it, shared by the multi-head tests.

The student has a 64-input trunk and two heads: ``digit`` (10 classes, ends
in logits) and ``shape`` (3 classes, ends in a softmax).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.multihead_protocol import HeadLabels, MultiHeadUpdate
from dslo_edge.protocol import new_message_id

HEADS = {"digit": 10, "shape": 3}
INPUT_SIZE = 64


def convert_two_head_bundle(folder: Path) -> Path:
    """Convert an untrained two-head student and teacher into ``folder``."""
    import keras

    from converters.bundle import convert_bundle

    keras.utils.set_random_seed(11)
    convert_bundle(two_head_teacher(), _student(keras), folder)
    return folder


def _student(keras: Any) -> Any:
    x = keras.Input((INPUT_SIZE,))
    trunk = keras.layers.Dense(32, activation="relu", name="trunk")(x)
    digit = keras.layers.Dense(HEADS["digit"], name="digit")(trunk)
    shape = keras.layers.Dense(HEADS["shape"], activation="softmax", name="shape")(
        trunk
    )
    return keras.Model(x, [digit, shape])


def two_head_teacher() -> Any:
    """Return an untrained Keras teacher with one softmax output per head."""
    import keras

    x = keras.Input((INPUT_SIZE,))
    hidden = keras.layers.Dense(48, activation="tanh")(x)
    outputs = [
        keras.layers.Dense(classes, activation="softmax", name=name)(hidden)
        for name, classes in HEADS.items()
    ]
    return keras.Model(x, outputs)


def make_multi_head_update(
    seed: int, samples: int = 8, teacher_round: int = 1, id_prefix: str = "s"
) -> MultiHeadUpdate:
    """Return an update with probabilities and hard labels for ``digit`` and
    logits for ``shape``; sample ids are ``<id_prefix><seed>-<i>``."""
    rng = np.random.default_rng(seed)
    hard = rng.integers(0, HEADS["digit"], size=samples).astype(np.int32)
    hard[::3] = -1
    heads = {
        "digit": HeadLabels(
            rng.dirichlet(np.ones(HEADS["digit"]), size=samples).astype(np.float32),
            hard_labels=hard,
        ),
        "shape": HeadLabels(
            rng.normal(size=(samples, HEADS["shape"])).astype(np.float32),
            label_kind="logits",
            temperature=3.0,
        ),
    }
    return MultiHeadUpdate(
        message_id=new_message_id(),
        teacher_version="two-head-teacher",
        teacher_round=teacher_round,
        timestamp=time.time(),
        sample_ids=[f"{id_prefix}{seed}-{i}" for i in range(samples)],
        inputs=rng.random((samples, INPUT_SIZE), dtype=np.float32),
        heads=heads,
    )
