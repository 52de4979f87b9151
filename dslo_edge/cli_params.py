"""Checks of command-line values that several commands share."""

from __future__ import annotations

import click


def file_path_only(
    _context: click.Context, _parameter: click.Parameter, value: str | None
) -> str | None:
    """Reject a path that ends in "/", which names a folder, not a file.

    ``Path()`` drops the slash, so the file would be written under the
    folder's name.
    """
    if value is not None and value.endswith("/"):
        raise click.BadParameter(
            f"expected a file path, got the folder {value!r}; add a file name "
            "after the slash"
        )
    return value


def non_empty_path(
    _context: click.Context, parameter: click.Parameter, value: str | None
) -> str | None:
    """Reject an empty path, which Path() reads as the current directory.

    An empty value usually comes from an unset shell variable, as in
    ``--out "$OUT"``.
    """
    if value == "":
        raise click.BadParameter(
            f"expected a path, got an empty value; write {parameter.opts[0]} . "
            "for the current directory"
        )
    return value
