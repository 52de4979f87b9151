"""The hub's labels for a student with several heads: one label set per head.

A teacher for such a student has one output per head. ``convert_bundle`` and
``convert_teacher`` export its ``infer`` signature with an ``output_<head>``
tensor for each head, and the bundle manifest lists each head's output kind
under ``teacher.output_kinds``. ``build_multi_head_updates`` cuts the labelled
samples into format version 3 updates for ``dslo-edge push``, and the hub
service's scheduled pushes make each batch's update with ``multi_head_update``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.errors import ConfigError
from dslo_edge.hub import (
    SampleSet,
    describe_non_finite_labels,
    hard_labels_to_send,
    label_probabilities_of,
    non_finite_batch_error,
)
from dslo_edge.models import read_teacher
from dslo_edge.multihead_protocol import HeadLabels, MultiHeadUpdate
from dslo_edge.protocol import new_message_id
from dslo_edge.runtime import as_float32, load_interpreter


class MultiHeadTeacherModel:
    """A teacher ``.tflite`` whose ``infer`` returns ``output_<head>`` per head."""

    def __init__(
        self,
        path: str | Path,
        output_kinds: Mapping[str, str],
        runtime: str = "auto",
        *,
        content: bytes | None = None,
    ):
        """Load the teacher from ``content``, or else from the file at ``path``.

        Raises:
            BundleError: the file cannot be read or is not a LiteRT model.
            ConfigError: the teacher file lacks the output of a head.
        """
        self.output_kinds = dict(output_kinds)
        self.interpreter = load_interpreter(
            model_content=read_teacher(path) if content is None else content,
            preference=runtime,
        )
        self._infer = self.interpreter.get_signature_runner("infer")
        outputs = set(self.interpreter.get_signature_list()["infer"]["outputs"])
        missing = [name for name in output_kinds if f"output_{name}" not in outputs]
        if missing:
            raise ConfigError(
                f"teacher {path} has the outputs {sorted(outputs)}, but the "
                f"student's heads need output_{missing[0]}; convert the teacher "
                "with one output per head, named like the student's output layers"
            )
        details = self._infer.get_input_details()["x"]["shape"][1:]
        self.input_shape = tuple(int(d) for d in details)
        output_details = self._infer.get_output_details()
        self.class_counts = {
            name: int(output_details[f"output_{name}"]["shape"][-1])
            for name in self.output_kinds
        }

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Return each head's teacher output (probabilities or logits)."""
        outputs = self._infer(x=as_float32(x))
        return {name: np.array(outputs[f"output_{name}"]) for name in self.output_kinds}


def build_multi_head_updates(
    teacher: MultiHeadTeacherModel,
    samples: SampleSet,
    *,
    teacher_version: str,
    teacher_round: int,
    batch_size: int = 32,
    top_k: int | None = None,
) -> Iterator[MultiHeadUpdate]:
    """Label samples with the teacher and cut them into multi-head updates.

    Args:
        top_k: send only the k largest probabilities of each row, for every
            head with more than k classes. Logits of such a head are sent as
            softmax(logits) at T = 1. Heads with k classes or fewer get full
            labels.

    Each head's hard labels from ``samples.head_y`` go with its labels,
    and none are sent without them. A head whose labels in a batch are all
    -1 (no hard label) gets no hard label array in that update.

    Raises:
        ConfigError: the teacher gave NaN or infinite labels for a batch; the
            updates of earlier batches were already yielded.
    """
    for start in range(0, len(samples.x), batch_size):
        x = samples.x[start : start + batch_size]
        ids = samples.ids[start : start + batch_size]
        outputs = teacher.predict(x)
        problem = describe_non_finite_heads(outputs, x, ids)
        if problem is not None:
            raise non_finite_batch_error(problem)
        hard = None
        if samples.head_y is not None:
            hard = {
                head: labels[start : start + batch_size]
                for head, labels in samples.head_y.items()
            }
        yield multi_head_update(
            outputs,
            teacher.output_kinds,
            x,
            ids,
            teacher_version=teacher_version,
            teacher_round=teacher_round,
            top_k=top_k,
            hard_labels=hard,
        )


def multi_head_update(
    outputs: Mapping[str, np.ndarray],
    output_kinds: Mapping[str, str],
    x: np.ndarray,
    sample_ids: list[str],
    *,
    teacher_version: str,
    teacher_round: int,
    top_k: int | None = None,
    hard_labels: Mapping[str, np.ndarray] | None = None,
) -> MultiHeadUpdate:
    """Return the update of one batch from each head's teacher output.

    Args:
        outputs: each head's teacher output for the inputs ``x``.
        output_kinds: each head's output kind, "probabilities" or "logits".
        top_k: as for ``build_multi_head_updates``.
        hard_labels: each head's class indices for the batch, -1 where a
            sample has none, or None. A head whose labels are all -1 gets no
            hard label array.
    """
    hard = hard_labels or {}
    heads = {
        name: _head_labels(outputs[name], output_kinds[name], top_k, hard.get(name))
        for name in output_kinds
    }
    return MultiHeadUpdate(
        message_id=new_message_id(),
        teacher_version=teacher_version,
        teacher_round=teacher_round,
        timestamp=time.time(),
        sample_ids=list(sample_ids),
        inputs=x,
        heads=heads,
    )


def describe_non_finite_heads(
    outputs: Mapping[str, np.ndarray], x: np.ndarray, ids: list[str]
) -> str | None:
    """Describe the first head whose labels are NaN or infinite, or return None."""
    for name, labels in outputs.items():
        problem = describe_non_finite_labels(labels, x, ids)
        if problem is not None:
            return f"head {name}: {problem}"
    return None


def describe_non_finite_outputs(
    outputs: np.ndarray | Mapping[str, np.ndarray], x: np.ndarray, ids: list[str]
) -> str | None:
    """Describe the first NaN or infinite label of a teacher's output, or return None.

    Args:
        outputs: a single-head teacher's labels, or each head's labels.
    """
    if isinstance(outputs, Mapping):
        return describe_non_finite_heads(outputs, x, ids)
    return describe_non_finite_labels(outputs, x, ids)


def _head_labels(
    output: np.ndarray, kind: str, top_k: int | None, hard: np.ndarray | None
) -> HeadLabels:
    head_top_k = top_k if top_k is not None and top_k < output.shape[1] else None
    hard = hard_labels_to_send(hard)
    if hard is not None:
        hard = np.ascontiguousarray(hard, dtype=np.int32)
    if head_top_k is not None and kind == "logits":
        return HeadLabels(
            label_probabilities_of(output), hard_labels=hard, top_k=head_top_k
        )
    return HeadLabels(output.astype(np.float32), kind, hard, top_k=head_top_k)


def head_output_kinds(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Return each head's teacher output kind from a multi-head bundle manifest."""
    return {
        str(head["name"]): str(head["teacher_output_kind"])
        for head in manifest["heads"]
    }
