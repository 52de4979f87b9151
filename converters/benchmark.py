"""Compare one train step in a LiteRT interpreter with the same step in TensorFlow.

For each student (the 64-32-10 MLP and the MobileNetV2-style CNN) the parent
process converts a bundle, then starts two child processes so that each peak
RSS belongs to one engine only:

- interpreter: loads the bundle with ai-edge-litert or tflite-runtime (no
  TensorFlow import) and times the ``train`` signature;
- tensorflow: builds the same Keras model with the same seed and times
  autodiff plus the same Keras optimizer inside one ``tf.function``.

Both run the same distillation loss on the same random batch.

Usage: python -m converters.benchmark [--steps N] [--batch-size B] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

STUDENTS = ("mlp", "mobilenet")
TEMPERATURE = 2.0
LEARNING_RATE = 1e-3


def _shape(student: str) -> tuple[int, ...]:
    return (64,) if student == "mlp" else (32, 32, 3)


def _batch(student: str, size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(size, 10))
    soft = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return {
        "x": rng.random((size, *_shape(student)), dtype=np.float32),
        "soft": soft.astype(np.float32),
        "hard": rng.integers(0, 10, size).astype(np.int32),
        "alpha": np.full(size, 0.5, np.float32),
    }


def _build_keras(student: str) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    if student == "mlp":
        from converters.demo_models import build_student

        return build_student(64, 10)
    from converters.mobilenet import build_mobilenet_student

    return build_mobilenet_student()


def _optimizer_name(student: str) -> str:
    return "sgd" if student == "mlp" else "adam"


def _peak_rss_mib() -> float:
    # VmHWM is the peak RSS of this address space. getrusage's ru_maxrss is
    # not usable here: Linux carries it over from the forking parent, which
    # has TensorFlow loaded.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM line in /proc/self/status; peak RSS needs Linux")


def _time_steps(step: Any, steps: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {
        "median_ms": float(np.median(times) * 1000),
        "p90_ms": float(np.percentile(times, 90) * 1000),
    }


def run_interpreter(
    student: str, bundle: str, steps: int, batch: int, runtime: str
) -> dict[str, Any]:
    """Time the bundle's train signature (child process, no TensorFlow)."""
    from dslo_edge.bundle import load_bundle
    from dslo_edge.models import StudentModel

    model = StudentModel(load_bundle(bundle), runtime=runtime)
    data = _batch(student, batch)

    def step() -> None:
        model.train_step(
            data["x"],
            data["soft"],
            data["hard"],
            data["alpha"],
            TEMPERATURE,
            LEARNING_RATE,
        )

    result = _time_steps(step, steps, warmup=5)
    result["engine"] = model.runtime_name
    result["tensorflow_imported"] = "tensorflow" in sys.modules
    return result


def run_tensorflow(student: str, steps: int, batch: int) -> dict[str, Any]:
    """Time autodiff and a Keras optimizer in one tf.function (child process)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    model = _build_keras(student)
    if _optimizer_name(student) == "sgd":
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
    else:
        optimizer = keras.optimizers.Adam(LEARNING_RATE)
    data = {key: tf.constant(value) for key, value in _batch(student, batch).items()}
    final_softmax = student == "mlp"

    @tf.function
    def train_step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            out = model(data["x"], training=True)
            logits = tf.math.log(out) if final_softmax else out
            loss = _tf_loss(tf, logits, data)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    result = _time_steps(lambda: train_step().numpy(), steps, warmup=5)
    result["engine"] = f"tensorflow {tf.__version__}"
    return result


def _tf_loss(tf: Any, logits: Any, data: dict[str, Any]) -> Any:
    t = TEMPERATURE
    soft = data["soft"]
    kl = tf.reduce_sum(
        soft * tf.math.log(tf.maximum(soft, 1e-30))
        - soft * tf.nn.log_softmax(logits / t),
        axis=-1,
    )
    ce = -tf.reduce_sum(
        tf.one_hot(data["hard"], 10) * tf.nn.log_softmax(logits), axis=-1
    )
    alpha = data["alpha"]
    return tf.reduce_mean(alpha * t * t * kl + (1.0 - alpha) * ce)


def convert(student: str, folder: Path) -> Path:
    """Write a bundle for one benchmark student."""
    import keras

    from converters.bundle import convert_bundle
    from converters.optimizers import OptimizerConfig

    model = _build_keras(student)
    teacher = keras.Sequential(
        [keras.Input(_shape(student)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    path = folder / student
    convert_bundle(
        teacher, model, path, optimizer=OptimizerConfig(_optimizer_name(student))
    )
    return path


def _child(arguments: list[str], python: str = sys.executable) -> dict[str, Any]:
    command = [python, "-m", "converters.benchmark", "--child", *arguments]
    # The project root on the path lets a venv without dslo-edge installed
    # (for example one with tflite-runtime only) run the interpreter child.
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path)
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, env=environment
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def benchmark(
    steps: int, batch: int, runtime: str, interpreter_python: str = sys.executable
) -> list[dict[str, Any]]:
    """Convert each student and measure both engines in separate processes."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="dslo-benchmark-") as tmp:
        for student in STUDENTS:
            bundle = convert(student, Path(tmp))
            common = [
                "--student",
                student,
                "--steps",
                str(steps),
                "--batch-size",
                str(batch),
            ]
            interpreter = _child(
                ["interpreter", *common, "--bundle", str(bundle), "--runtime", runtime],
                interpreter_python,
            )
            tensorflow = _child(["tensorflow", *common])
            rows.append(
                {
                    "student": student,
                    "batch_size": batch,
                    "interpreter": interpreter,
                    "tensorflow": tensorflow,
                }
            )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Render benchmark rows as a table."""
    header = f"{'student':<10} {'engine':<28} {'step median':>12} {'p90':>9}"
    lines = [f"{header} {'peak RSS':>10}"]
    for row in rows:
        for key in ("interpreter", "tensorflow"):
            result = row[key]
            lines.append(
                f"{row['student']:<10} {result['engine']:<28} "
                f"{result['median_ms']:>9.3f} ms {result['p90_ms']:>6.3f} ms "
                f"{result['peak_rss_mib']:>6.0f} MiB"
            )
        speedup = row["tensorflow"]["median_ms"] / row["interpreter"]["median_ms"]
        memory = row["tensorflow"]["peak_rss_mib"] / row["interpreter"]["peak_rss_mib"]
        pace = (
            f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"
        )
        lines.append(
            f"{row['student']:<10} interpreter step is {pace} than TensorFlow, "
            f"peak RSS {memory:.1f}x lower (batch {row['batch_size']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the benchmark or one child measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per engine")
    parser.add_argument("--batch-size", type=int, default=16, help="samples per step")
    parser.add_argument(
        "--runtime", default="auto", help="auto, ai-edge-litert or tflite-runtime"
    )
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    parser.add_argument(
        "--interpreter-python",
        default=sys.executable,
        help="Python that runs the interpreter child, e.g. a tflite-runtime venv",
    )
    parser.add_argument(
        "--child", choices=["interpreter", "tensorflow"], help=argparse.SUPPRESS
    )
    parser.add_argument("--student", choices=STUDENTS, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "interpreter":
        result = run_interpreter(
            args.student, args.bundle, args.steps, args.batch_size, args.runtime
        )
    elif args.child == "tensorflow":
        result = run_tensorflow(args.student, args.steps, args.batch_size)
    else:
        rows = benchmark(
            args.steps, args.batch_size, args.runtime, args.interpreter_python
        )
        print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
        return
    result["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
