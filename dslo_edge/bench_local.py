"""In-process figures of ``dslo-edge bench``: train step, dynamic part, wire size.

Each figure is measured beside its reference in the same run. The train step
alternates blocks of interpreter steps with blocks of TensorFlow steps, so a
burst of load from another process slows both sides of one repeat.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.bench_dynamic import measure_dynamic_share, measure_numpy_floor
from dslo_edge.bundle import load_bundle
from dslo_edge.models import StudentModel
from dslo_edge.protocol import SoftLabelUpdate, encode_update, new_message_id

# (x, soft, hard, alpha, temperature, learning_rate) -> loss
TrainStep = Callable[..., Any]

TEMPERATURE = 2.0
LEARNING_RATE = 0.05
TOP_K = 3


def digits_inputs() -> tuple[np.ndarray, str]:
    """Return 8x8 digit images as (N, 64) float32 in [0, 1] and their source.

    scikit-learn bundles the digits, so no download is needed. Without
    scikit-learn the inputs are uniform noise of the same shape, which makes
    the JSON form of an update longer.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        noise = np.random.default_rng(0).random((1797, 64), dtype=np.float32)
        return noise, "uniform noise (scikit-learn is not installed)"
    images = load_digits().data.astype(np.float32) / 16.0
    return images, "scikit-learn digits"


def teacher_probabilities(count: int, classes: int, seed: int) -> np.ndarray:
    """Return teacher-like probability rows: softmax of random logits."""
    logits = np.random.default_rng(seed).normal(0.0, 2.0, size=(count, classes))
    exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(np.float32)


def make_update(
    inputs: np.ndarray, first: int, samples: int, teacher_round: int = 1
) -> SoftLabelUpdate:
    """Build an update of ``samples`` rows of ``inputs`` starting at ``first``."""
    rows = (np.arange(first, first + samples)) % len(inputs)
    return SoftLabelUpdate(
        message_id=new_message_id(),
        teacher_version="bench",
        teacher_round=teacher_round,
        timestamp=time.time(),
        sample_ids=[f"d{row}" for row in rows],
        inputs=inputs[rows],
        labels=teacher_probabilities(samples, 10, seed=first),
        label_kind="probabilities",
    )


@dataclass(frozen=True)
class StepTimes:
    """Median time of one train step in microseconds, per side.

    Attributes:
        interpreter_us: the bundle's ``train`` signature in LiteRT.
        tensorflow_us: the same step as a ``tf.function``.
        repeats: blocks timed per side; each block is ``steps`` steps.
        steps: steps per block.
    """

    interpreter_us: float
    tensorflow_us: float
    repeats: int
    steps: int


def _time_block(step: TrainStep, batch: tuple[Any, ...], steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step(*batch)
    return (time.perf_counter() - started) / steps * 1e6


def measure_train_step(
    bundle_path: Path,
    reference: TrainStep,
    *,
    batch_size: int = 32,
    repeats: int = 15,
    steps: int = 200,
) -> StepTimes:
    """Time the interpreter's train step against ``reference`` in turns.

    Both sides get the same numpy arrays. One warm-up block per side comes
    first, so tracing and tensor allocation are not timed.
    """
    student = StudentModel(load_bundle(bundle_path))
    inputs, _ = digits_inputs()
    soft = teacher_probabilities(batch_size, 10, seed=1)
    batch = (
        inputs[:batch_size],
        soft,
        np.argmax(soft, axis=1).astype(np.int32),
        np.full(batch_size, 0.5, dtype=np.float32),
        TEMPERATURE,
        LEARNING_RATE,
    )
    interpreter: list[float] = []
    tensorflow: list[float] = []
    _time_block(student.train_step, batch, max(1, steps // 10))
    _time_block(reference, batch, max(1, steps // 10))
    for _ in range(repeats):
        interpreter.append(_time_block(student.train_step, batch, steps))
        tensorflow.append(_time_block(reference, batch, steps))
    return StepTimes(
        interpreter_us=round(statistics.median(interpreter), 2),
        tensorflow_us=round(statistics.median(tensorflow), 2),
        repeats=repeats,
        steps=steps,
    )


def measure_update_split(
    bundle_path: Path, *, batch_size: int = 32, updates: int = 300, warmup: int = 50
) -> dict[str, Any]:
    """Return median microseconds per update for each part the trainer runs.

    ``dynamic_us`` is everything before the train step: decode, validate,
    label conversion, the dynamic part (entropy, monitor, smoothing, alpha)
    and hard labels. ``share`` is its fraction of the whole update.
    ``smoothing_alpha_us`` is the dynamic part alone, ``engine_share`` its
    fraction of the whole update, and ``code`` names whether the compiled
    loops or numpy ran it.
    """
    result = measure_dynamic_share(
        bundle_path, batch_size=batch_size, updates=updates, warmup=warmup
    )
    before_train = result.decode_us + result.prepare_us
    return {
        "decode_validate_us": result.decode_us,
        "prepare_us": result.prepare_us,
        "smoothing_alpha_us": result.dynamic_us,
        "engine_share": result.share,
        "update_us": result.update_us,
        "code": result.code,
        "dynamic_us": round(before_train, 1),
        "train_us": result.train_us,
        "share": round(before_train / (before_train + result.train_us), 4),
        "updates": result.updates,
        "numpy_floor_us": measure_numpy_floor(batch_size, updates=updates),
    }


def update_as_json(update: SoftLabelUpdate) -> bytes:
    """Return the update's fields as JSON, arrays written as lists."""
    fields: dict[str, Any] = {
        "message_id": update.message_id_hex,
        "teacher_version": update.teacher_version,
        "teacher_round": update.teacher_round,
        "timestamp": update.timestamp,
        "sample_ids": update.sample_ids,
        "inputs": update.inputs.tolist(),
        "labels": update.labels.tolist(),
        "label_kind": update.label_kind,
    }
    return json.dumps(fields).encode()


def measure_wire_bytes(batch_size: int = 32) -> dict[str, Any]:
    """Return bytes per sample of one digits update in four encodings.

    The sizes are exact, not timed: binary format version 1, binary format
    version 2 with float16 inputs, version 2 with float16 inputs and the
    ``TOP_K`` largest probabilities, and JSON.
    """
    inputs, source = digits_inputs()
    update = make_update(inputs, 0, batch_size)
    binary = len(encode_update(update))
    as_json = len(update_as_json(update))
    update.input_dtype = "float16"
    float16 = len(encode_update(update))
    update.top_k = TOP_K
    top_k = len(encode_update(update))
    return {
        "binary_bytes_per_sample": round(binary / batch_size, 1),
        "float16_bytes_per_sample": round(float16 / batch_size, 1),
        "top_k_bytes_per_sample": round(top_k / batch_size, 1),
        "json_bytes_per_sample": round(as_json / batch_size, 1),
        "top_k": TOP_K,
        "batch_size": batch_size,
        "inputs": source,
    }


def measure_checkpoint(
    bundle_path: Path, folder: Path, repeats: int = 20
) -> dict[str, float]:
    """Return median milliseconds to build and to write a trainer checkpoint.

    The smoothing store and teacher monitor are first filled to the default
    capacity with distinct sample ids, which is their size on a device that
    has run for a while. ``content_ms`` builds the tensors and state from
    the trainer, and ``write_ms`` is ``save_checkpoint`` into ``folder``:
    checksum, serialisation, write, fsync, rename and pruning. The daemon
    also saves its applied message ids, which this leaves out.
    """
    from dslo_edge.checkpoint import save_checkpoint
    from dslo_edge.config import TrainingSettings
    from dslo_edge.trainer import Trainer

    bundle = load_bundle(bundle_path)
    settings = TrainingSettings()
    trainer = Trainer(StudentModel(bundle), settings)
    classes = bundle.model_spec().class_count
    capacity = settings.smoothing_capacity
    labels = teacher_probabilities(capacity, classes, seed=1)
    for first in range(0, capacity, 32):
        rows = slice(first, min(first + 32, capacity))
        sample_ids = [f"sample-{i}" for i in range(rows.start, rows.stop)]
        trainer.engine.prepare(sample_ids, labels[rows], 1)
        trainer.engine.finish_update()
    content_ms, write_ms = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        tensors, state = trainer.checkpoint_content()
        built = time.perf_counter()
        save_checkpoint(folder, tensors, state)
        content_ms.append((built - started) * 1000)
        write_ms.append((time.perf_counter() - built) * 1000)
    size = sum(value.nbytes for value in tensors.values())
    return {
        "stored_ids": len(trainer.engine.store),
        "tensor_bytes": size,
        "content_ms": round(statistics.median(content_ms), 3),
        "write_ms": round(statistics.median(write_ms), 3),
        "repeats": repeats,
    }
