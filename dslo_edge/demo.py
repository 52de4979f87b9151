"""The main job on real data: adapt a digits student to a shifted device.

The demo splits scikit-learn's digits and shifts the device's share. It
trains a teacher (one snapshot per round) and a student, and converts them.
It then starts a broker on loopback and the edge daemon as its own process,
and pushes the rounds. Finally it stops the daemon and compares the adapted
student with the factory student and with static distillation on the same
updates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np

from dslo_edge.broker import Broker
from dslo_edge.bundle import load_bundle
from dslo_edge.checkpoint import load_latest_checkpoint, write_durably
from dslo_edge.config import TrainingSettings, load_config, render_config
from dslo_edge.digits import SHIFT_DESCRIPTION, load_splits, teacher_training_set
from dslo_edge.errors import ConfigError, DsloError, OutputPathError, StateDirInUse
from dslo_edge.hub import SampleSet, build_updates, push
from dslo_edge.models import StudentModel, TeacherModel
from dslo_edge.power import describe_energy
from dslo_edge.protocol import encode_update
from dslo_edge.softlabels import AlphaPolicy, Schedule
from dslo_edge.state_lock import DEMO_HOLDER, StateLock
from dslo_edge.trainer import Trainer

DEVICE_ID = "demo-device"
ROUND_EPOCHS = [2, 5, 10, 20, 40]
PASSES_PER_ROUND = 2
BATCH_SIZE = 32
STATIC_ALPHA = 0.5
# This machine's own board profile: its power model gives the energy figures
# when no battery, power monitor or RAPL counter is readable.
DEMO_PROFILE = "generic-x86_64"
# The demo device runs from a 20 Wh power bank, so the report can show the
# battery impact; the machine itself reports no battery.
DEMO_BATTERY_WH = 20.0


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return round(float(np.mean(np.argmax(probabilities, axis=1) == labels)), 4)


def _train_models(out: Path, seed: int) -> tuple[Any, Path, list[Path]]:
    from converters.demo_models import train_student, train_teacher_rounds

    splits = load_splits(seed)
    teacher_x, teacher_y = teacher_training_set(splits, seed)
    student = train_student(splits.base_x, splits.base_y, seed, out / "student.keras")
    rounds = train_teacher_rounds(teacher_x, teacher_y, seed, out, ROUND_EPOCHS)
    return splits, student, rounds


def _convert(out: Path, student: Path, rounds: list[Path]) -> tuple[Path, list[Path]]:
    from converters.bundle import convert_bundle, convert_teacher

    bundle = out / "bundle"
    convert_bundle(rounds[-1], student, bundle, overwrite=True)
    hub_dir = out / "hub"
    hub_dir.mkdir(exist_ok=True)
    teachers = [
        convert_teacher(path, hub_dir / f"{path.stem}.tflite") for path in rounds
    ]
    return bundle, teachers


def _start_daemon(
    out: Path, bundle: Path, broker: Broker, planned: int, state_lock: StateLock
) -> tuple[subprocess.Popen[bytes], Path]:
    state = out / "state"
    if state.exists():
        for old in state.glob("checkpoints/*"):
            old.unlink()
    # The daemon takes the lock itself as it starts.
    state_lock.release()
    protocol = "5" if broker.kind == "mosquitto" else "3.1.1"
    config = out / "device.toml"
    config.write_text(
        render_config(
            DEVICE_ID,
            bundle.resolve(),
            state.resolve(),
            broker.port,
            planned_updates=planned,
            protocol=protocol,
            overrides={
                "device": {"profile": DEMO_PROFILE, "battery_wh": DEMO_BATTERY_WH}
            },
        )
    )
    log = open(out / "daemon.log", "wb")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen(
        [sys.executable, "-m", "dslo_edge.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, config


def _daemon_exit_error(process: subprocess.Popen[bytes], log: Path) -> DsloError | None:
    """Return an error naming the daemon's exit and last log line, if it exited.

    A push to a daemon that exited at start fails as if no daemon ran, so
    this names the actual cause, which only the daemon's log has.
    """
    status = process.poll()
    if status is None:
        return None
    try:
        lines = log.read_bytes().decode("utf-8", "replace").splitlines()
    except OSError:
        lines = []
    last = next((line for line in reversed(lines) if line.strip()), None)
    cause = f": {last.strip()}" if last else ""
    return DsloError(
        f"the demo's daemon exited with status {status} before the push "
        f"completed{cause} (from {log})"
    )


def _stop_daemon(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise DsloError(
            "the daemon did not stop within 60 s of SIGTERM; see daemon.log"
        ) from None


def _static_kd(
    bundle_path: Path,
    teacher_path: Path,
    output_kind: str,
    samples: SampleSet,
    updates: int,
    settings: TrainingSettings,
) -> StudentModel:
    """Train a fresh student with constant alpha on the final teacher only."""
    bundle = load_bundle(bundle_path)
    student = StudentModel(bundle)
    static = replace(
        settings,
        smoothing_lambda=0.0,
        alpha=AlphaPolicy(STATIC_ALPHA, STATIC_ALPHA, 0.0, 1.0, Schedule("constant")),
    )
    trainer = Trainer(student, static)
    teacher = TeacherModel(teacher_path, output_kind)
    applied = 0
    while applied < updates:
        for update in build_updates(
            teacher,
            samples,
            teacher_version="final",
            teacher_round=1,
            batch_size=BATCH_SIZE,
        ):
            trainer.apply(trainer.decode(encode_update(update)))
            applied += 1
            if applied == updates:
                break
    return student


DEMO_MARKER = ".dslo-demo"
# Folders and files that the demo writes inside --out, checked before training.
DEMO_FOLDERS = ("bundle", "hub", "broker", "state", "state/checkpoints")
DEMO_FILES = (
    "device.toml",
    "daemon.log",
    "report.json",
    "student.keras",
    *(f"teacher-round-{n}.keras" for n in range(1, len(ROUND_EPOCHS) + 1)),
    *(f"hub/teacher-round-{n}.tflite" for n in range(1, len(ROUND_EPOCHS) + 1)),
)


def _claim_folder(out: Path) -> None:
    """Use ``out`` only if it is new, empty, or an earlier demo's folder.

    The demo replaces its bundle, state and models, so a folder holding
    anything else is rejected rather than overwritten.
    """
    if out.exists() and not out.is_dir():
        raise OutputPathError(
            f"{out} is a file; choose a directory for --out", option="--out"
        )
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise ConfigError(
            f"{out} already contains files that are not from a dslo-edge demo; "
            "choose a new or empty directory for --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / DEMO_MARKER).write_text("Written by dslo-edge demo; safe to delete.\n")
    except OSError as error:
        raise OutputPathError(
            f"cannot create the demo directory {out}: {error.strerror or error}; "
            "choose a writable path for --out",
            option="--out",
        ) from error
    _check_demo_entries(out)


def _check_demo_entries(out: Path) -> None:
    """Reject a file where the demo writes a folder, or a folder for a file."""
    for name in DEMO_FOLDERS:
        path = out / name
        if path.exists() and not path.is_dir():
            raise OutputPathError(
                f"{path} is a file, but the demo writes a folder there; "
                "move the file away or choose another --out",
                option="--out",
            )
    for name in DEMO_FILES:
        path = out / name
        if path.is_dir():
            raise OutputPathError(
                f"{path} is a folder, but the demo writes a file there; "
                "move the folder away or choose another --out",
                option="--out",
            )


def _lock_state(out: Path) -> StateLock:
    """Lock the demo's state directory until the demo starts its own daemon.

    A daemon that a user started with the demo's device.toml, or another
    demo on the same folder, may hold this lock. The demo would otherwise
    replace the bundle and delete the checkpoints that the holder uses.
    """
    state = out / "state"
    try:
        return StateLock(state, DEVICE_ID, for_demo=True)
    except StateDirInUse as error:
        if error.owner.endswith(DEMO_HOLDER):
            raise ConfigError(
                f"{state} is in use by another dslo-edge demo ({error.owner}); "
                "wait until it ends, or choose another --out"
            ) from None
        raise ConfigError(
            f"{state} is in use by a running dslo-edge daemon ({error.owner}), "
            "and the demo would replace its bundle and checkpoints; stop that "
            "daemon, or choose another --out"
        ) from None


def _prepare_report_path(path: Path) -> None:
    """Create the parent of --report and check that it can be written.

    This runs before the demo starts, so a bad path cannot discard a finished
    run's results.
    """
    if path.is_dir():
        raise OutputPathError(
            f"{path} is a directory; choose a file path for --report",
            option="--report",
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputPathError(
            f"{path.parent} is a file, not a directory; "
            "choose another path for --report",
            option="--report",
        ) from None
    except OSError as error:
        raise OutputPathError(
            f"cannot create directory {path.parent} for --report: "
            f"{error.strerror or error}; choose a path in a writable directory",
            option="--report",
        ) from error
    if not os.access(path.parent, os.W_OK | os.X_OK) or (
        path.exists() and not os.access(path, os.W_OK)
    ):
        raise OutputPathError(
            f"cannot write the report to {path}: permission denied; "
            "choose a path in a writable directory for --report",
            option="--report",
        )


def run_demo(
    out: Path, report_path: Path | None, *, seed: int = 0, broker_kind: str = "auto"
) -> dict[str, Any]:
    """Run the demo end to end and return (and write) its report."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    started = time.monotonic()
    if report_path is not None:
        _prepare_report_path(report_path)
    _claim_folder(out)
    state_lock = _lock_state(out)
    try:
        return _run_demo_locked(
            out, report_path, seed, broker_kind, state_lock, started
        )
    finally:
        state_lock.release()


def _run_demo_locked(
    out: Path,
    report_path: Path | None,
    seed: int,
    broker_kind: str,
    state_lock: StateLock,
    started: float,
) -> dict[str, Any]:
    """Run the demo in ``out`` once ``run_demo`` has locked its state folder."""
    messages_per_round = PASSES_PER_ROUND * -(-int(0.2 * 1797) // BATCH_SIZE)
    total_messages = messages_per_round * len(ROUND_EPOCHS)
    with click.progressbar(
        length=4 + total_messages, label="demo", file=sys.stderr
    ) as bar:
        splits, student_keras, round_models = _train_models(out, seed)
        bar.update(2)
        bundle_path, teachers = _convert(out, student_keras, round_models)
        bar.update(1)
        bundle = load_bundle(bundle_path)
        samples = SampleSet(
            np.concatenate([splits.adapt_x] * PASSES_PER_ROUND),
            [f"adapt-{i}" for i in range(len(splits.adapt_x))] * PASSES_PER_ROUND,
        )
        with Broker.start(kind=broker_kind, workdir=out / "broker") as broker:
            process, config_path = _start_daemon(
                out, bundle_path, broker, total_messages, state_lock
            )
            try:
                result = push(
                    teachers,
                    bundle.teacher_output_kind,
                    samples,
                    DEVICE_ID,
                    broker.url,
                    batch_size=BATCH_SIZE,
                    protocol=5 if broker.kind == "mosquitto" else 4,
                    on_message_sent=lambda: bar.update(1),
                )
            except DsloError:
                exited = _daemon_exit_error(process, out / "daemon.log")
                if exited is None:
                    raise
                raise exited from None
            finally:
                exit_code = _stop_daemon(process)
        config = load_config(config_path)
        static = _static_kd(
            bundle_path,
            teachers[-1],
            bundle.teacher_output_kind,
            samples,
            result.messages,
            config.training,
        )
        bar.update(1)
    report = _report(
        splits,
        bundle,
        config,
        teachers,
        static,
        result,
        exit_code,
        broker.kind,
        time.monotonic() - started,
        seed,
    )
    report["report_path"] = str(_write_report(report, report_path, out))
    return report


def _write_report(report: dict[str, Any], path: Path | None, out: Path) -> Path:
    """Write the report to ``path``, or to OUT/report.json if that fails.

    Raises:
        DsloError: OUT/report.json cannot be written either.
    """
    text = json.dumps(report, indent=2) + "\n"
    fallback = out / "report.json"
    try:
        write_durably(path or fallback, text.encode())
    except OSError as error:
        reason = error.strerror or str(error)
        if path is None:
            raise DsloError(
                f"cannot write the report to {fallback}: {reason}; any earlier "
                "report there is unchanged. Free space or choose another --out"
            ) from error
        try:
            write_durably(fallback, text.encode())
        except OSError as fallback_error:
            raise DsloError(
                f"cannot write the report to {path}: {reason}, nor to "
                f"{fallback}: {fallback_error.strerror or fallback_error}; "
                "free space or choose another --report"
            ) from fallback_error
        raise DsloError(
            f"cannot write the report to {path}: {reason}; "
            f"it was written to {fallback} instead"
        ) from error
    return path or fallback


def _report(
    splits: Any,
    bundle: Any,
    config: Any,
    teachers: list[Path],
    static: StudentModel,
    result: Any,
    exit_code: int,
    broker_kind: str,
    seconds: float,
    seed: int,
) -> dict[str, Any]:
    factory = StudentModel(bundle)
    adapted = StudentModel(bundle)
    checkpoint = load_latest_checkpoint(config.state_dir / "checkpoints")
    if checkpoint is None:
        raise DsloError(
            f"the daemon left no checkpoint in {config.state_dir}; see daemon.log"
        )
    Trainer(adapted, config.training).restore(checkpoint)
    teacher_accuracy = {
        # argmax is the same for logits and probabilities.
        path.stem: accuracy(
            TeacherModel(path, bundle.teacher_output_kind).predict(splits.test_x),
            splits.test_y,
        )
        for path in teachers
    }
    metrics = result.device_metrics or {}
    return {
        "dataset": "scikit-learn digits (1,797 8x8 images, 10 classes)",
        "seed": seed,
        "device_shift": SHIFT_DESCRIPTION,
        "splits": {
            "base": len(splits.base_y),
            "hub": len(splits.hub_y),
            "adapt": len(splits.adapt_y),
            "test": len(splits.test_y),
        },
        "teacher_accuracy_shifted_test": teacher_accuracy,
        "student_accuracy_shifted_test": {
            "before_adaptation": accuracy(factory.infer(splits.test_x), splits.test_y),
            "after_dslo": accuracy(adapted.infer(splits.test_x), splits.test_y),
            "after_static_kd": accuracy(static.infer(splits.test_x), splits.test_y),
        },
        "student_accuracy_clean_base": {
            "before_adaptation": accuracy(factory.infer(splits.base_x), splits.base_y),
            "after_dslo": accuracy(adapted.infer(splits.base_x), splits.base_y),
        },
        "updates": {
            "sent": result.messages,
            "samples_sent": result.samples,
            "applied": metrics.get("applied"),
            "rejected": metrics.get("rejected"),
            "bytes_sent": result.payload_bytes,
        },
        "latency_ms": {
            "train_step": metrics.get("train_ms"),
            "end_to_end": metrics.get("end_to_end_ms"),
        },
        "daemon_peak_rss_mb": metrics.get("peak_rss_mb"),
        "energy": metrics.get("energy"),
        "daemon_exit_code": exit_code,
        "broker": broker_kind,
        "static_kd": {
            "alpha": STATIC_ALPHA,
            "teacher": teachers[-1].stem,
            "smoothing": False,
        },
        "duration_s": round(seconds, 1),
    }


def format_report(report: dict[str, Any]) -> str:
    """Return the report as a few lines of plain text."""
    student = report["student_accuracy_shifted_test"]
    updates = report["updates"]
    train = report["latency_ms"]["train_step"]
    end_to_end = report["latency_ms"]["end_to_end"]
    teachers = ", ".join(
        f"{name} {value:.3f}"
        for name, value in report["teacher_accuracy_shifted_test"].items()
    )
    rejected = sum((updates["rejected"] or {}).values())
    lines = [
        f"dslo-edge demo on {report['dataset']}, broker {report['broker']}",
        f"teacher accuracy (shifted test): {teachers}",
        "student accuracy (shifted test): "
        f"before {student['before_adaptation']:.3f}, "
        f"after DSL-O {student['after_dslo']:.3f}, "
        f"static KD {student['after_static_kd']:.3f}",
        f"updates: sent {updates['sent']}, applied {updates['applied']}, "
        f"rejected {rejected}",
        f"train step ms: p50 {train['p50']}, p95 {train['p95']}; "
        f"end to end ms: p50 {end_to_end['p50']}, p95 {end_to_end['p95']}",
        *describe_energy(report.get("energy") or {}),
        f"daemon peak RSS {report['daemon_peak_rss_mb']} MiB; "
        f"took {report['duration_s']} s",
        f"report: {report.get('report_path')}",
    ]
    return "\n".join(lines)
