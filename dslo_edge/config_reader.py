"""Typed access to TOML tables, with errors that name the file and key."""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dslo_edge.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10 devices
    import tomli as tomllib


def read_toml(source: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; ``what`` names it in errors ("config", "hub config").

    Raises:
        ConfigError: the file is missing, unreadable or not TOML.
    """
    try:
        # utf-8-sig drops the byte-order mark that some Windows editors add.
        return tomllib.loads(source.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as error:
        raise ConfigError(
            f"{what} file not found: {source}; check the path, because a relative "
            "path is read from the current directory"
        ) from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"cannot read {source}: it is not UTF-8 text ({error.reason} at byte "
            f"{error.start}); save the file as UTF-8"
        ) from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(
            f"cannot read {source}: {error}; {toml_fix(str(error))}"
        ) from error
    except OSError as error:
        raise ConfigError(f"cannot read {source}: {error}") from error


def toml_fix(message: str) -> str:
    """Return what to do about a TOML syntax error, from tomllib's message."""
    if message.startswith("Cannot overwrite a value"):
        return "a key is given twice there, so keep only one of them"
    if message.startswith("Cannot declare"):
        return "a table is given twice, so merge its keys into one table"
    return "correct the TOML syntax at that line"


class TableReader:
    """Typed access to one TOML table with errors that name file and key."""

    def __init__(
        self,
        source: Path,
        table: dict[str, Any],
        path: str,
        parent: tuple[TableReader, str] | None = None,
    ):
        self.source = source
        self.table = table
        self.path = path
        # The reader of the enclosing table and this table's key in it, so
        # that a missing key can name a misspelt table header.
        self.parent = parent
        self.used: set[str] = set()
        # Keys that the table accepts but that are read later, declared so
        # that a missing key's misspelling hint does not name them.
        self.declared: set[str] = set()
        # Keys read as tables or arrays of tables, which an unknown table's
        # name is compared with.
        self.table_keys: set[str] = set()

    def fail(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(
            f"{self.source}: {self.path}{key} = {_shown(value)} is invalid; "
            f"expected {expected}"
        )

    def get(
        self,
        key: str,
        kind: type,
        default: Any,
        check: Callable[[Any], bool] | None = None,
        expected: str = "",
    ) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is REQUIRED:
                raise ConfigError(
                    f"{self.source}: missing required key {self.path}{key}"
                    f"{self._misspelling_hint(key) or self._table_hint()}"
                )
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        wrong_type = not isinstance(value, kind) or (
            kind in (int, float) and isinstance(value, bool)
        )
        if wrong_type:
            raise self.fail(key, value, _expected_kind(key, value, kind, expected))
        if kind is float and not math.isfinite(value):
            raise self.fail(key, value, expected or _type_name(kind))
        if check is not None and not check(value):
            raise self.fail(key, value, expected)
        return value

    def declare(self, *keys: str) -> None:
        """Name every key the table accepts, before a required one is read."""
        self.declared.update(keys)

    def _misspelling_hint(self, key: str) -> str:
        """Return a hint naming an unknown key of this table that looks like ``key``."""
        close = self._unknown_like(key, tables_only=False)
        if close is None:
            return ""
        return f"; found {self.path}{close}, which may be a misspelling of {key}"

    def _table_hint(self) -> str:
        """Return a hint naming an unknown table that looks like this absent one."""
        if self.parent is None:
            return ""
        parent, name = self.parent
        if name in parent.table:
            return ""
        close = parent._unknown_like(name, tables_only=True)
        if close is None:
            return ""
        return (
            f"; found the unknown table {parent.path}{close}, which may be a "
            f"misspelling of {parent.path}{name}"
        )

    def _unknown_like(self, key: str, tables_only: bool) -> str | None:
        """Return the unread key of this table that looks most like ``key``."""
        known = self.used | self.declared
        others = [
            name
            for name, value in self.table.items()
            if name not in known and (isinstance(value, dict) or not tables_only)
        ]
        close = difflib.get_close_matches(key, others, n=1, cutoff=0.6)
        return close[0] if close else None

    def file(self, key: str) -> Path | None:
        """Return an optional file path, resolved against the config's folder."""
        value = self.get(key, str, "")
        if not value:
            return None
        path = self.source.parent / value
        if not path.is_file():
            raise self.fail(key, value, "an existing file (relative to the config)")
        return path

    def path_value(self, key: str, default: Any, must_exist: bool = False) -> Any:
        """Return a path relative to the config's folder, or ``default`` if unset."""
        value = self.get(key, str, default, bool, "a non-empty path")
        if value is None:
            return None
        path = self.source.parent / value
        if must_exist and not path.exists():
            raise self.fail(key, value, "an existing path (relative to the config)")
        return path

    def tables(self, key: str) -> list[TableReader]:
        """Return the readers of an array of tables such as ``[[push]]``."""
        self.used.add(key)
        self.table_keys.add(key)
        value = self.table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(key, value, "an array of tables ([[push]])")
        return [
            TableReader(self.source, item, f"{self.path}{key}[{index}].")
            for index, item in enumerate(value)
        ]

    def section(self, key: str) -> TableReader:
        self.used.add(key)
        self.table_keys.add(key)
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, value, "a table")
        return TableReader(self.source, value, f"{self.path}{key}.", (self, key))

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise ConfigError(
                f"{self.source}: unknown key {self.path}{unknown[0]}"
                f"{self._known_key_hint(unknown[0])}; known keys here: {known}"
            )

    def _known_key_hint(self, key: str) -> str:
        """Return a hint naming the known key of the same kind that ``key`` resembles.

        An unknown table is compared with the known tables and an unknown value
        with the known values, so a value such as ``privcy = 1`` is not taken
        for a misspelt ``[privacy]`` table.
        """
        value = self.table[key]
        is_table = isinstance(value, dict) or (
            isinstance(value, list)
            and bool(value)
            and all(isinstance(item, dict) for item in value)
        )
        same_kind = self.table_keys if is_table else self.used - self.table_keys
        close = difflib.get_close_matches(key, sorted(same_kind), n=1, cutoff=0.6)
        if not close:
            return ""
        return f", which may be a misspelling of {self.path}{close[0]}"


# The TOML names of the types that ``TableReader.get`` reads.
_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a finite number",
    bool: "true or false",
    list: "an array",
}


def _type_name(kind: type) -> str:
    return _TYPE_NAMES.get(kind, f"a {kind.__name__}")


def _expected_kind(key: str, value: Any, kind: type, expected: str) -> str:
    """Return the TOML type that ``key`` needs, followed by ``expected`` if set.

    A number in quotes, such as ``port = "1883"``, looks valid beside a range
    alone, so the message names the type and how to write the value.
    """
    text = f"{_type_name(kind)} ({expected})" if expected else _type_name(kind)
    if isinstance(value, str) and kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            return text
        if not math.isfinite(number):
            return text
        # The parsed number, because TOML rejects some text that int() and
        # float() accept, such as the leading zero of "0883".
        text += f"; write it without quotes, as {key} = {number}"
    return text


def _shown(value: Any) -> str:
    """Return a value for an error message, with booleans as TOML writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


# Default that marks a key as required.
REQUIRED = object()


def positive(value: float) -> bool:
    return value > 0
