"""Checks of command-line values that several commands share."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """A ``click.FloatRange`` that also rejects nan and infinity.

    ``FloatRange`` accepts nan, because every comparison with nan is false,
    and infinity when the range has no maximum.
    """

    name = "finite float range"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            # Worded as FloatRange's own message for a value out of range.
            self.fail(
                f"{number} is not a finite number in the range "
                f"{self._describe_range()}."
            )
        return number


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


def model_file_path(
    _context: click.Context, parameter: click.Parameter, value: str | None
) -> str | None:
    """Reject a directory given as a Keras model file, naming the formats."""
    if value is None or not Path(value).is_dir():
        return value
    expected = "a .keras file written by model.save(), or a legacy .h5 file"
    if (Path(value) / "saved_model.pb").is_file():
        raise click.BadParameter(
            f"{value} is a TensorFlow SavedModel directory, expected {expected}. "
            "Keras 3 cannot load a SavedModel as a model, so save the Keras "
            'model with model.save("model.keras") and pass that file',
            param_hint=parameter.opts[0],
        )
    raise click.BadParameter(
        f"{value} is a directory, expected {expected}",
        param_hint=parameter.opts[0],
    )


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
