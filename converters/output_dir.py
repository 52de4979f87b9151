"""The bundle output directory: checks before conversion, then a swap.

``convert_bundle`` writes a new bundle into a hidden staging directory next
to the output path and moves it into place only when every file is written,
so a failed conversion leaves an earlier bundle untouched. With
``overwrite`` it replaces only a directory that contains a bundle and
nothing else, never a directory of other files. The staging directory's
name contains the host name, process id and PID namespace of its writer, as
in ``dslo_edge.eval_staging``, so that a later conversion into the same
parent deletes those of killed writers.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from pathlib import Path

from dslo_edge.bundle import MANIFEST_NAME, load_bundle
from dslo_edge.errors import BundleError, ConversionError, OutputPathError
from dslo_edge.eval_staging import (
    foreign_entry_reason,
    owned_entries,
    owned_prefix,
    remove_dead_writers,
)
from dslo_edge.health import PROBE_FILE, SingleLabelProbeError, check_bundle_probe
from dslo_edge.signal_deferral import signals_deferred

STUDENT_FILE = "student.tflite"
TEACHER_FILE = "teacher.tflite"
STUDENT_INT8_FILE = "student-int8.tflite"
# The probe set is not written by convert, but it belongs in a bundle
# (docs/configuration.md, [health]), so an overwrite carries it over.
BUNDLE_FILES = (
    MANIFEST_NAME,
    STUDENT_FILE,
    TEACHER_FILE,
    STUDENT_INT8_FILE,
    PROBE_FILE,
)
STAGING_PREFIX = ".bundle-"
# The new bundle while it is written, and the earlier one during a swap.
NEW_PREFIX = f"{STAGING_PREFIX}new-"
BACKUP_PREFIX = f"{STAGING_PREFIX}old-"
# The SavedModel that export.to_tflite writes for the LiteRT converter, in
# the staging directory while convert runs.
SAVED_MODEL_PREFIX = "dslo-convert-"

logger = logging.getLogger(__name__)


def prepare_output_dir(
    out: Path, *, overwrite: bool, overwrite_hint: str = "overwrite=True"
) -> None:
    """Check that ``out`` can receive a bundle and create its parent directories.

    Args:
        out: the bundle directory to write.
        overwrite: whether an existing bundle in ``out`` may be replaced.
        overwrite_hint: how the caller spells the overwrite switch in error
            messages, such as ``--overwrite`` on the command line.

    Raises:
        ConversionError: ``out`` is a non-empty directory without
            ``overwrite``, or a directory that is not a bundle.
        OutputPathError: ``out`` is a file, or its parent cannot be created
            or written to.
    """
    check_output_dir(out, overwrite=overwrite, overwrite_hint=overwrite_hint)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputPathError(
            f"{parent} is a file, not a directory; choose another output path"
        ) from None
    except OSError as error:
        raise OutputPathError(
            f"cannot create directory {parent} for the bundle {out}: "
            f"{error.strerror or error}; choose an output path whose parent "
            "is a directory or can be created"
        ) from error
    remove_stale_staging(out)
    # The staging directory goes into the parent, after the slow model
    # loading, so a parent that rejects it is found now.
    make_staging_dir(out).rmdir()


def check_output_dir(
    out: Path, *, overwrite: bool, overwrite_hint: str = "overwrite=True"
) -> None:
    """Raise ConversionError unless ``out`` is missing, empty or a bundle to replace.

    A file at ``out`` raises OutputPathError.
    """
    if out.exists() and not out.is_dir():
        raise OutputPathError(
            f"output path {out} is a file; choose a directory path for the bundle"
        )
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConversionError(
            f"output directory {out} exists and is not empty; choose another "
            f"path or, if it contains a bundle, pass {overwrite_hint} to replace it"
        )
    problem = _not_bundle_reason(out)
    if problem:
        raise ConversionError(
            f"output directory {out} is not a bundle: {problem}. "
            f"{overwrite_hint} replaces only a directory written by convert, so "
            "nothing was removed; choose a new or empty directory"
        )


def _not_bundle_reason(folder: Path) -> str | None:
    names = sorted(entry.name for entry in folder.iterdir())
    others = [name for name in names if name not in BUNDLE_FILES]
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        return f"it contains {listed}, which convert does not write"
    if MANIFEST_NAME not in names:
        return f"it has no {MANIFEST_NAME}"
    return None


def remove_stale_staging(out: Path) -> None:
    """Delete the staging directories that killed conversions left next to ``out``.

    Only a directory of bundle files and ``SAVED_MODEL_PREFIX`` folders
    whose name contains a writer that no longer runs on this host is
    deleted. Any other entry, and the backup of an earlier bundle, stays.
    """
    # NOTE: a conversion killed during the swap leaves a .bundle-old-*
    # backup, which can contain the only copy of the earlier bundle, so
    # backups are never deleted here.
    target = out.resolve()
    parent = target.parent
    leftovers = [
        (path, owner)
        for path, owner in owned_entries(parent, NEW_PREFIX, "")
        if path != target
    ]
    remove_dead_writers(leftovers, "dslo-edge convert", parent, _not_staging_reason)


def _not_staging_reason(path: Path) -> str | None:
    """Return why ``path`` is not a staging directory of convert, or None."""
    return foreign_entry_reason(path, _is_bundle_entry, "convert")


def _is_bundle_entry(entry: Path) -> bool:
    if entry.is_symlink():
        return False
    if entry.name in BUNDLE_FILES and entry.is_file():
        return True
    return entry.name.startswith(SAVED_MODEL_PREFIX) and entry.is_dir()


def make_staging_dir(out: Path) -> Path:
    """Create the hidden directory, next to ``out``, that receives the new files.

    It is on the same file system as ``out``, so the final move is a rename.
    """
    parent = out.resolve().parent
    try:
        return _make_unique_dir(parent, owned_prefix(NEW_PREFIX))
    except OSError as error:
        raise OutputPathError(
            f"cannot write to {parent}: {error.strerror or error}; "
            "choose an output path in a writable directory"
        ) from error


def _make_unique_dir(parent: Path, prefix: str) -> Path:
    # Unlike tempfile.mkdtemp (mode 0700), mkdir applies the umask, so the
    # bundle gets the permissions of any other new directory and a service
    # running as another user can read it.
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"100 names starting with {prefix} exist in {parent}")


def move_into_place(
    staging: Path, out: Path, overwrite: bool, overwrite_hint: str = "overwrite=True"
) -> None:
    """Move the finished ``staging`` directory to ``out``.

    An earlier bundle is first renamed to a hidden sibling and deleted only
    after the new one is in place. When the second rename fails, the earlier
    bundle is renamed back. ``overwrite_hint`` is as in ``prepare_output_dir``.
    """
    # The directory may have changed while the models were converting.
    check_output_dir(out, overwrite=overwrite, overwrite_hint=overwrite_hint)
    target = out.resolve()
    try:
        _carry_probe(target, staging)
        _swap(staging, target)
    except OSError as error:
        raise ConversionError(
            f"cannot move the new bundle from {staging} to {out}: "
            f"{error.strerror or error}; an earlier bundle there is unchanged"
        ) from error


def _carry_probe(target: Path, staging: Path) -> None:
    """Copy the earlier bundle's probe set into the new bundle."""
    probe = target / PROBE_FILE
    if not probe.is_file() or (staging / PROBE_FILE).exists():
        return
    shutil.copy2(probe, staging / PROBE_FILE)
    try:
        check_bundle_probe(load_bundle(staging))
    except SingleLabelProbeError as error:
        logger.warning(
            "Kept %s from the earlier bundle in %s, but it has one y for a "
            "student with several heads: %s. The daemon checks the weights "
            "without it, and flash and ota-send reject the bundle",
            PROBE_FILE,
            target,
            error,
        )
        return
    except BundleError as error:
        # Kept anyway, because the earlier bundle and its copy are deleted.
        logger.warning(
            "Kept %s from the earlier bundle in %s, but it does not fit the new "
            "student: %s. Replace it with one for the new inputs and classes or "
            "delete it, because the daemon does not start with it",
            PROBE_FILE,
            target,
            error,
        )
        return
    logger.info(
        "Kept %s from the earlier bundle in %s; replace it if the classes "
        "or inputs changed",
        PROBE_FILE,
        target,
    )


def _swap(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    # NOTE: two renames, so the target is missing for the moment between
    # them. Linux renameat2(RENAME_EXCHANGE) would close that gap, but
    # Python's os module (checked on 3.11) has no call for it.
    backup = Path(tempfile.mkdtemp(prefix=BACKUP_PREFIX, dir=target.parent))
    # An exception raised by a signal handler between the renames, such as
    # KeyboardInterrupt, would leave no bundle at target and the earlier
    # one under the hidden backup name, so the signals wait for the swap.
    with signals_deferred():
        try:
            target.rename(backup)  # replaces the empty backup directory
        except OSError:
            backup.rmdir()
            raise
        try:
            staging.rename(target)
        except OSError:
            _restore(backup, target)
            raise
        try:
            shutil.rmtree(backup)
        except OSError as error:
            logger.warning("Could not delete the replaced bundle %s: %s", backup, error)


def _restore(backup: Path, target: Path) -> None:
    try:
        backup.rename(target)
    except OSError as error:
        raise ConversionError(
            f"cannot move the earlier bundle back from {backup} to {target}: "
            f"{error.strerror or error}; move it back by hand"
        ) from error
