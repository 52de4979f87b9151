"""Check whether a bundle can run on a board described by a firmware profile."""

from __future__ import annotations

from dataclasses import dataclass, field

from packaging.requirements import InvalidRequirement, Requirement

from dslo_edge.bundle import Bundle
from dslo_edge.config import DEFAULT_QUEUE_SIZE
from dslo_edge.footprint import (
    MIB,
    MemoryEstimate,
    StorageEstimate,
    estimate_memory,
    estimate_storage,
)
from dslo_edge.profiles import DSLO_EDGE_PYTHON, FirmwareProfile, InterpreterWheel

# Interpreters any bundle runs on when its manifest names none.
DEFAULT_INTERPRETERS = ("ai-edge-litert>=2.0", "tflite-runtime>=2.14")


@dataclass(frozen=True)
class FitReport:
    """The result of checking a bundle against a profile.

    Attributes:
        profile: the profile name.
        memory: the estimated resident memory by part.
        storage: the estimated disk use by part.
        interpreter: ``package==version`` of the first usable interpreter wheel,
            or None.
        problems: reasons the bundle cannot run, one sentence each.
        notes: facts worth knowing that do not stop the bundle.
    """

    profile: str
    memory: MemoryEstimate
    storage: StorageEstimate
    interpreter: str | None
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fits(self) -> bool:
        return not self.problems


def check_bundle(
    bundle: Bundle,
    profile: FirmwareProfile,
    *,
    batch_size: int = 32,
    queue_size: int = DEFAULT_QUEUE_SIZE,
) -> FitReport:
    """Compare a bundle's estimated footprint and interpreter needs with a board.

    Args:
        bundle: a loaded bundle.
        profile: the target board.
        batch_size: samples per update the hub will send.
        queue_size: the daemon's update queue length.
    """
    problems: list[str] = []
    notes: list[str] = []
    memory = estimate_memory(bundle, batch_size=batch_size, queue_size=queue_size)
    storage = estimate_storage(bundle)

    ram_budget = profile.budget_ram_mb * MIB
    if memory.total > ram_budget:
        problems.append(
            f"estimated memory {_mib(memory.total)} exceeds the RAM budget of "
            f"{profile.budget_ram_mb} MiB; use a smaller student, batch or queue"
        )
    storage_budget = profile.budget_storage_mb * MIB
    if storage.total > storage_budget:
        problems.append(
            f"estimated storage {_mib(storage.total)} exceeds the storage budget "
            f"of {profile.budget_storage_mb} MiB"
        )

    if profile.python not in DSLO_EDGE_PYTHON:
        problems.append(
            f"{profile.os_name} ships Python {profile.python}, but dslo-edge needs "
            f"Python {DSLO_EDGE_PYTHON}; install a newer Python on the board and "
            "set [os] python in the profile"
        )
    wheel, reasons = _usable_interpreter(bundle, profile)
    if wheel is None:
        problems.append(
            f"no LiteRT interpreter for {profile.architecture} on {profile.os_name}: "
            + "; ".join(reasons or ["the profile lists none"])
        )
    else:
        notes.append(_numpy_note(wheel, profile))
    interpreter = f"{wheel.package}=={wheel.version}" if wheel else None
    return FitReport(
        profile.name,
        memory,
        storage,
        interpreter,
        tuple(problems),
        tuple(notes),
    )


def _accepted_requirements(bundle: Bundle) -> list[Requirement]:
    names = bundle.manifest.get("runtime", {}).get("interpreters")
    requirements = []
    for text in names or DEFAULT_INTERPRETERS:
        try:
            requirements.append(Requirement(text))
        except InvalidRequirement:
            continue
    return requirements


def _usable_interpreter(
    bundle: Bundle, profile: FirmwareProfile
) -> tuple[InterpreterWheel | None, list[str]]:
    """Return the first wheel the bundle accepts and the board can install."""
    accepted = _accepted_requirements(bundle)
    reasons = []
    for wheel in profile.interpreters:
        name = f"{wheel.package} {wheel.version}"
        matching = [r for r in accepted if r.name == wheel.package]
        if not any(wheel.version in r.specifier for r in matching):
            expected = ", ".join(str(r) for r in accepted)
            reasons.append(f"{name} is not one the bundle accepts ({expected})")
        elif profile.python not in wheel.python:
            reasons.append(
                f"{name} has wheels for Python {wheel.python}, "
                f"the board has {profile.python}"
            )
        elif profile.glibc < wheel.min_glibc:
            reasons.append(
                f"{name} needs glibc {wheel.min_glibc}, the board has {profile.glibc}"
            )
        else:
            return wheel, reasons
    return None, reasons


def _numpy_note(wheel: InterpreterWheel, profile: FirmwareProfile) -> str:
    if profile.numpy in wheel.numpy:
        return (
            f"{wheel.package} {wheel.version} works with the OS numpy "
            f"{profile.numpy} (needs numpy {wheel.numpy})"
        )
    return (
        f"{wheel.package} {wheel.version} needs numpy {wheel.numpy}, but the OS "
        f"ships {profile.numpy}: install into a virtual environment, which brings "
        "its own numpy"
    )


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"
