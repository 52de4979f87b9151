"""Model health: probe-set accuracy and finite weights, checked before saving.

A small labelled probe set travels with the bundle (``probe.npz``). For a
single-head student it contains ``x`` and ``y``. For a student with several
heads it contains ``x`` and one label array ``y_<head>`` per head. The daemon
measures the student's accuracy on it every few updates and before every
checkpoint. Three findings make the daemon roll back to the last good
checkpoint instead of saving. The first is accuracy (of any head) more than
the configured margin below the accuracy at that checkpoint. The others are
any non-finite weight, and trained weights whose L2 norm grew beyond a factor
of the norm at that checkpoint.
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


class SingleLabelProbeError(BundleError):
    """A multi-head student's probe set has one ``y``, as earlier versions allowed.

    Earlier versions ignored such a file with a warning, so the daemon still
    starts with one and runs without the probe set.
    """


class UnreadLabelProbeError(BundleError):
    """A multi-head student's probe set has ``y`` beside every ``y_<head>``.

    Earlier versions read such a file and ignored its ``y``, so the daemon
    still starts with one and reads the ``y_<head>`` arrays.
    """


@dataclass(frozen=True)
class ProbeSet:
    """Probe inputs ``x`` and the class index ``y`` of each row."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class MultiHeadProbeSet:
    """Probe inputs ``x`` and, for each head by name, the class index of each row."""

    x: np.ndarray
    labels: dict[str, np.ndarray]


def head_label_array(head: str) -> str:
    """Return the name of a head's label array in ``probe.npz``."""
    return f"y_{head}"


def load_probe(path: Path, input_shape: tuple[int, ...], class_count: int) -> ProbeSet:
    """Read and check a single-head probe file against the student's shapes.

    Raises:
        BundleError: the file is unreadable or its arrays do not fit.
    """
    expected = "expected an .npz with x and y, written by numpy.savez(path, x=x, y=y)"
    x, arrays = _read_probe_arrays(path, ["y"], expected)
    _check_shapes(path, x, "y", arrays["y"], input_shape)
    _check_inputs(path, x)
    y = _class_indices(path, "y", arrays["y"], class_count, "the student")
    return ProbeSet(x, y)


def load_multi_head_probe(
    path: Path,
    input_shape: tuple[int, ...],
    heads: dict[str, int],
    *,
    ignore_unread_y: bool = False,
) -> MultiHeadProbeSet:
    """Read and check a probe file with one label array per head.

    Args:
        path: the ``probe.npz`` file.
        input_shape: the student's input shape without the batch axis.
        heads: the class count of each head, by the manifest's head names.
        ignore_unread_y: accept a ``y`` array beside every ``y_<head>``.

    Raises:
        BundleError: the file is unreadable, lacks a head's ``y_<head>``
            array, has a ``y_<name>`` array for a head the student lacks, or
            its arrays do not fit.
    """
    names = [head_label_array(head) for head in heads]
    keywords = ", ".join(f"{name}=..." for name in names)
    expected = (
        f"expected an .npz with x and one label array per head "
        f"({', '.join(names)}), written by numpy.savez(path, x=x, {keywords})"
    )
    x, arrays = _read_probe_arrays(path, names, expected, ignore_unread_y)
    for name in names:
        _check_shapes(path, x, name, arrays[name], input_shape)
    _check_inputs(path, x)
    labels = {}
    for head, classes in heads.items():
        name = head_label_array(head)
        labels[head] = _class_indices(
            path, name, arrays[name], classes, f"head {head!r}"
        )
    return MultiHeadProbeSet(x, labels)


def load_bundle_probe(
    bundle: Bundle, *, ignore_unread_y: bool = False
) -> ProbeSet | MultiHeadProbeSet | None:
    """Read the bundle's probe set as the daemon does, or return None without one.

    ``ignore_unread_y`` accepts a ``y`` beside every ``y_<head>`` of a
    multi-head student and leaves it out.

    Raises:
        BundleError: ``probe.npz`` is unreadable or does not fit the student.
    """
    path = bundle.path / PROBE_FILE
    if not path.is_file():
        return None
    if bundle.is_multi_head:
        return load_multi_head_probe(
            path, bundle.input_shape, bundle.heads, ignore_unread_y=ignore_unread_y
        )
    return load_probe(path, bundle.input_shape, bundle.class_count)


def load_device_probe(
    bundle: Bundle,
) -> tuple[ProbeSet | MultiHeadProbeSet | None, str | None]:
    """Read the bundle's probe set as the daemon does, and a warning or None.

    The daemon also starts with the two multi-head probe files that earlier
    versions accepted and that ``check_bundle_probe`` rejects. A file with a
    single ``y`` gives no probe set, and one with ``y`` beside every
    ``y_<head>`` gives the ``y_<head>`` arrays. The warning then says which.

    Raises:
        BundleError: ``probe.npz`` is unreadable or does not fit the student.
    """
    try:
        return load_bundle_probe(bundle), None
    except SingleLabelProbeError as error:
        return None, f"checks the student's weights without its probe set: {error}"
    except UnreadLabelProbeError as error:
        probe = load_bundle_probe(bundle, ignore_unread_y=True)
        return probe, f"ignores y in its probe set and reads y_<head>: {error}"


def check_bundle_probe(bundle: Bundle) -> None:
    """Check the bundle's probe set as the daemon reads it at start.

    Raises:
        BundleError: ``probe.npz`` is unreadable or does not fit the student.
    """
    load_bundle_probe(bundle)


def _check_shapes(
    path: Path,
    x: np.ndarray,
    name: str,
    labels: np.ndarray,
    input_shape: tuple[int, ...],
) -> None:
    if x.shape[1:] != input_shape or labels.shape != (len(x),) or len(x) == 0:
        raise BundleError(
            f"probe set {path} has x {x.shape} and {name} {labels.shape}; expected "
            f"x (N, {', '.join(map(str, input_shape))}) and {name} (N,) with N > 0"
        )


def _check_inputs(path: Path, x: np.ndarray) -> None:
    finite_rows = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite_rows.all():
        row = int(np.flatnonzero(~finite_rows)[0])
        raise BundleError(
            f"probe set {path}: x[{row}] contains NaN or infinity; expected "
            "finite inputs, so drop or fill the rows with missing values"
        )


def _class_indices(
    path: Path, name: str, labels: np.ndarray, class_count: int, owner: str
) -> np.ndarray:
    """Return ``labels`` as int64 class indices, or raise BundleError.

    ``owner`` names who has ``class_count`` classes in the messages, such as
    "the student" or "head 'shape'".
    """
    # A float label such as 1.5 would turn into class 1 in the int64 cast.
    with np.errstate(invalid="ignore"):
        y = labels.astype(np.int64)
    changed = np.flatnonzero(y != labels)
    if len(changed):
        index = int(changed[0])
        raise BundleError(
            f"probe set {path}: {name}[{index}] is {labels[index].item()!r}; "
            f"expected a whole class index from 0 to {class_count - 1}"
        )
    if y.min() < 0 or y.max() >= class_count:
        subject = "labels" if name == "y" else f"{name} labels"
        raise BundleError(
            f"probe set {path} has {subject} {y.min()}..{y.max()}, but {owner} has "
            f"{class_count} classes; expected labels in 0..{class_count - 1}"
        )
    return y


def _read_probe_arrays(
    path: Path, label_names: list[str], expected: str, ignore_unread_y: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return ``x`` as float32 and the label arrays as float64 from a probe file.

    ``expected`` describes the expected file at the end of each message.
    """
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
            _check_array_names(path, names, label_names, expected, ignore_unread_y)
            # float64 keeps every int32 label exactly for the whole-number check.
            return (
                np.asarray(data["x"], dtype=np.float32),
                {
                    name: np.asarray(data[name], dtype=np.float64)
                    for name in label_names
                },
            )
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise BundleError(
            f"cannot read probe set {path}: {error}; {expected}"
        ) from error


def _check_array_names(
    path: Path,
    names: list[str],
    label_names: list[str],
    expected: str,
    ignore_unread_y: bool = False,
) -> None:
    """Raise BundleError unless ``x`` and every label array are in the file.

    Per-head files (``label_names`` other than ``["y"]``) must not contain a
    ``y_<name>`` array for another head, because that is most likely a
    misspelt head name whose labels would go unchecked. For the same reason
    they must not contain ``y`` beside every ``y_<head>``.
    """
    missing = [name for name in ["x", *label_names] if name not in names]
    if label_names == ["y"]:
        if missing:
            raise BundleError(f"probe set {path} has arrays {names}; {expected}")
        return
    unknown = [n for n in names if n.startswith("y_") and n not in label_names]
    if unknown:
        # Naming the missing arrays too shows a misspelt head name, such as
        # y_shpae, beside the y_shape it was meant to be.
        verb = "names" if len(unknown) == 1 else "name"
        lacking = f", and lacks {', '.join(missing)}" if missing else ""
        raise BundleError(
            f"probe set {path} has {', '.join(unknown)}, which {verb} no head "
            f"of the student{lacking}; {expected}"
        )
    if not missing:
        if "y" in names and not ignore_unread_y:
            raise UnreadLabelProbeError(
                f"probe set {path} has y, which a student with several heads "
                f"does not read, so remove it; {expected}"
            )
        return
    if "y" in names and not any(n.startswith("y_") for n in names):
        raise SingleLabelProbeError(
            f"probe set {path} has arrays {names}: a single y fits only a "
            f"single-head student, so save each head's labels as y_<head>; "
            f"{expected}"
        )
    raise BundleError(
        f"probe set {path} has arrays {names}, without {', '.join(missing)}; {expected}"
    )


class HealthGuard:
    """Decides whether the student is still healthy enough to checkpoint.

    Args:
        probe: the probe set, or None to check finite weights only.
        max_drop: largest accepted fall in probe accuracy (fraction, 0..1)
            below the accuracy at the last good checkpoint. With a
            multi-head probe set it applies to each head on its own.
        infer_ms: latency window that records each probe inference.
    """

    def __init__(
        self,
        probe: ProbeSet | MultiHeadProbeSet | None,
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
        # For a multi-head probe set, last_accuracy is the mean over heads.
        self.last_accuracy: float | None = None
        self.baseline_heads: dict[str, float] | None = None
        self.last_head_accuracy: dict[str, float] | None = None
        self.baseline_norm: float | None = None
        self.last_norm: float | None = None

    def accuracy(self, student: StudentModel) -> float | None:
        """Measure probe accuracy now, or return None without a probe set.

        With a multi-head probe set this stores each head's accuracy in
        ``last_head_accuracy`` and returns their mean.
        """
        if self.probe is None:
            return None
        started = time.perf_counter()
        outputs = student.infer(self.probe.x)
        if self.infer_ms is not None:
            self.infer_ms.add((time.perf_counter() - started) * 1000)
        if isinstance(self.probe, MultiHeadProbeSet):
            self.last_head_accuracy = {
                head: _accuracy(outputs[head], labels)
                for head, labels in self.probe.labels.items()
            }
            self.last_accuracy = float(np.mean(list(self.last_head_accuracy.values())))
        else:
            self.last_accuracy = _accuracy(outputs, self.probe.y)
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
        if isinstance(self.probe, MultiHeadProbeSet):
            return self._head_accuracy_problem()
        if accuracy < self.baseline - self.max_drop:
            return (
                f"probe accuracy fell to {accuracy:.3f} from {self.baseline:.3f}, "
                f"more than the allowed {self.max_drop:.3f}"
            )
        return None

    def _head_accuracy_problem(self) -> str | None:
        """Name every head whose probe accuracy fell too far, or return None."""
        assert self.last_head_accuracy is not None
        assert self.baseline_heads is not None
        fallen = [
            f"on head {head!r} to {accuracy:.3f} from {self.baseline_heads[head]:.3f}"
            for head, accuracy in self.last_head_accuracy.items()
            if accuracy < self.baseline_heads[head] - self.max_drop
        ]
        if not fallen:
            return None
        return (
            f"probe accuracy fell {' and '.join(fallen)}, more than the allowed "
            f"{self.max_drop:.3f}"
        )

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
        if self.last_head_accuracy is not None:
            self.baseline_heads = dict(self.last_head_accuracy)
        if weights is not None:
            self.last_norm = self.norm(weights)
        if self.last_norm is not None:
            self.baseline_norm = self.last_norm


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Return the fraction of rows whose most probable class is the label."""
    predicted = np.argmax(np.asarray(probabilities), axis=1)
    return float(np.mean(predicted == labels))
