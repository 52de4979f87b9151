"""Model health: probe-set accuracy and finite weights, checked before saving.

A small labelled probe set travels with the bundle (``probe.npz`` with ``x``
and ``y``). The daemon measures the student's accuracy on it every few
updates and before every checkpoint. Three findings make the daemon roll
back to the last good checkpoint instead of saving. The first is accuracy
more than the configured margin below the accuracy at that checkpoint. The
others are any non-finite weight, and trained weights whose L2 norm grew
beyond a factor of the norm at that checkpoint.
The norm check needs no probe set, so it also guards bundles without one.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dslo_edge.bundle import Bundle
from dslo_edge.errors import BundleError
from dslo_edge.metrics import LatencyWindow
from dslo_edge.models import StudentModel

PROBE_FILE = "probe.npz"


@dataclass(frozen=True)
class ProbeSet:
    x: np.ndarray
    y: np.ndarray


def load_probe(path: Path, input_shape: tuple[int, ...], class_count: int) -> ProbeSet:
    """Read and check a probe file against the student's shapes.

    Raises:
        BundleError: the file is unreadable or its arrays do not fit.
    """
    x, labels = _read_probe_arrays(path)
    if x.shape[1:] != input_shape or labels.shape != (len(x),) or len(x) == 0:
        raise BundleError(
            f"probe set {path} has x {x.shape} and y {labels.shape}; expected "
            f"x (N, {', '.join(map(str, input_shape))}) and y (N,) with N > 0"
        )
    finite_rows = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite_rows.all():
        row = int(np.flatnonzero(~finite_rows)[0])
        raise BundleError(
            f"probe set {path}: x[{row}] contains NaN or infinity; expected "
            "finite inputs, so drop or fill the rows with missing values"
        )
    # A float label such as 1.5 would turn into class 1 in the int64 cast.
    with np.errstate(invalid="ignore"):
        y = labels.astype(np.int64)
    changed = np.flatnonzero(y != labels)
    if len(changed):
        index = int(changed[0])
        raise BundleError(
            f"probe set {path}: y[{index}] is {labels[index].item()!r}; expected "
            f"a whole class index from 0 to {class_count - 1}"
        )
    if y.min() < 0 or y.max() >= class_count:
        raise BundleError(
            f"probe set {path} has labels {y.min()}..{y.max()}, but the student "
            f"has {class_count} classes; expected labels in 0..{class_count - 1}"
        )
    return ProbeSet(x, y)


def _read_probe_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``x`` as float32 and ``y`` as float64 from a probe file."""
    expected = "expected an .npz with x and y, written by numpy.savez(path, x=x, y=y)"
    try:
        with open(path, "rb") as stream:
            head = stream.read(4)
        if not head.startswith(b"PK"):
            # np.load would try pickle and blame "pickled (object) data".
            raise BundleError(
                f"probe set {path} is not an .npz archive (it starts with "
                f"{head!r}); {expected}"
            )
        with np.load(path, allow_pickle=False) as data:
            names = sorted(data.files)
            if "x" not in names or "y" not in names:
                raise BundleError(f"probe set {path} has arrays {names}; {expected}")
            # float64 keeps every int32 label exactly for the whole-number check.
            return (
                np.asarray(data["x"], dtype=np.float32),
                np.asarray(data["y"], dtype=np.float64),
            )
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise BundleError(
            f"cannot read probe set {path}: {error}; {expected}"
        ) from error


def check_bundle_probe(bundle: Bundle) -> None:
    """Check the bundle's probe set as the daemon reads it at start.

    A multi-head student's probe set is not read, so it is not checked.

    Raises:
        BundleError: ``probe.npz`` is unreadable or does not fit the student.
    """
    path = bundle.path / PROBE_FILE
    if path.is_file() and not bundle.is_multi_head:
        load_probe(path, bundle.input_shape, bundle.class_count)


class HealthGuard:
    """Decides whether the student is still healthy enough to checkpoint.

    Args:
        probe: the probe set, or None to check finite weights only.
        max_drop: largest accepted fall in probe accuracy (fraction, 0..1)
            below the accuracy at the last good checkpoint.
        infer_ms: latency window that records each probe inference.
    """

    def __init__(
        self,
        probe: ProbeSet | None,
        max_drop: float,
        infer_ms: LatencyWindow | None = None,
        max_norm_growth: float = 10.0,
        norm_names: set[str] | None = None,
    ):
        self.probe = probe
        self.max_drop = max_drop
        self.infer_ms = infer_ms
        self.max_norm_growth = max_norm_growth
        self.norm_names = norm_names
        self.baseline: float | None = None
        self.last_accuracy: float | None = None
        self.baseline_norm: float | None = None
        self.last_norm: float | None = None

    def accuracy(self, student: StudentModel) -> float | None:
        """Measure probe accuracy now, or return None without a probe set."""
        if self.probe is None:
            return None
        started = time.perf_counter()
        predicted = np.argmax(student.infer(self.probe.x), axis=1)
        if self.infer_ms is not None:
            self.infer_ms.add((time.perf_counter() - started) * 1000)
        self.last_accuracy = float(np.mean(predicted == self.probe.y))
        return self.last_accuracy

    def problem(
        self, student: StudentModel, weights: dict[str, np.ndarray]
    ) -> str | None:
        """Return why the student must be rolled back, or None if healthy."""
        bad = [
            name for name, value in weights.items() if not np.all(np.isfinite(value))
        ]
        if bad:
            return f"non-finite values in weights {', '.join(bad)}"
        self.last_norm = self.norm(weights)
        if (
            self.baseline_norm
            and self.last_norm > self.baseline_norm * self.max_norm_growth
        ):
            return (
                f"weight norm grew to {self.last_norm:.3g} from "
                f"{self.baseline_norm:.3g}, more than {self.max_norm_growth:g} times"
            )
        accuracy = self.accuracy(student)
        if accuracy is None or self.baseline is None:
            return None
        if accuracy < self.baseline - self.max_drop:
            return (
                f"probe accuracy fell to {accuracy:.3f} from {self.baseline:.3f}, "
                f"more than the allowed {self.max_drop:.3f}"
            )
        return None

    def norm(self, weights: dict[str, np.ndarray]) -> float:
        """Return the L2 norm over the trained weights (all, without a list)."""
        total = 0.0
        for name, value in weights.items():
            if self.norm_names is None or name in self.norm_names:
                total += float(np.sum(np.square(value, dtype=np.float64)))
        return float(np.sqrt(total))

    def accept(self, weights: dict[str, np.ndarray] | None = None) -> None:
        """Mark the current state as good: its accuracy and norm become baselines."""
        if self.last_accuracy is not None:
            self.baseline = self.last_accuracy
        if weights is not None:
            self.last_norm = self.norm(weights)
        if self.last_norm is not None:
            self.baseline_norm = self.last_norm
