"""Install a bundle, its device config and a systemd unit onto a device root.

The target is a mounted root filesystem of the device (or any directory). The
installed layout, with paths as the device sees them::

    /opt/dslo-edge/releases/<id>/       the bundle files, one directory per bundle
    /opt/dslo-edge/bundle -> releases/<id>
    /opt/dslo-edge/installed.json       every installed file with its sha256
    /etc/dslo-edge/device.toml
    /etc/dslo-edge/profiles/<name>.toml  a firmware profile dslo-edge does not ship
    /etc/systemd/system/dslo-edge.service
    /etc/systemd/system/multi-user.target.wants/dslo-edge.service (link to the unit)
    /var/lib/dslo-edge/                 the daemon's state directory

A release directory is staged under a temporary name and renamed into place,
and the ``bundle`` link, config, unit and file list are each replaced with one
rename, so an interrupted run leaves the previous installation usable and a
second run completes it. Files whose content is already right are not
rewritten, so running it again with the same inputs changes nothing.

The file list also records the sha256 of the config and unit that flash
generated. An existing ``device.toml`` that is still what an earlier flash
generated is replaced. One that differs, for example one edited by hand, is
kept, and the generated text goes to ``device.toml.new`` beside it, after an
edited ``device.toml.new`` is copied to ``device.toml.new.bak``. A caller can
instead replace the file, which first copies it to ``device.toml.bak``.
A unit file that differs from both the generated one and the one an earlier
flash generated is replaced, after copying it to ``dslo-edge.service.bak``:
local changes to a unit belong in a drop-in file, which flash leaves alone.
A profile copy under ``/etc/dslo-edge/profiles`` that differs from the file
an earlier flash installed is copied to ``<name>.toml.bak`` the same way.
"""

from __future__ import annotations

import errno
import filecmp
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from dslo_edge import __version__
from dslo_edge.bundle import Bundle, load_bundle, sha256_file
from dslo_edge.checkpoint import fsync_directory
from dslo_edge.errors import BundleError
from dslo_edge.fit import FitReport, check_bundle
from dslo_edge.flash_config import (
    FlashOptions,
    check_broker_host,
    check_broker_port,
    check_device_id,
    profile_reference,
    render_device_config,
)
from dslo_edge.footprint import MIB, directory_size
from dslo_edge.health import check_bundle_probe
from dslo_edge.models import check_student_file
from dslo_edge.profiles import FirmwareProfile
from dslo_edge.service import (
    DEFAULT_CONFIG,
    DEFAULT_STATE_DIR,
    UNIT_NAME,
    free_backup_path,
    render_unit,
)
from dslo_edge.swap import ACTIVE
from dslo_edge.swap import release_id as bundle_release_id

logger = logging.getLogger(__name__)

INSTALL_DIR = PurePosixPath("/opt/dslo-edge")
RELEASES_DIR = INSTALL_DIR / "releases"
BUNDLE_LINK = INSTALL_DIR / "bundle"
FILE_LIST = INSTALL_DIR / "installed.json"
UNIT_PATH = PurePosixPath("/etc/systemd/system") / UNIT_NAME
WANTS_LINK = PurePosixPath("/etc/systemd/system/multi-user.target.wants") / UNIT_NAME
# The generated config when an existing device.toml differs from it.
PENDING_CONFIG = DEFAULT_CONFIG.with_name(DEFAULT_CONFIG.name + ".new")
BACKUP_CONFIG = DEFAULT_CONFIG.with_name(DEFAULT_CONFIG.name + ".bak")
BACKUP_PENDING = PENDING_CONFIG.with_name(PENDING_CONFIG.name + ".bak")
# Its suffix .bak is no unit type, so systemd does not load the file.
BACKUP_UNIT = UNIT_PATH.with_name(UNIT_PATH.name + ".bak")
# The link to the over-the-air release that the daemon runs in place of
# device.bundle (swap.BundleStore and swap.ACTIVE).
OTA_ACTIVE_LINK = DEFAULT_STATE_DIR / "bundles" / ACTIVE
# Room left free beyond the files themselves, for directory entries and the
# file list, so the device's filesystem is not filled to the last block.
SPACE_MARGIN_BYTES = 1 * MIB
# Permission bits of the directories and files flash creates, whatever the
# umask of the user running flash. Every user can read them, so a unit that
# runs the daemon as another user than root (User= in a drop-in, or the unit
# of `dslo-edge service install --user`) can load the bundle and config.
DIR_MODE = 0o755
FILE_MODE = 0o644

DiskUsage = Callable[[str | Path], Any]


@dataclass
class FlashResult:
    """The outcome of one flash run.

    Attributes:
        release: the bundle's release id (see ``swap.release_id``).
        changed: device paths written in this run.
        unchanged: device paths that already had the right content.
        fit: the profile check the bundle passed.
        removed: device paths deleted in this run.
        warnings: what the user has to act on, such as a kept device config
            that needs merging.
    """

    target: Path
    release: str
    fit: FitReport
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def on_target(target: Path, device_path: PurePosixPath) -> Path:
    """Return where a device path lies under the target directory."""
    return target / str(device_path).lstrip("/")


def release_id(bundle: Bundle) -> str:
    """Return the bundle's release id, the same one an over-the-air update uses.

    It covers the manifest, which lists every model file's sha256, and
    ``probe.npz``.
    """
    return bundle_release_id(bundle.path)


def flash(
    bundle_path: str | Path,
    profile: FirmwareProfile,
    target: str | Path,
    options: FlashOptions,
    *,
    replace_config: bool = False,
    disk_usage: DiskUsage = shutil.disk_usage,
) -> FlashResult:
    """Install a bundle for a board onto a target root directory.

    Args:
        bundle_path: the bundle directory.
        profile: the board the target belongs to.
        target: the device's root filesystem, mounted, or any directory.
        options: values for the generated device config.
        replace_config: replace a device.toml that differs from the generated
            one, after copying it to device.toml.bak. False keeps it and
            writes the generated text to device.toml.new.
        disk_usage: ``shutil.disk_usage`` or a replacement for tests.

    Raises:
        ConfigError: an option makes the device config invalid, such as a
            device id that is not one MQTT topic level or a broker host with
            a quote.
        BundleError: the bundle or its probe.npz is invalid, the profile
            cannot run it, the target lacks free space, a path leads out of
            the target or through a symlink loop, or writing failed. Each
            file is replaced whole, but a failure can come after some of
            them, such as the ``bundle`` link, were replaced. The message
            then names them.
    """
    check_device_id(options.device_id)
    check_broker_host(options.broker_host)
    check_broker_port(options.broker_port)
    root = Path(target)
    if not root.is_dir():
        raise BundleError(f"target {root} is not a directory; mount the device first")
    _check_paths_inside_target(root, profile)
    bundle = load_bundle(bundle_path)
    # The daemon stops with exit status 78 on a probe set it cannot use, and
    # the unit does not restart it, so such a bundle must not be installed.
    check_bundle_probe(bundle)
    # The daemon also stops with exit status 78 on a manifest whose shapes
    # differ from the student's, such as a hand-edited input shape.
    _check_student_shapes(bundle)
    fit = check_bundle(bundle, profile, batch_size=options.batch_size)
    if not fit.fits:
        raise BundleError(
            f"profile {profile.name} cannot run {bundle.path}: "
            + "; ".join(fit.problems)
        )

    result = FlashResult(root, release_id(bundle), fit)
    profile_value, profile_copy = profile_reference(profile)
    files = {
        DEFAULT_CONFIG: render_device_config(
            options, BUNDLE_LINK, profile_value
        ).encode(),
        UNIT_PATH: render_unit().encode(),
    }
    if profile_copy is not None:
        files[PurePosixPath(profile_value)] = profile_copy
    _check_path_types(root, result.release, list(files))
    release_dir = on_target(root, RELEASES_DIR / result.release)
    release_needed = not _release_intact(release_dir, bundle)
    _check_free_space(root, bundle, release_needed, files, disk_usage)
    previous_release = _linked_release(root)

    try:
        _install_release(root, bundle, result, release_needed)
        for device_path, content in files.items():
            if device_path == DEFAULT_CONFIG:
                _install_config(root, content, result, replace_config)
            elif device_path == UNIT_PATH:
                _install_unit(root, content, result)
            else:
                _install_profile_copy(root, device_path, content, result)
        _link_if_changed(root, WANTS_LINK, PurePosixPath("..") / UNIT_NAME, result)
        _make_directories(on_target(root, DEFAULT_STATE_DIR))
        generated = {
            str(path): hashlib.sha256(files[path]).hexdigest()
            for path in (DEFAULT_CONFIG, UNIT_PATH)
        }
        file_list = _file_list(root, result, profile, list(files), generated)
        _write_if_changed(root, FILE_LIST, file_list, result)
    except OSError as error:
        raise BundleError(_install_failure(root, error, result)) from error
    _prune_releases(root, result.release, previous_release)
    _warn_of_active_release(root, result)
    logger.info(
        "Installed release %s for profile %s onto %s (%d paths changed)",
        result.release,
        profile.name,
        root,
        len(result.changed),
    )
    return result


def _check_student_shapes(bundle: Bundle) -> None:
    """Compare the student's tensor shapes with its manifest if it loads here.

    Raises:
        BundleError: a shape differs, with the message the daemon gives.
    """
    problem = check_student_file(bundle)
    if problem is not None:
        # NOTE: a student that this machine's interpreter cannot load is not
        # rejected, because the device may run another interpreter version.
        logger.warning(
            "Cannot load the student %s on this machine (%s), so its tensor "
            "shapes were not compared with the manifest; the daemon compares "
            "them at start",
            bundle.student_path,
            problem,
        )


def _warn_of_active_release(root: Path, result: FlashResult) -> None:
    """Warn when an over-the-air release on the target overrides the bundle.

    The daemon loads the release that ``bundles/active`` in its state
    directory names, once one was installed, and not ``device.bundle``.
    A link that is a symlink loop gets a warning too, because the daemon
    does not start while it is there.
    """
    link = on_target(root, OTA_ACTIVE_LINK)
    if not link.is_symlink():
        return
    try:
        os.stat(link)
    except OSError as error:
        # Path.resolve raises RuntimeError for a loop up to Python 3.12. A
        # dangling link names no release, so the daemon starts device.bundle.
        if error.errno == errno.ELOOP:
            result.warnings.append(
                f"{OTA_ACTIVE_LINK} on the target is a symlink loop, and the "
                "daemon does not start while it is there; remove that link on "
                "the target to run the flashed bundle"
            )
        return
    if not link.resolve().is_dir():
        return
    active = link.resolve().name
    if active == result.release:
        return
    result.warnings.append(
        f"the device runs the over-the-air release {active} that "
        f"{OTA_ACTIVE_LINK} points to, and not the bundle flashed now; send "
        f"this bundle with 'dslo-edge ota-send' instead, or remove that link "
        "on the target to run the flashed bundle"
    )


def _install_failure(root: Path, error: OSError, result: FlashResult) -> str:
    """Describe a failed install, naming the paths that it had already written."""
    if not result.changed:
        return (
            f"installing onto {root} failed: {error}; the previous installation "
            "is unchanged, so fix the cause and run flash again"
        )
    return (
        f"installing onto {root} failed: {error}, after writing "
        f"{', '.join(result.changed)}; fix the cause and run flash again to "
        "finish the installation"
    )


def _check_paths_inside_target(root: Path, profile: FirmwareProfile) -> None:
    """Raise BundleError if a path flash writes leads out of the target.

    A device image may contain absolute symlinks such as ``etc/dslo-edge ->
    /etc/dslo-edge``. Under the mount point they resolve on the machine that
    runs flash, so writing through them would change that machine's files.
    """
    profile_value, profile_copy = profile_reference(profile)
    device_paths = [
        RELEASES_DIR,
        FILE_LIST,
        DEFAULT_CONFIG,
        PENDING_CONFIG,
        UNIT_PATH,
        WANTS_LINK.parent,
        DEFAULT_STATE_DIR,
    ]
    if profile_copy is not None:
        device_paths.append(PurePosixPath(profile_value))
    real_root = root.resolve()
    for device_path in device_paths:
        path = on_target(root, device_path)
        _check_no_symlink_loop(root, path)
        resolved = path.resolve()
        if not resolved.is_relative_to(real_root):
            raise BundleError(
                f"{path} resolves to {resolved}, outside the target {root}, "
                "because of a symlink on its path; flash writes only inside "
                "the target, so replace that symlink with a relative one or a "
                "directory and run flash again"
            )


def _check_path_types(root: Path, release: str, installed: list[PurePosixPath]) -> None:
    """Raise BundleError if a file is where flash needs a directory, or the reverse.

    Checking before the first write keeps a failed run from replacing only
    some of the installed paths. ``installed`` are the files flash writes
    besides the file list.
    """
    directories = [RELEASES_DIR / release, DEFAULT_STATE_DIR]
    # Files, and the two links, which may point at a directory.
    files = [*installed, FILE_LIST, PENDING_CONFIG, BUNDLE_LINK, WANTS_LINK]
    for device_path in directories + [file.parent for file in files]:
        _check_directories(root, device_path)
    for device_path in files:
        path = on_target(root, device_path)
        if path.is_dir() and not path.is_symlink():
            raise BundleError(
                f"{path} is a directory, but flash writes {device_path} there "
                "as a file or symlink; move the directory away and run flash again"
            )


def _check_directories(root: Path, device_path: PurePosixPath) -> None:
    """Raise BundleError if a part of ``device_path`` on the target is no directory."""
    current = root
    for part in PurePosixPath(str(device_path).lstrip("/")).parts:
        current = current / part
        if current.is_dir():
            continue
        if current.exists() or current.is_symlink():
            raise BundleError(
                f"{current} is not a directory (a file, or a symlink to no "
                f"directory), but flash needs one there for {device_path}; move "
                "it away or fix the symlink, and run flash again"
            )
        return


def _check_no_symlink_loop(root: Path, path: Path) -> None:
    """Raise BundleError if a symlink loop lies on ``path`` under ``root``.

    ``Path.resolve`` raises RuntimeError for a loop up to Python 3.12 and
    returns a path through it from 3.13, so each component is checked with
    ``os.stat``, which fails with ELOOP on the first one that loops.
    """
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            os.stat(current)
        except OSError as error:
            if error.errno != errno.ELOOP:
                # A missing component is created later, and other errors
                # come up with their cause when flash writes there.
                return
            raise BundleError(
                f"{current} is a symlink loop: following it never reaches a "
                f"file or directory, so flash cannot write {path}; remove that "
                "symlink (flash creates what is missing) or point it at a path "
                "inside the target, and run flash again"
            ) from None


def _release_intact(release_dir: Path, bundle: Bundle) -> bool:
    if not release_dir.is_dir():
        return False
    try:
        load_bundle(release_dir)
    except BundleError:
        return False
    # The release id covers only the manifest and probe.npz, and _copy_bundle
    # copies every file, so any other file changed since then must count.
    source = _bundle_files(bundle.path)
    installed = _bundle_files(release_dir)
    if sorted(source) != sorted(installed):
        return False
    return all(
        filecmp.cmp(source[name], installed[name], shallow=False) for name in source
    )


def _bundle_files(folder: Path) -> dict[str, Path]:
    """Return the regular files directly in ``folder`` by name."""
    return {path.name: path for path in folder.iterdir() if path.is_file()}


def _check_free_space(
    root: Path,
    bundle: Bundle,
    release_needed: bool,
    files: dict[PurePosixPath, bytes],
    disk_usage: DiskUsage,
) -> None:
    needed = SPACE_MARGIN_BYTES + sum(len(content) for content in files.values())
    if release_needed:
        needed += directory_size(bundle.path)
    free = int(disk_usage(root).free)
    if free < needed:
        raise BundleError(
            f"not enough free space on {root}: the installation needs "
            f"{needed / MIB:.1f} MiB, the filesystem has {free / MIB:.1f} MiB free; "
            "free some space or use a larger storage device"
        )


def _install_release(
    root: Path, bundle: Bundle, result: FlashResult, needed: bool
) -> None:
    releases = on_target(root, RELEASES_DIR)
    final = releases / result.release
    device_release = str(RELEASES_DIR / result.release)
    if needed:
        _make_directories(releases)
        staging = Path(
            tempfile.mkdtemp(prefix=f".staging-{result.release}-", dir=releases)
        )
        try:
            _copy_bundle(bundle, staging)
            # mkdtemp creates the directory with mode 0700.
            os.chmod(staging, DIR_MODE)
            if final.exists():
                shutil.rmtree(final)  # a damaged earlier copy
            staging.rename(final)
            fsync_directory(releases)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        result.changed.append(device_release)
    elif _make_readable(final):
        result.changed.append(device_release)
    else:
        result.unchanged.append(device_release)
    _link_if_changed(
        root, BUNDLE_LINK, PurePosixPath("releases") / result.release, result
    )


def _copy_bundle(bundle: Bundle, staging: Path) -> None:
    """Copy the bundle's files, then check them against its manifest."""
    for source in sorted(bundle.path.iterdir()):
        if source.is_file():
            with (
                open(source, "rb") as reader,
                open(staging / source.name, "wb") as writer,
            ):
                os.fchmod(writer.fileno(), FILE_MODE)
                shutil.copyfileobj(reader, writer, 1 << 20)
                writer.flush()
                os.fsync(writer.fileno())
    load_bundle(staging)  # raises BundleError on a bad copy


def _make_readable(release: Path) -> bool:
    """Set DIR_MODE and FILE_MODE on an installed release; return True on a change.

    Earlier versions of flash left each release directory with mode 0700.
    """
    entries = [(release, DIR_MODE)]
    for path in release.iterdir():
        if path.is_file() and not path.is_symlink():
            entries.append((path, FILE_MODE))
    changed = False
    for path, mode in entries:
        if path.is_symlink() or stat.S_IMODE(path.stat().st_mode) == mode:
            continue
        os.chmod(path, mode)
        changed = True
    return changed


def _install_config(
    root: Path, content: bytes, result: FlashResult, replace: bool
) -> None:
    """Write device.toml, keeping an existing file that differs from ``content``."""
    path = on_target(root, DEFAULT_CONFIG)
    if not path.is_file() or path.read_bytes() == content:
        _write_if_changed(root, DEFAULT_CONFIG, content, result)
        _remove_pending_copy(root, content, result)
        return
    existing = path.read_bytes()
    mode = path.stat().st_mode & 0o7777
    if _generated_before(root, DEFAULT_CONFIG, existing):
        # The file was not edited since, so the generated config replaces it.
        _write_if_changed(root, DEFAULT_CONFIG, content, result, mode=mode)
        _remove_pending_copy(root, content, result)
        # A device.toml.new that was copied over device.toml is outdated now.
        _remove_pending_copy(root, existing, result)
        return
    if replace:
        backup = _backup_path(root, existing, BACKUP_CONFIG)
        _write_if_changed(root, backup, existing, result, mode=mode)
        _write_if_changed(root, DEFAULT_CONFIG, content, result, mode=mode)
        _remove_pending_copy(root, content, result)
        result.warnings.append(
            f"replaced {DEFAULT_CONFIG}; the previous file is kept as {backup}"
        )
        return
    _back_up_edited_pending(root, content, result)
    _write_if_changed(root, PENDING_CONFIG, content, result, mode=mode)
    result.unchanged.append(str(DEFAULT_CONFIG))
    result.warnings.append(
        f"kept {DEFAULT_CONFIG} because it differs from the generated config, "
        f"which is in {PENDING_CONFIG}: merge the two by hand, or run flash again "
        f"with --replace-config to install it and keep the old file as "
        f"{BACKUP_CONFIG}"
    )


def _install_unit(root: Path, content: bytes, result: FlashResult) -> None:
    """Write the unit file, first copying an existing one that differs."""
    path = on_target(root, UNIT_PATH)
    existing = path.read_bytes() if path.is_file() else content
    if existing != content and not _generated_before(root, UNIT_PATH, existing):
        backup = _backup_path(root, existing, BACKUP_UNIT)
        _write_if_changed(root, backup, existing, result)
        result.warnings.append(
            f"replaced {UNIT_PATH}, which differed from the generated unit; the "
            f"previous file is kept as {backup}. Put local settings in a drop-in "
            f"such as {UNIT_PATH}.d/local.conf, which flash does not change"
        )
    _write_if_changed(root, UNIT_PATH, content, result)


def _install_profile_copy(
    root: Path, device_path: PurePosixPath, content: bytes, result: FlashResult
) -> None:
    """Write the profile copy, first copying one that was edited on the device."""
    path = on_target(root, device_path)
    existing = path.read_bytes() if path.is_file() else content
    if existing != content and not _installed_before(root, device_path, existing):
        first = device_path.with_name(device_path.name + ".bak")
        backup = _backup_path(root, existing, first)
        _write_if_changed(root, backup, existing, result)
        result.warnings.append(
            f"replaced {device_path}, which differed from the profile file flash "
            f"installed; the previous file is kept as {backup}. Make changes in "
            "the file given to --profile, so the next flash keeps them"
        )
    _write_if_changed(root, device_path, content, result)


def _installed_before(root: Path, device_path: PurePosixPath, existing: bytes) -> bool:
    """Return whether ``existing`` is the file an earlier flash installed there."""
    try:
        document = json.loads(on_target(root, FILE_LIST).read_text())
        recorded = document["files"][str(device_path)]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return recorded == hashlib.sha256(existing).hexdigest()


def _generated_before(root: Path, device_path: PurePosixPath, existing: bytes) -> bool:
    """Return whether ``existing`` is the text an earlier flash generated there.

    A file list that is missing, unreadable or written by a version without
    the ``generated`` record counts as no, so the file is treated as edited.
    """
    try:
        document = json.loads(on_target(root, FILE_LIST).read_text())
        recorded = document["generated"][str(device_path)]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return recorded == hashlib.sha256(existing).hexdigest()


def _back_up_edited_pending(root: Path, content: bytes, result: FlashResult) -> None:
    """Copy a device.toml.new that was edited since flash wrote it to a backup.

    A user may merge the two configs in device.toml.new, which the caller is
    about to replace with ``content``.
    """
    pending = on_target(root, PENDING_CONFIG)
    if not pending.is_file():
        return
    existing = pending.read_bytes()
    if existing == content or _generated_before(root, DEFAULT_CONFIG, existing):
        return
    backup = _backup_path(root, existing, BACKUP_PENDING)
    mode = pending.stat().st_mode & 0o7777
    _write_if_changed(root, backup, existing, result, mode=mode)
    result.warnings.append(
        f"replaced {PENDING_CONFIG}, which differed from the config flash "
        f"generated before; the previous file is kept as {backup}"
    )


def _remove_pending_copy(root: Path, content: bytes, result: FlashResult) -> None:
    """Remove device.toml.new if its text is ``content``."""
    pending = on_target(root, PENDING_CONFIG)
    if pending.is_file() and pending.read_bytes() == content:
        pending.unlink()
        fsync_directory(pending.parent)
        result.removed.append(str(PENDING_CONFIG))


def _backup_path(root: Path, content: bytes, first: PurePosixPath) -> PurePosixPath:
    """Return the device path of ``free_backup_path`` for ``first`` on the target."""
    found = free_backup_path(on_target(root, first), content)
    return first.with_name(found.name)


def _write_if_changed(
    root: Path,
    device_path: PurePosixPath,
    content: bytes,
    result: FlashResult,
    *,
    mode: int | None = None,
) -> None:
    """Replace a file atomically unless it already has ``content``.

    ``mode`` sets the permission bits of a written file. None sets
    ``FILE_MODE``.
    """
    path = on_target(root, device_path)
    if path.is_file() and path.read_bytes() == content:
        result.unchanged.append(str(device_path))
        return
    _make_directories(path.parent)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as stream:
            os.fchmod(stream.fileno(), FILE_MODE if mode is None else mode)
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)
    result.changed.append(str(device_path))


def _link_if_changed(
    root: Path,
    device_path: PurePosixPath,
    link_target: PurePosixPath,
    result: FlashResult,
) -> None:
    path = on_target(root, device_path)
    if path.is_symlink() and os.readlink(path) == str(link_target):
        result.unchanged.append(str(device_path))
        return
    _make_directories(path.parent)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    os.symlink(link_target, temporary)
    os.replace(temporary, path)
    fsync_directory(path.parent)
    result.changed.append(str(device_path))


def _file_list(
    root: Path,
    result: FlashResult,
    profile: FirmwareProfile,
    installed: list[PurePosixPath],
    generated: dict[str, str],
) -> bytes:
    """Return the JSON list of installed files with sizes and sha256 digests.

    ``generated`` maps the config and unit paths to the sha256 of the text
    flash generated for them, which an edited file no longer matches.
    """
    entries = {}
    tracked = [RELEASES_DIR / result.release, *installed]
    for device_path in tracked:
        path = on_target(root, device_path)
        paths = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in paths:
            if file.is_file():
                key = "/" + str(file.relative_to(root))
                entries[key] = {
                    "bytes": file.stat().st_size,
                    "sha256": sha256_file(file),
                }
    document = {
        "installed_by": f"dslo-edge {__version__}",
        "profile": profile.name,
        "release": result.release,
        "bundle_link": str(BUNDLE_LINK),
        "files": entries,
        "generated": generated,
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def _linked_release(root: Path) -> str | None:
    """Return the release that the ``bundle`` link names, or None without one."""
    try:
        target = PurePosixPath(os.readlink(on_target(root, BUNDLE_LINK)))
    except OSError:
        return None
    if target.parent != PurePosixPath("releases"):
        return None
    return target.name


def _prune_releases(root: Path, current: str, previous: str | None) -> None:
    """Remove releases other than the current one and one older release.

    The older release that stays, so an operator can point the link back, is
    ``previous``, the one the ``bundle`` link named before this run. Without
    it the newest by mtime stays, and of releases with equal mtimes the one
    whose name sorts last.
    """
    releases = on_target(root, RELEASES_DIR)
    older = [
        path
        for path in releases.iterdir()
        if path.is_dir() and path.name != current and not path.name.startswith(".")
    ]
    # NOTE: release names are content hashes, so the name only makes the
    # order total. It does not show which release is newer.
    older.sort(
        key=lambda path: (path.name == previous, path.stat().st_mtime_ns, path.name),
        reverse=True,
    )
    for path in older[1:]:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("Removed old release %s from %s", path.name, root)


def _make_directories(folder: Path) -> None:
    """Create ``folder`` and its missing parents with ``DIR_MODE``.

    Directories that exist keep their mode. A file on the path raises
    FileExistsError or NotADirectoryError.
    """
    missing = []
    current = folder
    while not current.is_dir():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        # mkdir applies the umask to its mode argument, chmod does not.
        os.chmod(path, DIR_MODE)


def verify_installation(target: str | Path) -> list[str]:
    """Return the installed files whose sha256 no longer matches the file list.

    Raises:
        BundleError: the target has no readable file list.
    """
    root = Path(target)
    path = on_target(root, FILE_LIST)
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BundleError(f"cannot read the file list {path}: {error}") from error
    mismatched = []
    for device_path, entry in sorted(document["files"].items()):
        file = on_target(root, PurePosixPath(device_path))
        if not file.is_file() or sha256_file(file) != entry["sha256"]:
            mismatched.append(device_path)
    return mismatched
