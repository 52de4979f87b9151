"""Runtime memory and storage estimates for running a bundle on a device.

The figures are estimates built from the bundle manifest, not measurements
on the target board. Each part is listed separately so a user can see which
one dominates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dslo_edge.bundle import Bundle
from dslo_edge.config import (
    DEFAULT_APPLIED_ID_CAPACITY,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_QUEUE_SIZE,
)
from dslo_edge.errors import BundleError
from dslo_edge.modelfile import summarize_model

MIB = 1024 * 1024
FLOAT_BYTES = 4
DTYPE_BYTES = {"float32": 4, "int32": 4, "int64": 8, "float16": 2, "int8": 1}

# Peak RSS of the daemon in `dslo-edge demo` (Python 3.11, numpy 2, paho-mqtt,
# ai-edge-litert 2.3.0, a 64-32-10 student) on x86_64 was 55 MiB. Other
# architectures and older numpy builds are assumed to be close to that.
BASELINE_RSS_BYTES = 55 * MIB
# Installed size of ai-edge-litert 2.3.0 (59 MiB) plus numpy 2 with its
# bundled libraries (73 MiB), paho-mqtt, click, safetensors and protobuf,
# rounded up, on x86_64. The interpreter of the OS is not counted.
SOFTWARE_BYTES = 150 * MIB
# Variable, gradient and the update's temporary for every weight.
WEIGHT_COPIES = 3
# Without the file's tensor list: forward activation, its gradient and one
# temporary per hidden unit.
ACTIVATION_COPIES = 3
CHECKPOINTS_KEPT = 2
UPDATE_HEADER_BYTES = 64
SAMPLE_ID_BYTES = 16
# Python objects that the smoothing store and the teacher monitor together
# keep per sample id and head, besides the float rows: dict entries, the id
# string and the use stamps. tracemalloc measured 237 to 276 bytes (Python
# 3.11, numpy 2, ids of 8 to 40 characters, 3 to 100 classes).
STORE_ID_OBJECT_BYTES = 280
# Memory per applied message id: an OrderedDict entry, a 16-byte bytes
# object and its copy in the joined buffer. tracemalloc measured 171 bytes
# (Python 3.11).
APPLIED_ID_OBJECT_BYTES = 176
# A checkpoint stores each id of the smoothing store and of the teacher monitor
# with an int64 use stamp, and each applied message id as 16 bytes.
STAMP_BYTES = 8
MESSAGE_ID_BYTES = 16


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated resident memory of the daemon, in bytes, by part."""

    baseline: int
    model_file: int
    weights: int
    signature_tensors: int
    activations: int
    update_queue: int
    smoothing_store: int
    applied_ids: int
    # The daemon's bounds on waiting inference payloads and model update chunks.
    other_queues: int

    @property
    def total(self) -> int:
        return (
            self.baseline
            + self.model_file
            + self.weights
            + self.signature_tensors
            + self.activations
            + self.update_queue
            + self.smoothing_store
            + self.applied_ids
            + self.other_queues
        )

    def as_dict(self) -> dict[str, int]:
        """Return every part and the total, in bytes."""
        parts = dict(vars(self))
        parts["total"] = self.total
        return parts


@dataclass(frozen=True)
class StorageEstimate:
    """Estimated disk use on the device, in bytes, by part."""

    bundle: int
    software: int
    checkpoints: int
    model_update: int

    @property
    def total(self) -> int:
        return self.bundle + self.software + self.checkpoints + self.model_update

    def as_dict(self) -> dict[str, int]:
        """Return every part and the total, in bytes."""
        parts = dict(vars(self))
        parts["total"] = self.total
        return parts


def estimate_memory(
    bundle: Bundle,
    *,
    batch_size: int = 32,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    smoothing_capacity: int = 10000,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    applied_id_capacity: int = DEFAULT_APPLIED_ID_CAPACITY,
) -> MemoryEstimate:
    """Estimate the daemon's resident memory for a bundle.

    Args:
        bundle: the loaded bundle; its manifest gives shapes and file sizes.
        batch_size: samples per update the hub sends.
        queue_size: ``training.queue_size``; the daemon holds up to twice as
            many updates waiting.
        smoothing_capacity: sample ids in the smoothing store, which the
            teacher monitor keeps as many of.
        max_queued_bytes: payload bytes the update queue may hold
            (``training.max_queued_bytes``).
        applied_id_capacity: message ids kept against replays
            (``training.applied_id_capacity``).
    """
    # Imported here: the daemon module loads the MQTT client and more.
    from dslo_edge.daemon import INFER_QUEUE_BYTES, OTA_QUEUE_BYTES

    weight_count = sum(math.prod(shape) for shape in bundle.weight_shapes.values())
    update_bytes = estimate_update_bytes(bundle, batch_size)
    # Each head keeps a smoothing row of K floats and a monitor row of K floats
    # plus the teacher round per sample id.
    heads = _head_count(bundle)
    smoothing_row_bytes = (2 * _label_values(bundle) + heads) * FLOAT_BYTES
    smoothing_row_bytes += heads * STORE_ID_OBJECT_BYTES
    return MemoryEstimate(
        baseline=BASELINE_RSS_BYTES,
        model_file=_file_size(bundle.student_path),
        weights=weight_count * FLOAT_BYTES * WEIGHT_COPIES,
        signature_tensors=_signature_tensor_bytes(bundle, batch_size),
        activations=_activation_bytes(bundle, batch_size),
        # The queue has room for twice queue_size updates, for redeliveries,
        # and takes one update larger than max_queued_bytes when it is empty.
        update_queue=max(
            min(2 * queue_size * update_bytes, max_queued_bytes), update_bytes
        ),
        smoothing_store=smoothing_capacity * smoothing_row_bytes,
        applied_ids=applied_id_capacity * APPLIED_ID_OBJECT_BYTES,
        other_queues=INFER_QUEUE_BYTES + OTA_QUEUE_BYTES,
    )


def estimate_storage(
    bundle: Bundle,
    *,
    smoothing_capacity: int = 10000,
    applied_id_capacity: int = DEFAULT_APPLIED_ID_CAPACITY,
) -> StorageEstimate:
    """Estimate the disk space a device needs for a bundle and its state.

    Args:
        bundle: the loaded bundle.
        smoothing_capacity: sample ids in the smoothing store, which the
            teacher monitor keeps as many of.
        applied_id_capacity: message ids kept against replays
            (``training.applied_id_capacity``).
    """
    bundle_bytes = directory_size(bundle.path)
    weight_count = sum(math.prod(shape) for shape in bundle.weight_shapes.values())
    checkpoint = (
        weight_count * FLOAT_BYTES
        + smoothing_capacity * _checkpoint_bytes_per_sample(bundle)
        + applied_id_capacity * MESSAGE_ID_BYTES
    )
    return StorageEstimate(
        bundle=bundle_bytes,
        software=SOFTWARE_BYTES,
        checkpoints=CHECKPOINTS_KEPT * checkpoint,
        # A model update keeps the old bundle, the new one and its archive.
        model_update=2 * bundle_bytes,
    )


def _checkpoint_bytes_per_sample(bundle: Bundle) -> int:
    """Return the checkpoint bytes of one sample id, over every head.

    Each head saves a smoothing row of K floats and a monitor row of K floats
    plus the sample's teacher round, each with the id and a use stamp.
    """
    heads = _head_count(bundle)
    floats = 2 * _label_values(bundle) + heads
    return floats * FLOAT_BYTES + 2 * heads * (SAMPLE_ID_BYTES + STAMP_BYTES)


def estimate_update_bytes(bundle: Bundle, batch_size: int) -> int:
    """Return the size of one soft-label update of ``batch_size`` samples."""
    per_sample = (
        math.prod(bundle.input_shape) * FLOAT_BYTES
        + _label_values(bundle) * FLOAT_BYTES
        + _head_count(bundle) * FLOAT_BYTES  # a hard label per head
        + SAMPLE_ID_BYTES
    )
    return UPDATE_HEADER_BYTES + batch_size * per_sample


def directory_size(folder: Path) -> int:
    """Return the total size of the regular files under a directory."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _label_values(bundle: Bundle) -> int:
    """Return the soft-label values per sample: the class counts of all heads."""
    if bundle.is_multi_head:
        return sum(bundle.heads.values())
    return bundle.class_count


def _head_count(bundle: Bundle) -> int:
    return len(bundle.heads) if bundle.is_multi_head else 1


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _signature_tensor_bytes(bundle: Bundle, batch_size: int) -> int:
    """Return the input and output bytes of every student signature at a batch.

    The daemon creates a runner per signature, so all of them are allocated.
    """
    signatures = bundle.manifest["student"].get("signatures", {})
    total = 0
    for signature in signatures.values():
        for group in ("inputs", "outputs"):
            for spec in signature.get(group, {}).values():
                total += _tensor_bytes(spec, batch_size)
    return total


def _tensor_bytes(spec: dict[str, Any], batch_size: int) -> int:
    dims = [batch_size if int(d) < 0 else int(d) for d in spec.get("shape", [])]
    return math.prod(dims) * DTYPE_BYTES.get(str(spec.get("dtype")), FLOAT_BYTES)


def _activation_bytes(bundle: Bundle, batch_size: int) -> int:
    """Estimate the tensors that the ``train`` signature allocates at a batch.

    This is the summed size of the signature's non-constant tensors in the
    student file, and it counts convolution outputs too. It is an upper
    bound: LiteRT reuses memory between tensors, and the sum includes the
    train inputs and outputs that ``signature_tensors`` counts as well.
    Without ai-edge-litert's schema module to read the file, each rank-2
    weight is read as a dense kernel whose second dimension is a layer
    width, which misses convolution activations.
    """
    try:
        summary = summarize_model(bundle.student_path.read_bytes(), batch_size)
        return summary.activation_bytes["train"]
    except (BundleError, OSError, KeyError):
        pass
    widths = [shape[-1] for shape in bundle.weight_shapes.values() if len(shape) == 2]
    return batch_size * sum(widths) * FLOAT_BYTES * ACTIVATION_COPIES
