"""Ctrl-C while ``dslo-edge evaluate`` moves its report files into place."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from dslo_edge import eval_report
from dslo_edge.evaluate import METHODS, RunResult, SeedResult

pytest.importorskip("matplotlib")


def seed_results(accuracy: float, curve: list[float]) -> list[SeedResult]:
    runs = {
        method.name: RunResult(
            method.name,
            {"lr": 0.01},
            accuracy,
            accuracy,
            alpha=curve,
            entropy=curve,
            accuracy=curve,
        )
        for method in METHODS
    }
    return [SeedResult("digits", 0, [0.9], runs, 1.0)]


def report_files(out: Path) -> dict[str, bytes]:
    paths = [out / "evaluation.md", *sorted((out / "evaluation").iterdir())]
    return {str(path.relative_to(out)): path.read_bytes() for path in paths}


def test_sigint_during_moves_completes_report(tmp_path, monkeypatch) -> None:
    out = tmp_path / "docs"
    eval_report.write_report(
        seed_results(0.5, [0.1, 0.2]), out, "dslo-edge evaluate", 60.0
    )
    before = report_files(out)
    replace = os.replace
    moved: list[str] = []

    def replace_then_interrupt(source, target) -> None:
        # Ctrl-C right after the first file of the new report is in place.
        replace(source, target)
        moved.append(Path(target).name)
        if len(moved) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            eval_report.write_report(
                seed_results(0.7, [0.3, 0.4, 0.5]), out, "dslo-edge evaluate", 120.0
            )
    finally:
        signal.signal(signal.SIGINT, previous)

    after = report_files(out)
    assert sorted(after) == sorted(before)
    assert len(after) == 5
    for name, content in after.items():
        assert content != before[name], name
    assert moved == [
        "digits-alpha.png",
        "digits-entropy.png",
        "digits-accuracy.png",
        "results.json",
        "evaluation.md",
    ]
    assert json_accuracy(out) == 0.7


def json_accuracy(out: Path) -> float:
    rows = json.loads((out / "evaluation" / "results.json").read_text())
    return rows[0]["runs"]["DSL-O"]["test_accuracy"]
