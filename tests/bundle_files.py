"""Write bundle directories with a real manifest and placeholder model files.

The model files hold random bytes, so these bundles pass ``load_bundle``
(manifest, signatures, checksums) but cannot be run by an interpreter. Tests
that need a runnable student convert real Keras models instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np


def _tensor(shape: list[int], dtype: str = "float32") -> dict[str, Any]:
    return {"shape": shape, "dtype": dtype}


def _weights(inputs: int, hidden: int, classes: int) -> dict[str, list[int]]:
    return {
        "dense_kernel": [inputs, hidden],
        "dense_bias": [hidden],
        "dense_1_kernel": [hidden, classes],
        "dense_1_bias": [classes],
    }


def _signatures(inputs: int, classes: int, weights: dict[str, list[int]]):
    weight_specs = {name: _tensor(shape) for name, shape in weights.items()}
    return {
        "infer": {
            "inputs": {"x": _tensor([-1, inputs])},
            "outputs": {
                "logits": _tensor([-1, classes]),
                "probabilities": _tensor([-1, classes]),
            },
        },
        "train": {
            "inputs": {
                "x": _tensor([-1, inputs]),
                "soft": _tensor([-1, classes]),
                "hard": _tensor([-1], "int32"),
                "alpha": _tensor([-1]),
                "temperature": _tensor([]),
                "learning_rate": _tensor([]),
            },
            "outputs": {"loss": _tensor([])},
        },
        "get_weights": {"inputs": {}, "outputs": weight_specs},
        "set_weights": {
            "inputs": weight_specs,
            "outputs": {"assigned": _tensor([], "int32")},
        },
    }


def write_bundle(
    folder: Path,
    *,
    inputs: int = 64,
    hidden: int = 32,
    classes: int = 10,
    student_bytes: int = 27_296,
    teacher_bytes: int = 4_096,
    seed: int = 0,
    interpreters: list[str] | None = None,
) -> Path:
    """Write a bundle directory and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = {}
    for role, size in (("student", student_bytes), ("teacher", teacher_bytes)):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        (folder / f"{role}.tflite").write_bytes(data)
        entries[role] = {
            "file": f"{role}.tflite",
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": size,
            "precision": "float32",
        }

    weights = _weights(inputs, hidden, classes)
    entries["student"]["signatures"] = _signatures(inputs, classes, weights)
    entries["student"]["weights"] = weights
    entries["teacher"]["signatures"] = {
        "infer": {
            "inputs": {"x": _tensor([-1, inputs])},
            "outputs": {"output": _tensor([-1, classes])},
        }
    }
    entries["teacher"]["output_kind"] = "probabilities"

    manifest = {
        "format_version": 1,
        "created_by": "tests",
        "runtime": {
            "interpreters": interpreters
            or ["ai-edge-litert>=2.0", "tflite-runtime>=2.14"],
            "flex": False,
        },
        "input": {"shape": [None, inputs], "dtype": "float32"},
        "class_count": classes,
        "student": entries["student"],
        "teacher": entries["teacher"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder
