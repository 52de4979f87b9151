"""The staging folder of ``dslo-edge report`` and the move of its plots.

``write_report`` saves the plots into a hidden staging folder next to the
report folder and renames them into the report folder only when all are
written, with SIGINT and SIGTERM deferred. So a failed or interrupted run
leaves the earlier plots as they were, and a finished one replaces all of
them. The staging folder goes into the report folder itself when its parent
is on another file system or cannot be written, as for ``--out`` at a mount
point or ``--out ~`` when only root can write to /home. Its name contains
its writer, as in ``dslo_edge.eval_staging``, so a later report deletes
those of killed writers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dslo_edge.errors import OutputPathError
from dslo_edge.eval_staging import (
    foreign_entry_reason,
    owned_entries,
    owned_prefix,
    remove_dead_writers,
)
from dslo_edge.signal_deferral import signals_deferred

STAGING_PREFIX = ".report-new-"
PLOT_NAMES = ("latency.png", "training.png", "energy.png")


def make_staging_dir(folder: Path) -> Path:
    """Create the hidden folder that receives the plots before they move to ``folder``.

    ``folder`` must exist. Stale staging folders of killed writers are
    deleted first.

    Raises:
        OutputPathError: neither the parent of ``folder`` nor ``folder``
            can contain a new directory.
    """
    target = folder.resolve()
    places = _staging_places(target)
    for place in places:
        remove_stale_staging(place)
    failure: OSError | None = None
    for place in places:
        try:
            return Path(
                tempfile.mkdtemp(prefix=owned_prefix(STAGING_PREFIX), dir=place)
            )
        except OSError as error:
            failure = error
    raise OutputPathError(
        f"cannot create a staging folder for the report in {target}: "
        f"{failure}; choose another --out"
    )


def _staging_places(target: Path) -> list[Path]:
    """Return the folders to try for the staging folder, the preferred first.

    A rename works only within one file system, so the parent is left out
    when ``target`` is a mount point.
    """
    parent = target.parent
    if parent != target and os.stat(parent).st_dev == os.stat(target).st_dev:
        return [parent, target]
    return [target]


def remove_stale_staging(place: Path) -> None:
    """Delete the staging folders in ``place`` whose writers no longer run."""
    leftovers = owned_entries(place, STAGING_PREFIX, "")
    remove_dead_writers(leftovers, "dslo-edge report", place, _not_staging_reason)


def _not_staging_reason(path: Path) -> str | None:
    """Return why ``path`` is not a staging folder of report, or None."""
    return foreign_entry_reason(path, _is_plot, "report")


def _is_plot(entry: Path) -> bool:
    return entry.name in PLOT_NAMES and entry.is_file() and not entry.is_symlink()


def move_into_place(staged: Sequence[Path], folder: Path) -> list[Path]:
    """Rename each of the ``staged`` files into ``folder`` and return the new paths.

    Raises:
        OutputPathError: a directory is in the way of a plot, or a rename
            failed.
    """
    targets = [folder / path.name for path in staged]
    for target in targets:
        if target.is_dir():
            raise OutputPathError(
                f"cannot write the plot {target}: it is a directory; move it "
                "away or choose another --out"
            )
    # NOTE: a rename that fails after the check, for example on a file of
    # another user in a sticky directory, leaves the plots renamed before
    # it. Only SIGINT and SIGTERM are held back, so SIGKILL can still cut
    # the renames short.
    with signals_deferred():
        for path, target in zip(staged, targets, strict=True):
            try:
                os.replace(path, target)
            except OSError as error:
                raise OutputPathError(
                    f"cannot write the plot {target}: {error.strerror or error}; "
                    "choose another --out"
                ) from error
    return targets
