"""Describe a bundle: ops per signature, variables, memory estimate, Flex use.

Reads the model files themselves when the ai-edge-litert schema bindings are
installed, and falls back to the op lists in the manifest otherwise (the
older tflite-runtime wheels do not ship the schema).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dslo_edge.bundle import Bundle, load_bundle
from dslo_edge.errors import BundleError
from dslo_edge.health import PROBE_FILE, MultiHeadProbeSet, load_bundle_probe
from dslo_edge.modelfile import FLEX_PREFIX, summarize_model
from dslo_edge.models import check_student_file

FILE_ROLES = ("student", "teacher", "student_int8")


def inspect_bundle(path: str | Path, batch_size: int = 32) -> dict[str, Any]:
    """Build a report of every model file in a bundle.

    Args:
        path: bundle directory.
        batch_size: batch size used for the activation-memory estimate.

    Returns:
        A JSON-ready dict with one entry per file under "files", plus
        "heads" (the class count of each head by name, the one head of a
        single-head student named ""), "flex_free" for the whole bundle and
        "probe" for its probe set.

    Raises:
        BundleError: the bundle is missing, corrupt or unreadable, its
            manifest states other tensor shapes than the student has, or its
            probe set does not fit the student. The daemon rejects each of
            them at start.
    """
    bundle = load_bundle(path)
    unchecked = check_student_file(bundle)
    files = {}
    for role in FILE_ROLES:
        entry = bundle.manifest.get(role)
        if entry is not None:
            files[role] = _file_report(bundle.path / entry["file"], entry, batch_size)
    return {
        "path": str(bundle.path),
        "format_version": bundle.manifest["format_version"],
        "created_by": bundle.manifest.get("created_by", "unknown"),
        "batch_size": batch_size,
        "heads": bundle.heads or {"": bundle.class_count},
        "files": files,
        "flex_free": all(not report["flex_ops"] for report in files.values()),
        "probe": _probe_report(bundle),
        # Why the student's tensor shapes were not compared with the
        # manifest, or None when they were and match.
        "shapes_unchecked": unchecked,
    }


def _probe_report(bundle: Bundle) -> dict[str, Any] | None:
    """Describe the probe set as the daemon reads it, or return None without one.

    Raises:
        BundleError: the daemon would reject the probe set at start.
    """
    probe = load_bundle_probe(bundle)
    if probe is None:
        return None
    report: dict[str, Any] = {"file": PROBE_FILE, "samples": len(probe.x), "used": True}
    if isinstance(probe, MultiHeadProbeSet):
        report["heads"] = list(probe.labels)
    return report


def _file_report(path: Path, entry: dict[str, Any], batch_size: int) -> dict[str, Any]:
    variables = entry.get("variables", {})
    variable_bytes = sum(int(v["bytes"]) for v in variables.values())
    try:
        summary = summarize_model(path.read_bytes(), batch_size)
    except BundleError:
        summary = None
    op_types = {
        key: list(signature.get("ops", []))
        for key, signature in entry["signatures"].items()
    }
    op_counts = None if summary is None else summary.op_counts
    if op_counts is not None:
        op_types = {key: sorted(counts) for key, counts in op_counts.items()}
    arena = None if summary is None else summary.activation_bytes
    flex = sorted(
        {
            name
            for ops in op_types.values()
            for name in ops
            if name.startswith(FLEX_PREFIX)
        }
    )
    report: dict[str, Any] = {
        "file": entry["file"],
        "bytes": int(entry["bytes"]),
        "precision": entry.get("precision", "float32"),
        "op_types": op_types,
        "op_counts": op_counts,
        "flex_ops": flex,
        "variables": variables,
        "variable_bytes": variable_bytes,
    }
    if "optimizer" in entry:
        report["optimizer"] = entry["optimizer"]
        report["trainable"] = entry.get("trainable", {})
    if arena is not None:
        report["arena_bytes_upper_bound"] = arena
        report["memory_estimate_bytes"] = (
            report["bytes"] + variable_bytes + sum(arena.values())
        )
    return report


def format_report(report: dict[str, Any], show_variables: bool = False) -> str:
    """Render an ``inspect_bundle`` report as text for a terminal."""
    lines = [
        f"bundle {report['path']} (format {report['format_version']}, "
        f"{report['created_by']})",
        _format_heads(report["heads"]),
    ]
    for role, file in report["files"].items():
        lines.append("")
        lines.extend(_format_file(role, file, report["batch_size"], show_variables))
    lines.append("")
    unchecked = report.get("shapes_unchecked")
    if unchecked is not None:
        lines.append(
            "student tensor shapes: not compared with the manifest, because the "
            f"student cannot be loaded on this machine ({unchecked})"
        )
    lines.append(_format_probe(report.get("probe")))
    lines.append(
        "Flex-free: yes"
        if report["flex_free"]
        else "Flex-free: NO (needs a Flex-enabled interpreter)"
    )
    return "\n".join(lines)


def _format_heads(heads: dict[str, int]) -> str:
    if list(heads) == [""]:
        return f"student output: {heads['']} classes"
    listed = ", ".join(f"{name} ({count} classes)" for name, count in heads.items())
    return f"student heads, as [training.tasks.<head>] names them: {listed}"


def _format_probe(probe: dict[str, Any] | None) -> str:
    if probe is None:
        return "probe set: none, so rollbacks check the weights only"
    line = f"probe set: {probe['file']}, {probe['samples']} samples"
    if "heads" in probe:
        line += f" with labels for the heads {', '.join(probe['heads'])}"
    return line


def _format_file(
    role: str, file: dict[str, Any], batch_size: int, show_variables: bool
) -> list[str]:
    lines = [
        f"{role}: {file['file']}, {_size(file['bytes'])}, precision {file['precision']}"
    ]
    if "optimizer" in file:
        optimizer = dict(file["optimizer"])
        name = optimizer.pop("name")
        settings = ", ".join(f"{k}={v}" for k, v in optimizer.items())
        lines.append(f"  optimizer: {name} ({settings})")
        trainable = file.get("trainable", {})
        lines.append(
            f"  trainable: {trainable.get('scope', 'all')}, "
            f"{len(trainable.get('layers', []))} layers"
        )
    if file["op_counts"] is None:
        lines.append("  op counts need ai-edge-litert; op types from the manifest:")
        for key, names in file["op_types"].items():
            listed = ", ".join(names)
            lines.append(f"  signature {key}: {len(names)} op types ({listed})")
    else:
        for key, counts in file["op_counts"].items():
            total = sum(counts.values())
            listed = ", ".join(f"{name} {count}" for name, count in counts.items())
            lines.append(f"  signature {key}: {total} ops ({listed})")
    if file["flex_ops"]:
        lines.append(f"  Flex ops: {', '.join(file['flex_ops'])}")
    lines.extend(_format_variables(file, show_variables))
    if "memory_estimate_bytes" in file:
        arena = sum(file["arena_bytes_upper_bound"].values())
        lines.append(
            f"  runtime memory estimate at batch {batch_size}: "
            f"{_size(file['memory_estimate_bytes'])} = model {_size(file['bytes'])} "
            f"+ variables {_size(file['variable_bytes'])} "
            f"+ tensors {_size(arena)} (upper bound: the arena reuses memory)"
        )
    return lines


def _format_variables(file: dict[str, Any], show_variables: bool) -> list[str]:
    variables = file["variables"]
    if not variables:
        return []
    by_kind: dict[str, list[int]] = {}
    for variable in variables.values():
        totals = by_kind.setdefault(variable["kind"], [0, 0])
        totals[0] += 1
        totals[1] += int(variable["bytes"])
    parts = ", ".join(
        f"{kind} {count} ({_size(size)})" for kind, (count, size) in by_kind.items()
    )
    total = _size(file["variable_bytes"])
    lines = [f"  variables: {len(variables)} tensors, {total}: {parts}"]
    if show_variables:
        for name, variable in variables.items():
            shape = "x".join(str(d) for d in variable["shape"]) or "scalar"
            lines.append(
                f"    {name:<48} {shape:<16} {variable['kind']:<16} "
                f"{_size(variable['bytes'])}"
            )
    return lines


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / (1024 * 1024):.2f} MiB"
