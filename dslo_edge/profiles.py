"""Firmware profiles: what a board offers, and whether a bundle fits it.

A profile is one TOML file per board in ``firmware_profiles/``. Loading
validates every key, and an error names the file, the key and the value.
``check_bundle`` compares a bundle's runtime estimates with the profile's RAM
and storage budget and looks for an interpreter wheel that the board's OS and
Python can install.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from dslo_edge.config_reader import toml_fix
from dslo_edge.errors import ConfigError
from dslo_edge.power.sources import POWER_FILE_UNITS, PowerModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10 devices
    import tomli as tomllib

PROFILES_ENV = "DSLO_EDGE_PROFILES"
# The top-level keys and tables of a profile file.
PROFILE_KEYS = (
    "name",
    "title",
    "board",
    "os",
    "budget",
    "power",
    "thermal",
    "sensors",
    "interpreters",
)
ARCHITECTURES = ("aarch64", "armv7l", "x86_64")
# dslo-edge's own requires-python in pyproject.toml.
DSLO_EDGE_PYTHON = SpecifierSet(">=3.10")


def default_profiles_dir() -> Path:
    """Return ``$DSLO_EDGE_PROFILES``, else the installed ``firmware_profiles``.

    The profiles ship as package data, so a wheel install has them too.
    """
    configured = os.environ.get(PROFILES_ENV)
    if configured:
        return Path(configured)
    import firmware_profiles

    return Path(firmware_profiles.__file__).resolve().parent


@dataclass(frozen=True)
class InterpreterWheel:
    """A LiteRT interpreter release with a wheel for the board's architecture.

    Attributes:
        package: PyPI name, ``ai-edge-litert`` or ``tflite-runtime``.
        version: the release.
        python: CPython versions that have a wheel, as a specifier.
        numpy: the numpy versions the interpreter works with, as a specifier.
        min_glibc: the glibc the wheel's manylinux tag requires.
    """

    package: str
    version: Version
    python: SpecifierSet
    numpy: SpecifierSet
    min_glibc: Version


@dataclass(frozen=True)
class FirmwareProfile:
    """One board with its OS image, budgets, power figures and sensors."""

    name: str
    source: Path
    title: str
    architecture: str
    cores: int
    ram_mb: int
    storage_mb: int
    os_name: str
    python: Version
    numpy: Version
    glibc: Version
    budget_ram_mb: int
    budget_storage_mb: int
    idle_watts: float
    active_watts: float
    battery_wh: float | None
    thermal_limit_c: float
    power_files: tuple[tuple[str, str], ...] = ()
    interpreters: tuple[InterpreterWheel, ...] = field(default_factory=tuple)

    def power_model(self) -> PowerModel:
        """Return the idle and active power figures as a CPU-time power model."""
        return PowerModel(self.name, self.idle_watts, self.active_watts, self.cores)


class _Table:
    """Typed reads from one TOML table, with errors naming file, key and value."""

    def __init__(self, source: Path, data: dict[str, Any], prefix: str = ""):
        self.source = source
        self.data = data
        self.prefix = prefix
        self.used: set[str] = set()

    def error(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(
            f"{self.source}: {self.prefix}{key} = {value!r} is invalid; "
            f"expected {expected}"
        )

    def value(
        self,
        key: str,
        kind: type | tuple[type, ...],
        expected: str,
        check: Callable[[Any], bool] | None = None,
        *,
        required: bool = True,
    ) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(
                    f"{self.source}: missing required key {self.prefix}{key} "
                    f"({expected}){self._misspelling_hint(key)}"
                )
            return None
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise self.error(key, value, expected)
        if check is not None and not check(value):
            raise self.error(key, value, expected)
        return value

    def _misspelling_hint(self, key: str) -> str:
        """Return a did-you-mean hint for an unread key that resembles ``key``."""
        # A cutoff of 0.8 matches core for cores, but not storage_mb for ram_mb.
        unread = sorted(set(self.data) - self.used)
        close = difflib.get_close_matches(key, unread, n=1, cutoff=0.8)
        if not close:
            return ""
        return f"; found {self.prefix}{close[0]}: did you mean {key}?"

    def parsed(self, key: str, parse: Callable[[str], Any], expected: str) -> Any:
        text = self.value(key, str, expected)
        try:
            return parse(text)
        except (InvalidVersion, InvalidSpecifier) as error:
            raise self.error(key, text, expected) from error

    def table(self, key: str) -> _Table:
        self.used.add(key)
        if key not in self.data:
            raise ConfigError(f"{self.source}: missing required table [{key}]")
        value = self.data[key]
        if not isinstance(value, dict):
            raise self.error(key, value, "a table")
        return _Table(self.source, value, f"{self.prefix}{key}.")

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if not unknown:
            return
        hint = ""
        if self.prefix and unknown[0] in PROFILE_KEYS:
            # TOML puts every key after a [table] header into that table.
            hint = (
                f"; {unknown[0]} is a top-level key, so write it above the first "
                "[table] header"
            )
        raise ConfigError(
            f"{self.source}: unknown key {self.prefix}{unknown[0]}; "
            f"known keys here: {', '.join(sorted(self.used))}{hint}"
        )


def _positive(value: float) -> bool:
    return 0 < value < math.inf


def load_profile_file(path: str | Path) -> FirmwareProfile:
    """Read and validate one profile file.

    Raises:
        ConfigError: the file is missing or not TOML, or a key is missing,
            unknown or invalid. The message names the file, key and value.
    """
    source = Path(path)
    try:
        data = tomllib.loads(source.read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"firmware profile not found: {source}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(
            f"cannot read firmware profile {source}: {error}; {toml_fix(str(error))}"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read firmware profile {source}: {error}") from error
    root = _Table(source, data)
    _reject_unknown_tables(source, data)
    name = root.value("name", str, f'"{source.stem}", the file name without .toml')
    if name != source.stem:
        raise root.error("name", name, f'"{source.stem}", the file name without .toml')
    title = root.value("title", str, "a board description", bool)
    board = _board(root.table("board"))
    os_fields = _os(root.table("os"))
    budget = _budget(root.table("budget"), board)
    power = _power(root.table("power"))
    thermal = root.table("thermal")
    limit = thermal.value(
        "limit_c", (int, float), "degrees Celsius in 30..120", lambda v: 30 <= v <= 120
    )
    thermal.reject_unknown()
    power_files = _sensors(root.table("sensors")) if "sensors" in data else ()
    interpreters = _interpreters(root, data.get("interpreters"))
    root.reject_unknown()
    return FirmwareProfile(
        name=name,
        source=source,
        title=title,
        **board,
        **os_fields,
        **budget,
        **power,
        thermal_limit_c=float(limit),
        power_files=power_files,
        interpreters=interpreters,
    )


def _reject_unknown_tables(source: Path, data: dict[str, Any]) -> None:
    """Raise for an unknown top-level key before a missing table is reported.

    A misspelt table such as ``[thermals]`` then reads as a typo, not as a
    missing ``[thermal]``.
    """
    unknown = sorted(set(data) - set(PROFILE_KEYS))
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], PROFILE_KEYS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(
        f"{source}: unknown key {unknown[0]}{hint}; known keys here: "
        f"{', '.join(sorted(PROFILE_KEYS))}"
    )


def _board(table: _Table) -> dict[str, Any]:
    fields = {
        "architecture": table.value(
            "architecture",
            str,
            f"one of {', '.join(ARCHITECTURES)} (uname -m)",
            lambda v: v in ARCHITECTURES,
        ),
        "cores": table.value("cores", int, "a positive core count", _positive),
        "ram_mb": table.value("ram_mb", int, "a positive size in MiB", _positive),
        "storage_mb": table.value(
            "storage_mb", int, "a positive size in MiB", _positive
        ),
    }
    table.reject_unknown()
    return fields


def _os(table: _Table) -> dict[str, Any]:
    fields = {
        "os_name": table.value("name", str, "the OS image name", bool),
        "python": table.parsed("python", Version, 'a Python version such as "3.11"'),
        "numpy": table.parsed("numpy", Version, 'a numpy version such as "1.24"'),
        "glibc": table.parsed("glibc", Version, 'a glibc version such as "2.36"'),
    }
    table.reject_unknown()
    return fields


def _budget(table: _Table, board: dict[str, Any]) -> dict[str, Any]:
    ram = table.value(
        "ram_mb",
        int,
        f"a positive size in MiB, at most the board's {board['ram_mb']} MiB",
        lambda v: 0 < v <= board["ram_mb"],
    )
    storage = table.value(
        "storage_mb",
        int,
        f"a positive size in MiB, at most the board's {board['storage_mb']} MiB",
        lambda v: 0 < v <= board["storage_mb"],
    )
    table.reject_unknown()
    return {"budget_ram_mb": ram, "budget_storage_mb": storage}


def _power(table: _Table) -> dict[str, Any]:
    idle = table.value("idle_watts", (int, float), "finite positive watts", _positive)
    active = table.value(
        "active_watts",
        (int, float),
        f"finite watts above idle_watts ({idle})",
        lambda v: idle < v < math.inf,
    )
    battery = table.value(
        "battery_wh",
        (int, float),
        "a finite positive capacity in Wh",
        _positive,
        required=False,
    )
    table.reject_unknown()
    return {
        "idle_watts": float(idle),
        "active_watts": float(active),
        "battery_wh": None if battery is None else float(battery),
    }


def _sensors(table: _Table) -> tuple[tuple[str, str], ...]:
    entries = table.value(
        "power_files", list, "a list of {path, unit} tables", required=False
    )
    files = []
    for index, entry in enumerate(entries or []):
        if not isinstance(entry, dict):
            raise table.error(f"power_files[{index}]", entry, "a {path, unit} table")
        item = _Table(table.source, entry, f"{table.prefix}power_files[{index}].")
        path = item.value("path", str, "an absolute path", lambda v: v.startswith("/"))
        unit = item.value(
            "unit",
            str,
            f"one of {', '.join(POWER_FILE_UNITS)}",
            lambda v: v in POWER_FILE_UNITS,
        )
        item.reject_unknown()
        files.append((path, unit))
    table.reject_unknown()
    return tuple(files)


def _interpreters(root: _Table, entries: Any) -> tuple[InterpreterWheel, ...]:
    root.used.add("interpreters")
    if entries is None:
        raise ConfigError(
            f"{root.source}: missing [[interpreters]] tables; list the LiteRT "
            "wheels that exist for this board, or write interpreters = [] above "
            "the first [table] header"
        )
    if not isinstance(entries, list):
        raise root.error("interpreters", entries, "a list of [[interpreters]] tables")
    wheels = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise root.error(f"interpreters[{index}]", entry, "a table")
        table = _Table(root.source, entry, f"interpreters[{index}].")
        wheels.append(
            InterpreterWheel(
                package=table.value(
                    "package",
                    str,
                    "ai-edge-litert or tflite-runtime",
                    lambda v: v in ("ai-edge-litert", "tflite-runtime"),
                ),
                version=table.parsed("version", Version, 'a version such as "2.3.0"'),
                python=table.parsed(
                    "python", SpecifierSet, 'a specifier such as ">=3.10"'
                ),
                numpy=table.parsed("numpy", SpecifierSet, 'a specifier such as "<2"'),
                min_glibc=table.parsed(
                    "min_glibc", Version, 'a version such as "2.27"'
                ),
            )
        )
        table.reject_unknown()
    return tuple(wheels)


def list_profiles(directory: str | Path | None = None) -> list[FirmwareProfile]:
    """Load every ``*.toml`` profile in a directory, sorted by name.

    Raises:
        ConfigError: the directory is missing or any profile is invalid.
    """
    folder = Path(directory) if directory else default_profiles_dir()
    _reject_file_as_directory(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"firmware profile directory not found: {folder}; pass --profiles-dir "
            f"or set {PROFILES_ENV}"
        )
    paths = sorted(folder.glob("*.toml"))
    if not paths:
        raise ConfigError(
            f"no firmware profiles (*.toml files) in {folder}; copy one from "
            f"firmware_profiles/ of the source tree there, or pass another "
            f"--profiles-dir"
        )
    return [load_profile_file(path) for path in paths]


def load_profile(name: str, directory: str | Path | None = None) -> FirmwareProfile:
    """Load a profile by name (file stem) or by path to a ``.toml`` file.

    Raises:
        ConfigError: no such profile, or the profile is invalid.
    """
    folder = Path(directory) if directory else default_profiles_dir()
    if name.endswith(".toml"):
        if not Path(name).exists():
            raise ConfigError(_missing_profile_file(Path(name), folder))
        return load_profile_file(name)
    _reject_file_as_directory(folder)
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = _known_profiles(folder)
        listed = ", ".join(known) or "none"
        if "/" in name or Path(name).is_file():
            # A path is only loaded as a file when it ends in .toml.
            raise ConfigError(
                f"firmware profile {name!r} is a path, but not to a .toml file; "
                f"give a profile file ending in .toml, or a profile name from "
                f"{folder}: {listed}"
            )
        closest = difflib.get_close_matches(name, known, n=1)
        hint = f", which may be a misspelling of {closest[0]}" if closest else ""
        raise ConfigError(
            f"firmware profile {name!r} not found in {folder}{hint}; "
            f"known profiles: {listed}"
        )
    return load_profile_file(path)


def _known_profiles(folder: Path) -> list[str]:
    """Return the profile names in ``folder``; empty if it is not a directory."""
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def _missing_profile_file(path: Path, folder: Path) -> str:
    """Return the error for a profile path ending in .toml that does not exist.

    A shipped profile's name with .toml added is a likely slip, so the
    message then names the profile to use instead.
    """
    known = _known_profiles(folder)
    message = f"firmware profile file {path} not found"
    if path.stem in known:
        return (
            f"{message}; to use the shipped profile, give its name "
            f"{path.stem!r} without .toml"
        )
    listed = ", ".join(known) or "none"
    return (
        f"{message}; give the path of an existing .toml profile file, or a "
        f"profile name from {folder}: {listed}"
    )


def _reject_file_as_directory(folder: Path) -> None:
    """Raise ConfigError when the profile directory ``folder`` is a file."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"firmware profile directory {folder} is a file, not a directory; "
            f"pass the directory that holds the *.toml profiles with "
            f"--profiles-dir or {PROFILES_ENV}"
        )
