"""Measure the dynamic part's share of the device's update time.

The dynamic part is what DSL-O adds to plain distillation on every update:
entropy, teacher monitor, drift boost, smoothing and alpha. This module
times it against the whole update as the daemon's trainer thread runs it:
decode and validate the payload, convert labels, the dynamic part, hard
labels, then one step of the student's ``train`` signature.

Run ``python -m dslo_edge.bench_dynamic [--bundle DIR]``. Without a bundle it
converts an untrained digits-shaped student (64-32-10 MLP, as in the demo),
which needs the ``convert`` extra. The timing does not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dslo_edge.bundle import load_bundle
from dslo_edge.config import TrainingSettings
from dslo_edge.dynamic_kernel import kernel_name
from dslo_edge.errors import BundleError
from dslo_edge.models import StudentModel
from dslo_edge.protocol import SoftLabelUpdate, encode_update, new_message_id
from dslo_edge.trainer import Trainer

# The demo streams 360 samples to the device, twice per round, for 5 rounds.
DISTINCT_SAMPLES = 360
UPDATES_PER_ROUND = 23
# The exit status of the dslo-edge commands for an input that is not what
# they expect, here a --bundle that is not a bundle.
EXIT_CONFIG = 78


@dataclass(frozen=True)
class DynamicShare:
    """Median times per update in microseconds, and the dynamic share.

    Attributes:
        batch_size: samples per update.
        updates: updates timed (after the warm-up).
        code: ``compiled`` or ``numpy``, the code that ran the dynamic part.
        decode_us: decoding and validating the payload.
        prepare_us: label conversion, dynamic part and hard labels.
        dynamic_us: the dynamic part alone.
        train_us: the ``train`` signature call.
        update_us: median of decode + prepare + train per update.
        share: ``dynamic_us / update_us``.
        share_of_train: ``dynamic_us / train_us``.
    """

    batch_size: int
    updates: int
    code: str
    decode_us: float
    prepare_us: float
    dynamic_us: float
    train_us: float
    update_us: float
    share: float
    share_of_train: float


def _payloads(
    spec_shape: tuple[int, ...], classes: int, batch_size: int, count: int, seed: int
) -> list[bytes]:
    """Encode ``count`` updates whose sample ids recur across teacher rounds."""
    rng = np.random.default_rng(seed)
    payloads = []
    for index in range(count):
        first = index * batch_size
        ids = [f"s{(first + j) % DISTINCT_SAMPLES}" for j in range(batch_size)]
        update = SoftLabelUpdate(
            message_id=new_message_id(),
            teacher_version="bench",
            teacher_round=1 + index // UPDATES_PER_ROUND,
            timestamp=time.time(),
            sample_ids=ids,
            inputs=rng.random((batch_size, *spec_shape), dtype=np.float32),
            labels=rng.dirichlet(np.full(classes, 0.3), batch_size).astype(np.float32),
            label_kind="probabilities",
        )
        payloads.append(encode_update(update))
    return payloads


def measure_dynamic_share(
    bundle_path: str | Path,
    *,
    batch_size: int = 32,
    updates: int = 300,
    warmup: int = 50,
    seed: int = 0,
    settings: TrainingSettings | None = None,
    compiled: bool = True,
) -> DynamicShare:
    """Time ``warmup + updates`` updates through a Trainer and return medians.

    The warm-up updates fill the smoothing store and the monitor, so the
    timed ones take the steady-state path where most ids are known.
    ``compiled=False`` runs the dynamic part in numpy even where the
    compiled loops are built.
    """
    bundle = load_bundle(bundle_path)
    trainer = Trainer(StudentModel(bundle), settings or TrainingSettings())
    trainer.engine.compiled = compiled
    spec = bundle.model_spec()
    payloads = _payloads(
        spec.input_shape, spec.class_count, batch_size, warmup + updates, seed
    )
    rows = []
    for index, payload in enumerate(payloads):
        started = time.perf_counter()
        update = trainer.decode(payload)
        decoded = time.perf_counter()
        result = trainer.apply(update)
        if index >= warmup:
            decode_ms = (decoded - started) * 1000
            rows.append(
                (decode_ms, result.prepare_ms, result.dynamic_ms, result.train_ms)
            )
    code = kernel_name() if compiled else "numpy"
    return _summary(batch_size, code, rows)


def _summary(
    batch_size: int, code: str, rows: list[tuple[float, float, float, float]]
) -> DynamicShare:
    def median_us(column: int) -> float:
        return statistics.median(row[column] for row in rows) * 1000

    update_us = statistics.median((row[0] + row[1] + row[3]) for row in rows) * 1000
    dynamic_us = median_us(2)
    train_us = median_us(3)
    return DynamicShare(
        batch_size=batch_size,
        updates=len(rows),
        code=code,
        decode_us=round(median_us(0), 1),
        prepare_us=round(median_us(1), 1),
        dynamic_us=round(dynamic_us, 1),
        train_us=round(train_us, 1),
        update_us=round(update_us, 1),
        share=round(dynamic_us / update_us, 4),
        share_of_train=round(dynamic_us / train_us, 4),
    )


def measure_numpy_floor(
    batch_size: int = 32,
    class_count: int = 10,
    updates: int = 300,
    warmup: int = 50,
    seed: int = 0,
) -> float:
    """Return the median microseconds of the least numpy work per update.

    This times the dynamic part's arithmetic alone, fused into the fewest
    numpy calls: one id lookup, entropy, drift, smoothing, alpha, and the
    writes of the smoothed and raw rows. It leaves out what the engine also
    does: validation, stale-round handling, eviction and hard labels. It
    estimates a lower bound for any numpy version of the dynamic part, and
    no runtime code path uses it.
    """
    rng = np.random.default_rng(seed)
    ids = [f"s{i}" for i in range(DISTINCT_SAMPLES)]
    row_of = {sample_id: row for row, sample_id in enumerate(ids)}
    smoothed = rng.dirichlet(np.ones(class_count), DISTINCT_SAMPLES)
    previous = rng.dirichlet(np.ones(class_count), DISTINCT_SAMPLES)
    stamps = np.zeros(DISTINCT_SAMPLES, dtype=np.int64)
    lam = 0.5
    scale = 1.0 / (1.0 + lam)
    to_entropy = -1.0 / np.log(class_count)
    # Default alpha settings at progress 0.5 reduce to alpha = offset - slope * h.
    offset, slope = 0.71, 0.42
    times = []
    for update in range(warmup + updates):
        first = (update * batch_size) % (DISTINCT_SAMPLES - batch_size)
        batch_ids = ids[first : first + batch_size]
        p = rng.dirichlet(np.full(class_count, 0.3), batch_size)
        started = time.perf_counter()
        rows = np.fromiter(map(row_of.get, batch_ids), np.int64, batch_size)
        sum_p_log_p = np.einsum("ij,ij->i", p, np.log(np.maximum(p, 1e-300)))
        entropy = sum_p_log_p * to_entropy
        cross = np.einsum("ij,ij->i", p, np.log(previous[rows] + 1e-12))
        drift = float((sum_p_log_p - cross).sum()) / batch_size
        target = (p + lam * smoothed[rows]) * scale
        smoothed[rows] = target
        previous[rows] = p
        stamps[rows] = np.arange(update * batch_size, (update + 1) * batch_size)
        alpha = (offset - slope * entropy).astype(np.float32)
        # The float32 targets and the monitor means, as the engine returns them.
        outputs = (
            target.astype(np.float32),
            alpha,
            drift,
            float(entropy.sum()),
            float(p.max(axis=1).sum()),
        )
        if update >= warmup:
            times.append(time.perf_counter() - started)
    assert outputs[0].shape == (batch_size, class_count)
    return round(statistics.median(times) * 1e6, 1)


def convert_digits_student(out: Path) -> Path:
    """Convert an untrained 64-32-10 student and teacher into ``out/bundle``."""
    from converters.bundle import convert_bundle
    from converters.demo_models import build_student, build_teacher

    bundle = out / "bundle"
    convert_bundle(build_teacher(64, 10), build_student(64, 10), bundle)
    return bundle


def format_share(result: DynamicShare) -> str:
    """Return the figures as a few lines of text."""
    return (
        f"batch {result.batch_size}, {result.updates} updates, medians in us: "
        f"decode+validate {result.decode_us}, prepare {result.prepare_us} "
        f"(dynamic part {result.dynamic_us}), train step {result.train_us}, "
        f"whole update {result.update_us}\n"
        f"dynamic part ({result.code} code): {result.share:.1%} of the update "
        f"time, {result.share_of_train:.0%} of the train step"
    )


def _int_range(low: int, high: int) -> Callable[[str], int]:
    """Return an argparse type that accepts an integer from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid integer {text!r}; expected {low} to {high}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{value} is out of range; expected {low} to {high}"
            )
        return value

    return parse


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m dslo_edge.bench_dynamic``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="converted bundle directory")
    # Each update takes batch-size consecutive ids of DISTINCT_SAMPLES, which
    # must be unique within the update, and the numpy floor needs one id spare.
    parser.add_argument(
        "--batch-size",
        type=_int_range(1, DISTINCT_SAMPLES - 1),
        default=32,
        help="samples per update (default 32)",
    )
    # The payloads are encoded before the timing, about 10 KB each for the
    # digits student at batch 32, so the maximum keeps them to about 1 GB.
    parser.add_argument(
        "--updates",
        type=_int_range(1, 100_000),
        default=300,
        help="timed updates per code, after 50 warm-up updates (default 300)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead")
    args = parser.parse_args(argv)
    if args.bundle is not None:
        try:
            load_bundle(args.bundle)
        except BundleError as error:
            parser.exit(EXIT_CONFIG, f"error: --bundle: {error}\n")
    with tempfile.TemporaryDirectory(prefix="dslo-bench-") as tmp:
        bundle = args.bundle or convert_digits_student(Path(tmp))
        results = [
            measure_dynamic_share(
                bundle,
                batch_size=args.batch_size,
                updates=args.updates,
                compiled=compiled,
            )
            for compiled in (True, False)
        ]
    floor_us = measure_numpy_floor(batch_size=args.batch_size)
    result = results[0]
    if args.json:
        import json

        rows = [asdict(result) for result in results]
        print(json.dumps({"runs": rows, "numpy_floor_us": floor_us}))
    else:
        print("\n".join(format_share(result) for result in results))
        print(
            f"least numpy work for the same arithmetic: {floor_us} us, "
            f"{floor_us / result.train_us:.0%} of the train step"
        )


if __name__ == "__main__":
    main()
