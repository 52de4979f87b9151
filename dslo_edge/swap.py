"""Install received bundles next to the current one and swap students safely.

Layout under the daemon's state directory::

    bundles/<release>/     one directory per installed bundle
    bundles/active         link to the bundle the daemon runs
    bundles/previous       link to the bundle before it, for rollback
    kept-checkpoints/<model>/
                           the last checkpoint of a model that a release with
                           another input shape, classes or heads replaced

Each link is replaced with one rename, so a power cut leaves either the old
or the new link, never none. The factory bundle named in the device config
stays where it is and is used while no ``active`` link exists.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dslo_edge.bundle import (
    MANIFEST_NAME,
    Bundle,
    load_bundle,
    manifest_files,
    sha256_file,
)
from dslo_edge.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_latest_checkpoint,
)
from dslo_edge.errors import BundleError
from dslo_edge.health import PROBE_FILE
from dslo_edge.json_input import parse_json
from dslo_edge.manifest import check_top_level
from dslo_edge.ota import (
    RELEASE_FILE,
    OtaError,
    make_state_folder,
    read_members,
    state_write_error,
)
from dslo_edge.state_folders import BUNDLES, KEPT_CHECKPOINTS, STATE_FOLDERS

logger = logging.getLogger(__name__)

ACTIVE = "active"
PREVIOUS = "previous"
MAX_KEPT_MODELS = 3
# File in a release directory from its activation until the daemon accepts
# it. A release that still has it at start was never accepted, because the
# daemon stopped during the switch or could not move the active link back
# after a failed switch, so the daemon starts the release before it instead.
PENDING_MARKER = ".pending"
# NAME_MAX of Linux file systems such as ext4, in bytes.
_MAX_NAME_BYTES = 255
# Prefix of the optimizer's tensors among a student's weights, as
# converters/optimizers.py names them (STATE_PREFIX).
OPTIMIZER_STATE_PREFIX = "optimizer__"


def release_id(bundle_dir: Path) -> str:
    """Return a bundle's release id: a sha256 prefix over the files a release carries.

    The manifest lists every model file's sha256 but not ``probe.npz``, which
    a release also carries. So without a probe set the id is the start of the
    manifest's sha256, and with one it is the start of the sha256 of both
    files' sha256 digests. A bundle sent again with another probe set gets
    another id, instead of reusing the installed release with the old probe.
    The id names the bundle wherever it is installed (``flash`` uses it too).
    """
    manifest_digest = sha256_file(bundle_dir / MANIFEST_NAME)
    probe = bundle_dir / PROBE_FILE
    if not probe.is_file():
        return manifest_digest[:16]
    both = f"{manifest_digest}\n{sha256_file(probe)}".encode()
    return hashlib.sha256(both).hexdigest()[:16]


def model_id(bundle_dir: Path) -> str:
    """Return the first 16 hex digits of the manifest sha256, naming the model.

    Bundles that differ only in their probe set share it, so a kept
    checkpoint of the model is found whichever probe set comes with it.
    """
    return sha256_file(bundle_dir / MANIFEST_NAME)[:16]


class Student(Protocol):
    """The part of ``models.StudentModel`` that a swap uses."""

    bundle: Bundle

    def get_weights(self) -> dict[str, np.ndarray]: ...

    def set_weights(self, weights: dict[str, np.ndarray]) -> None: ...

    # An array (N, classes) for one head, or such an array per head name.
    def infer(self, x: np.ndarray) -> Any: ...


class BundleStore:
    """Installed bundles in ``<state_dir>/bundles`` with active and previous links."""

    def __init__(self, state_dir: Path):
        self.folder = state_dir / BUNDLES

    def active_path(self, factory: Path) -> Path:
        """Return the bundle the daemon should load: the active link, else factory.

        Raises:
            BundleError: the active link is a symlink loop.
        """
        link = self.folder / ACTIVE
        if _is_symlink_loop(link):
            raise BundleError(
                f"{link} is a symlink loop, expected a link to a release "
                f"directory in {self.folder}; remove {link} so that the daemon "
                f"starts from device.bundle {factory}, or point it at one of the "
                "release directories there"
            )
        target = _link_target(link)
        if target is None or not target.is_dir():
            return factory
        if not (target / PENDING_MARKER).exists():
            return target
        fallback = self._accepted_previous() or factory
        logger.error(
            "Release %s that %s names was never accepted, because the daemon "
            "stopped during its switch or could not move the link back after a "
            "failed switch, so the daemon starts %s instead. Send the release "
            "again, after making the state directory writable if it is read-only",
            target.name,
            link,
            fallback,
        )
        return fallback

    def install_archive(self, archive: Path) -> Path:
        """Unpack a verified archive into its own release directory.

        The archive must hold only regular files at its top level, and the
        unpacked bundle must pass ``load_bundle`` with checksums. An already
        installed identical release is reused.

        Raises:
            OtaError: ``bad_bundle`` when the archive or the bundle is invalid,
                ``state_dir_invalid`` when ``bundles`` is not a directory,
                ``state_dir_write_failed`` when a write to it fails.
        """
        size = archive.stat().st_size
        try:
            return self._install_archive(archive)
        except OSError as error:
            raise state_write_error(
                error, f"unpack the release into {self.folder}", self.folder, size
            ) from error

    def _install_archive(self, archive: Path) -> Path:
        make_state_folder(self.folder, STATE_FOLDERS[BUNDLES])
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.folder))
        try:
            _extract(archive, staging)
            # The release options travel with the transfer, not the bundle.
            (staging / RELEASE_FILE).unlink(missing_ok=True)
            try:
                load_bundle(staging)
            except BundleError as error:
                raise OtaError(
                    "bad_bundle", f"received bundle is invalid: {error}"
                ) from error
            release = self.folder / release_id(staging)
            if release.is_dir():
                shutil.rmtree(staging)
                return release
            staging.rename(release)
            return release
        finally:
            # An error here would hide the one that stopped the install.
            shutil.rmtree(staging, ignore_errors=True)

    def active_release(self) -> Path | None:
        """Return the release the daemon runs, or None for the factory bundle.

        That is the release the ``active`` link names, unless it was never
        accepted. Then the daemon runs the release before it, as
        ``active_path`` chooses at start.
        """
        target = _link_target(self.folder / ACTIVE)
        if target is None or not target.is_dir():
            return None
        if (target / PENDING_MARKER).exists():
            return self._accepted_previous()
        return target

    def _accepted_previous(self) -> Path | None:
        """Return the release ``previous`` names, unless it is missing or pending."""
        previous = _link_target(self.folder / PREVIOUS)
        if previous is None or not previous.is_dir():
            return None
        if (previous / PENDING_MARKER).exists():
            return None
        return previous

    def activate(self, release: Path, pending: bool = False) -> bool:
        """Point ``active`` at a release and ``previous`` at the one it replaces.

        With ``pending``, the release is not started at the daemon's next
        start until ``accept`` marks it.

        Returns:
            True when ``active`` named another release (or none) before, so
            ``rollback`` undoes this call. False when it already named
            ``release`` and nothing changed.
        """
        current = self.folder / ACTIVE
        target = _link_target(current)
        if target == release.resolve():
            return False
        # Written first, so a release whose switch cannot be undone is not
        # started later (see active_path).
        if pending:
            (release / PENDING_MARKER).touch()
        # A looping link names no release to roll back to. A release still
        # pending was never started, so ``previous`` keeps naming the release
        # that runs, and a rollback or the next start returns to it.
        if target is not None and not (target / PENDING_MARKER).exists():
            _replace_link(self.folder / PREVIOUS, os.readlink(current))
        _replace_link(current, release.name)
        self._prune()
        return True

    def accept(self, release: Path) -> None:
        """Mark an activated release as accepted, so the daemon starts it."""
        (release / PENDING_MARKER).unlink(missing_ok=True)

    def discard(self, release: Path) -> None:
        """Delete an installed release unless ``active`` or ``previous`` names it."""
        if release.name not in self._linked() and release.parent == self.folder:
            shutil.rmtree(release, ignore_errors=True)

    def rollback(self) -> Path | None:
        """Point ``active`` back at ``previous``; return it, or None if there is none.

        With no previous release the ``active`` link is removed, so the
        daemon falls back to the factory bundle.
        """
        previous = self.folder / PREVIOUS
        active = self.folder / ACTIVE
        if not previous.is_symlink():
            active.unlink(missing_ok=True)
            return None
        # A rename creates no file, so it works on a full file system too.
        os.replace(previous, active)
        return active.resolve()

    def _linked(self) -> set[str]:
        targets = [_link_target(self.folder / name) for name in (ACTIVE, PREVIOUS)]
        return {target.name for target in targets if target is not None}

    def _prune(self) -> None:
        keep = self._linked()
        for path in self.folder.iterdir():
            if path.is_dir() and not path.is_symlink() and path.name not in keep:
                if not path.name.startswith("."):
                    shutil.rmtree(path, ignore_errors=True)


def _extract(archive: Path, target: Path) -> None:
    """Extract the files of a bundle, after checking every member.

    Raises:
        OtaError: ``bad_bundle`` for a member that is not a plain top-level
            file or is not part of the bundle. Nothing is extracted then.
    """
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = read_members(tar)
            for member in members:
                problem = _member_problem(member)
                if problem is not None:
                    raise OtaError("bad_bundle", problem)
            _check_bundle_members(tar, members)
            for member in members:
                source = tar.extractfile(member)
                assert source is not None
                with source, open(target / member.name, "wb") as stream:
                    shutil.copyfileobj(source, stream)
    except tarfile.TarError as error:
        raise OtaError("bad_bundle", f"cannot read the archive: {error}") from error


def _check_bundle_members(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> None:
    """Reject a member that ``ota-send`` does not pack, such as a stray file.

    ``ota-send`` packs ``manifest.json``, the files it names, ``probe.npz``
    and ``ota-release.json``. Any other member would be kept in the release.
    An ota-send from before that rule packed every file of the bundle folder,
    so the message names both fixes.

    Raises:
        OtaError: ``bad_bundle`` for another member, or for a missing or
            invalid ``manifest.json``.
    """
    allowed = {MANIFEST_NAME, PROBE_FILE, RELEASE_FILE}
    allowed.update(manifest_files(_read_manifest(tar, members)).values())
    for member in members:
        if member.name not in allowed:
            raise OtaError(
                "bad_bundle",
                f"archive member {member.name!r} is not a file that "
                f"{MANIFEST_NAME} names; the device accepts only {MANIFEST_NAME}, "
                f"the files it names, {PROBE_FILE} and {RELEASE_FILE}, which is "
                "all that a current 'dslo-edge ota-send' packs, but an older one "
                "packed every file of the bundle folder; remove "
                f"{member.name!r} from the bundle folder or update dslo-edge on "
                "the sending machine, then send the bundle again",
            )


def _read_manifest(
    tar: tarfile.TarFile, members: list[tarfile.TarInfo]
) -> dict[str, Any]:
    """Parse the archive's ``manifest.json`` member, a JSON object.

    Raises:
        OtaError: ``bad_bundle`` when it is missing or not a JSON object.
    """
    found = [member for member in members if member.name == MANIFEST_NAME]
    if not found:
        raise OtaError(
            "bad_bundle",
            f"received bundle is invalid: the archive has no {MANIFEST_NAME}; "
            "send a bundle folder that 'dslo-edge convert' wrote with "
            "'dslo-edge ota-send'",
        )
    # _member_problem passed, so the member is a plain file.
    source = tar.extractfile(found[-1])
    assert source is not None
    with source:
        text = source.read()
    try:
        return check_top_level(parse_json(text), Path(MANIFEST_NAME))
    except ValueError as error:
        raise OtaError(
            "bad_bundle",
            f"received bundle is invalid: {MANIFEST_NAME} is not valid JSON "
            f"({error}); write the bundle again with 'dslo-edge convert'",
        ) from error
    except BundleError as error:
        raise OtaError("bad_bundle", f"received bundle is invalid: {error}") from error


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Return why an archive member cannot be unpacked, or None if it can."""
    name = member.name
    if not member.isfile() or "/" in name or name in ("", ".", ".."):
        return f"archive member {name!r} is not a plain top-level file"
    # A sparse member unpacks to its declared size, so even an archive of a
    # few KiB can fill the disk of the state directory.
    if member.issparse():
        return (
            f"archive member {name!r} is a sparse file of {member.size} bytes; "
            "send the bundle with 'dslo-edge ota-send', which packs plain files"
        )
    # open() raises ValueError for a NUL and ENAMETOOLONG for a long name,
    # which would report the archive as a fault of the state directory.
    if "\x00" in name or len(os.fsencode(name)) > _MAX_NAME_BYTES:
        return (
            f"archive member {name[:64]!r} is not a valid file name, because it "
            f"contains a NUL byte or is longer than {_MAX_NAME_BYTES} bytes"
        )
    return None


def _link_target(link: Path) -> Path | None:
    """Return the path a symlink resolves to, or None if ``link`` is no symlink.

    A symlink loop gives None as well. Up to Python 3.12 ``Path.resolve``
    raises RuntimeError for it.
    """
    if not link.is_symlink() or _is_symlink_loop(link):
        return None
    return link.resolve()


def _is_symlink_loop(link: Path) -> bool:
    try:
        os.stat(link)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def _replace_link(link: Path, target: str) -> None:
    temporary = link.with_name(f".{link.name}.tmp")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    os.replace(temporary, link)


def describe_model(bundle: Bundle) -> str:
    """Return the input shape and classes (or heads) of a bundle as text."""
    shape = "x".join(str(size) for size in bundle.input_shape)
    if bundle.is_multi_head:
        heads = ", ".join(f"{name} {count}" for name, count in bundle.heads.items())
        return f"input {shape} and heads {heads} (classes)"
    return f"input {shape} and {bundle.class_count} classes"


def model_change(current: Bundle, new: Bundle) -> str | None:
    """Describe how ``new`` takes other inputs or labels than ``current``.

    Returns:
        None when the input shape and the classes (or every head's name and
        classes) are equal, so updates for one model also fit the other.
    """
    same = current.input_shape == new.input_shape and (
        current.is_multi_head == new.is_multi_head
        and current.heads == new.heads
        and (current.is_multi_head or current.class_count == new.class_count)
    )
    if same:
        return None
    return f"{describe_model(new)}, but the running model has {describe_model(current)}"


def lost_weights(
    current: dict[str, np.ndarray], new: dict[str, np.ndarray]
) -> str | None:
    """Describe the weights of ``current`` that ``new`` cannot take over.

    Optimizer state, such as Adam's moments, is left out: a new optimizer
    may start its state afresh without losing what the model learned.

    Returns:
        Text that names up to three such weights, or None when ``new`` has
        every model weight of ``current`` by name and shape, so
        ``carry_over_weights`` keeps all adapted values.
    """
    lost = []
    for name, value in current.items():
        if name.startswith(OPTIMIZER_STATE_PREFIX):
            continue
        replacement = new.get(name)
        if replacement is None:
            lost.append(f"no weight {name}")
        elif replacement.shape != value.shape:
            lost.append(f"{name} of shape {replacement.shape}, not {value.shape}")
    if not lost:
        return None
    listed = "; ".join(lost[:3])
    more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
    return f"another student: {listed}{more}"


class KeptCheckpoints:
    """The last checkpoint of each model replaced by a model change.

    One folder per ``model_id`` under ``<state_dir>/kept-checkpoints``, so
    installing that model again restores its adapted weights, whichever
    probe set comes with it. The
    ``MAX_KEPT_MODELS`` newest folders are kept.
    """

    def __init__(self, state_dir: Path):
        self.folder = state_dir / KEPT_CHECKPOINTS

    def keep(self, bundle: Bundle, checkpoint_dir: Path) -> Path | None:
        """Copy the newest checkpoint for ``bundle``; return the copy, or None."""
        latest = load_latest_checkpoint(checkpoint_dir)
        if latest is None:
            return None
        target = self.folder / model_id(bundle.path)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        copy = target / latest.path.name
        shutil.copy2(latest.path, copy)
        self._prune(newest=target)
        return copy

    def load(self, bundle: Bundle) -> Checkpoint | None:
        """Return the kept checkpoint of a bundle, or None if there is none."""
        folder = self.folder / model_id(bundle.path)
        return load_latest_checkpoint(folder) if folder.is_dir() else None

    def _prune(self, newest: Path) -> None:
        folders = sorted(
            (path for path in self.folder.iterdir() if path.is_dir()),
            key=lambda path: _kept_order(path, newest),
            reverse=True,
        )
        for old in folders[MAX_KEPT_MODELS:]:
            logger.info("Deleting the kept checkpoint of model %s", old.name)
            shutil.rmtree(old, ignore_errors=True)


def _kept_order(folder: Path, newest: Path) -> tuple[bool, int, int, str]:
    """Return a sort key of a kept folder that is larger for newer folders.

    ``newest``, the folder that ``keep`` just wrote, gets the largest key even
    when the clock stepped back. The others go by mtime, then by the sequence
    number of their checkpoint, then by name. The sequence number rises across
    model changes because the daemon numbers the generations of every model in
    one folder. It starts again at 1 only after the daemon moved aside the
    checkpoints that it could not load.
    """
    generations = list_checkpoints(folder)
    sequence = generations[0][0] if generations else 0
    return (folder == newest, folder.stat().st_mtime_ns, sequence, folder.name)


@dataclass(frozen=True)
class CarryOver:
    """Weights for a new student and which of them came from the old one."""

    weights: dict[str, np.ndarray]
    carried: tuple[str, ...]
    reset: tuple[str, ...]


def carry_over_weights(
    old: dict[str, np.ndarray], new: dict[str, np.ndarray]
) -> CarryOver:
    """Take each old weight whose name and shape match the new student's.

    Weights that are new, renamed or reshaped keep the new bundle's values.
    """
    weights: dict[str, np.ndarray] = {}
    carried, reset = [], []
    for name, initial in new.items():
        previous = old.get(name)
        if previous is not None and previous.shape == initial.shape:
            weights[name] = previous
            carried.append(name)
        else:
            weights[name] = initial
            reset.append(name)
    return CarryOver(weights, tuple(carried), tuple(reset))


def check_student_health(student: Student, samples: np.ndarray | None = None) -> None:
    """Run the student on probe inputs and check its outputs and weights.

    A multi-head student is checked on every head's probabilities. The
    bundle's ``probe.npz`` is not used here. The daemon checks the running
    student's probe accuracy before the switch when it has unsaved updates,
    and measures the new student's as its baseline
    (``dslo_edge.daemon_model_switch``).

    Args:
        student: the loaded student.
        samples: inputs to run; a fixed random batch of 4 by default.

    Raises:
        OtaError: ``health_check`` when outputs (of any head) have the wrong
            shape, are not finite, or rows do not sum to 1, when a head is
            missing, or when a weight is not finite.
    """
    bundle = student.bundle
    if samples is None:
        rng = np.random.default_rng(0)
        samples = rng.normal(size=(4, *bundle.input_shape)).astype(np.float32)
    outputs = student.infer(samples)
    if bundle.is_multi_head:
        _check_head_outputs(outputs, bundle.heads, len(samples))
    else:
        expected = (len(samples), bundle.class_count)
        _check_probabilities(np.asarray(outputs), expected, "student output")
    for name, value in student.get_weights().items():
        if not np.all(np.isfinite(value)):
            raise OtaError("health_check", f"weight {name} contains NaN or infinity")


def _check_head_outputs(outputs: Any, heads: dict[str, int], samples: int) -> None:
    names = list(outputs) if isinstance(outputs, Mapping) else []
    if sorted(names) != sorted(heads):
        raise OtaError(
            "health_check",
            f"student outputs the heads {names}, expected {list(heads)}",
        )
    for name, classes in heads.items():
        probabilities = np.asarray(outputs[name])
        _check_probabilities(probabilities, (samples, classes), f"head {name!r} output")


def _check_probabilities(
    probabilities: np.ndarray, expected: tuple[int, int], label: str
) -> None:
    if probabilities.shape != expected:
        raise OtaError(
            "health_check",
            f"{label} shape {probabilities.shape}, expected {expected}",
        )
    if not np.all(np.isfinite(probabilities)):
        raise OtaError("health_check", f"{label} contains NaN or infinity")
    sums = probabilities.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-3):
        raise OtaError(
            "health_check",
            f"{label} probabilities sum to {sums.min():.4f}..{sums.max():.4f}, "
            "expected 1",
        )


@dataclass(frozen=True)
class NewStudent:
    """The student of a received release, with weights carried over."""

    student: Student
    bundle: Bundle
    carried: tuple[str, ...]
    reset: tuple[str, ...]


def load_new_student(
    release: Path, current: Student, load_student: Callable[[Bundle], Student]
) -> NewStudent:
    """Load a release's student and copy matching weights from ``current``.

    Nothing on disk changes and ``current`` is not modified.

    Raises:
        BundleError: the release is not a valid bundle.
        ValueError: the student cannot take the carried weights.
    """
    bundle = load_bundle(release)
    student = load_student(bundle)
    carry = carry_over_weights(current.get_weights(), student.get_weights())
    student.set_weights(carry.weights)
    return NewStudent(student, bundle, carry.carried, carry.reset)


@dataclass(frozen=True)
class SwapResult:
    """The student now in use and what the swap did."""

    student: Student
    swapped: bool
    release: Path | None
    carried: tuple[str, ...] = ()
    reset: tuple[str, ...] = ()
    reason: str | None = None


def swap_student(
    store: BundleStore,
    release: Path,
    current: Student,
    load_student: Callable[[Bundle], Student],
    *,
    health_check: Callable[[Student], None] = check_student_health,
) -> SwapResult:
    """Switch to a new release, carrying weights over, or keep the current one.

    Steps: load the new student, copy matching weights from ``current``, run
    the health check, and activate the release only if the check passes. A
    failure leaves the ``active`` link as it was. ``current`` is never
    modified.

    Returns:
        The new student with ``swapped=True``, or ``current`` with the reason
        and the release that stays active (None for the factory bundle).
    """
    try:
        new = load_new_student(release, current, load_student)
    except (BundleError, ValueError) as error:
        logger.warning("Model update %s cannot be loaded: %s", release.name, error)
        return SwapResult(current, False, None, reason=str(error))

    try:
        health_check(new.student)
    except OtaError as error:
        active = store.active_release()
        logger.warning(
            "Model update %s failed its health check (%s); keeping %s",
            release.name,
            error,
            active.name if active else "the factory bundle",
        )
        return SwapResult(current, False, active, reason=str(error))
    store.activate(release)
    logger.info(
        "Switched to model %s: %d weights carried over, %d reset",
        release.name,
        len(new.carried),
        len(new.reset),
    )
    return SwapResult(new.student, True, release, new.carried, new.reset)
