"""The evaluation: dataset splits, the quick run and its report files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dslo_edge import eval_report
from dslo_edge.cli import main
from dslo_edge.dynamic import DriftBoost
from dslo_edge.eval_data import load_eval_splits, read_segment
from dslo_edge.evaluate import METHODS, QUICK_GRID, Grid, _candidates


def test_segment_data_ships_with_river() -> None:
    pytest.importorskip("river")
    x, y, names = read_segment()
    assert x.shape == (2310, 18)
    assert sorted(set(y.tolist())) == list(range(7))
    assert "rawblue-mean" in names


@pytest.mark.parametrize("dataset", ["digits", "segment"])
def test_splits_cover_data_once(dataset: str) -> None:
    pytest.importorskip("river" if dataset == "segment" else "sklearn")
    splits = load_eval_splits(dataset, seed=3)
    parts = [splits.base, splits.adapt, splits.val, splits.test]
    sizes = [len(part[1]) for part in parts]
    total = {"digits": 1797, "segment": 2310}[dataset]
    # The hub split only feeds the teacher, so these four are at most the total.
    assert sum(sizes) < total
    assert min(sizes) > 0.1 * total
    for x, y in parts:
        assert x.dtype == np.float32
        assert len(x) == len(y)
    # The teacher trains on base and hub images, clean and in 3 augmented copies.
    assert len(splits.teacher[1]) % 4 == 0
    assert len(splits.teacher[1]) > 4 * sizes[0]


@pytest.mark.parametrize("dataset", ["digits", "segment"])
def test_split_rows_disjoint(dataset: str) -> None:
    pytest.importorskip("river" if dataset == "segment" else "sklearn")
    for seed in range(5):
        splits = load_eval_splits(dataset, seed)
        rows = splits.rows
        assert list(rows) == ["base", "hub", "adapt", "val", "test"]
        every = np.concatenate(list(rows.values()))
        assert len(np.unique(every)) == len(every)
        assert len(rows["adapt"]) == len(splits.adapt[1])
        assert len(rows["val"]) == len(splits.val[1])
        assert len(rows["test"]) == len(splits.test[1])
        assert len(rows["base"]) == len(splits.base[1])
        labels = _dataset_labels(dataset)
        assert np.array_equal(labels[rows["val"]], splits.val[1])
        assert np.array_equal(labels[rows["test"]], splits.test[1])


@pytest.mark.parametrize("dataset", ["digits", "segment"])
def test_splits_share_no_duplicated_row(dataset: str) -> None:
    pytest.importorskip("river" if dataset == "segment" else "sklearn")
    features = _dataset_features(dataset)
    for seed in range(5):
        rows = load_eval_splits(dataset, seed).rows
        training = {features[i].tobytes() for i in (*rows["base"], *rows["hub"])}
        adapt = {features[i].tobytes() for i in rows["adapt"]}
        val = {features[i].tobytes() for i in rows["val"]}
        test = [features[i].tobytes() for i in rows["test"]]
        # The teacher and factory student train on base and hub.
        assert not training & val, f"seed {seed}: val repeats a training row"
        assert not training & set(test), f"seed {seed}: test repeats a training row"
        assert not adapt & set(test), f"seed {seed}: test repeats an adapt row"
        assert not val & set(test), f"seed {seed}: test repeats a val row"
        assert len(set(test)) == len(test), f"seed {seed}: test has a row twice"


def _dataset_features(dataset: str) -> np.ndarray:
    if dataset == "segment":
        return read_segment()[0]
    from sklearn.datasets import load_digits

    return load_digits().data


def _dataset_labels(dataset: str) -> np.ndarray:
    if dataset == "segment":
        return read_segment()[1]
    from sklearn.datasets import load_digits

    return load_digits().target


def test_splits_depend_on_seed() -> None:
    first = load_eval_splits("digits", seed=0)
    second = load_eval_splits("digits", seed=1)
    assert not np.array_equal(first.test[1], second.test[1])


def test_grid_sizes_per_method() -> None:
    sizes = {method.name: len(_candidates(method, Grid())) for method in METHODS}
    assert sizes["factory student"] == 1
    assert sizes["hard labels only"] == 3
    assert sizes["static KD"] == 3 * 3 * 4
    assert sizes["annealed KD"] == 3 * 3 * 3
    assert sizes["DSL-O"] == 3 * 3 * 3 * 3
    assert sizes["DSL-O with masked CE"] == 3 * 3 * 3 * 3
    assert sizes["DSL-O without confidence"] == 3 * 3 * 3 * 3
    assert sizes["DSL-O without time term"] == 3 * 3 * 3 * 3
    assert sizes["DSL-O without smoothing"] == 3 * 3 * 3
    assert sizes["DSL-O without drift boost"] == 3 * 3 * 3
    assert all(len(_candidates(m, QUICK_GRID)) == 1 for m in METHODS)


def test_drift_threshold_reaches_settings() -> None:
    methods = {method.name: method for method in METHODS}
    tried = {
        values["drift_threshold"] for values in _candidates(methods["DSL-O"], Grid())
    }
    values = {"learning_rate": 0.05, "temperature": 2.0, "drift_threshold": 0.05}
    settings = methods["DSL-O"].settings(values)

    assert tried == {0.5, 0.15, 0.05}
    assert _candidates(methods["DSL-O"], Grid())[0]["drift_threshold"] == 0.5
    assert settings.drift.threshold == 0.05
    assert settings.drift.updates == DriftBoost().updates
    assert methods["DSL-O without drift boost"].settings(values).drift.updates == 0
    for values in _candidates(methods["DSL-O without drift boost"], Grid()):
        assert "drift_threshold" not in values


def _changed_fields(settings, reference) -> set[str]:
    """Return the training settings, and fields of alpha, that differ."""
    changed = set()
    compared = ("learning_rate", "temperature", "planned_updates", "progress")
    compared += ("smoothing_lambda", "drift", "hard_label_fallback")
    for name in compared:
        if getattr(settings, name) != getattr(reference, name):
            changed.add(name)
    for name in ("alpha_start", "alpha_end", "w_conf", "w_time", "schedule"):
        if getattr(settings.alpha, name) != getattr(reference.alpha, name):
            changed.add(f"alpha.{name}")
    return changed


def test_ablations_change_only_named_part() -> None:
    values = {"learning_rate": 0.05, "temperature": 2.0, "alpha_start": 0.95}
    methods = {method.name: method for method in METHODS}
    reference = methods["DSL-O"].settings(values)
    expected = {
        "annealed KD": {
            "alpha.w_conf",
            "alpha.w_time",
            "smoothing_lambda",
            "drift",
        },
        "DSL-O with masked CE": {"hard_label_fallback"},
        "DSL-O without confidence": {"alpha.w_conf", "alpha.w_time"},
        "DSL-O without time term": {"alpha.w_conf", "alpha.w_time"},
        "DSL-O without smoothing": {"smoothing_lambda", "drift"},
        "DSL-O without drift boost": {"drift"},
    }
    for name, fields in expected.items():
        method = methods[name]
        assert method.stream == "evolving", name
        assert not method.hard_labels, name
        assert _changed_fields(method.settings(values), reference) == fields, name
    assert methods["DSL-O without confidence"].settings(values).alpha.w_conf == 0
    assert methods["DSL-O without time term"].settings(values).alpha.w_time == 0
    assert methods["DSL-O without smoothing"].settings(values).smoothing_lambda == 0
    assert methods["DSL-O without drift boost"].settings(values).drift.updates == 0


def test_methods_share_update_stream() -> None:
    from dslo_edge.evaluate import _stream, _updates

    splits = load_eval_splits("digits", seed=0)
    samples = len(splits.adapt[1])
    rng = np.random.default_rng(7)
    teacher_adapt = [
        rng.dirichlet(np.ones(10), size=samples).astype(np.float32) for _ in range(5)
    ]
    stream = _stream(samples, 5, np.random.default_rng(0))
    trained = [method for method in METHODS if method.stream != "none"]
    streams = {
        m.name: list(_updates(splits, stream, teacher_adapt, m)) for m in trained
    }

    first = streams["DSL-O"]
    assert [u.teacher_round for u in first] == stream.rounds
    for method in trained:
        updates = streams[method.name]
        assert len(updates) == len(first), method.name
        for update, reference, batch in zip(
            updates, first, stream.batches, strict=True
        ):
            assert update.sample_ids == reference.sample_ids, method.name
            assert np.array_equal(update.inputs, reference.inputs), method.name
            assert update.teacher_round == reference.teacher_round, method.name
            label_round = 5 if method.stream == "final" else update.teacher_round
            labels = teacher_adapt[label_round - 1][batch]
            assert np.array_equal(update.labels, labels), method.name
            if method.hard_labels:
                assert np.array_equal(update.hard_labels, splits.adapt[1][batch])
            else:
                assert update.hard_labels is None, method.name


def test_quick_evaluation_writes_report(tmp_path) -> None:
    pytest.importorskip("keras")
    pytest.importorskip("matplotlib")
    from dslo_edge.eval_report import write_report
    from dslo_edge.evaluate import run_evaluation

    results = run_evaluation(("digits",), seeds=1, quick=True, workdir=tmp_path)
    summary = write_report(results, tmp_path / "docs", "dslo-edge evaluate", 1.0)

    page = (tmp_path / "docs" / "evaluation.md").read_text()
    for method in METHODS:
        assert f"| {method.name} |" in page
    assert "DSL-O minus static KD" in page
    for field in ("alpha", "entropy", "accuracy"):
        image = tmp_path / "docs" / "evaluation" / f"digits-{field}.png"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = results[0].runs
    assert runs["factory student"].alpha == []
    assert len(runs["DSL-O"].alpha) == len(runs["static KD"].alpha) > 0
    assert all(0.2 <= a <= 0.8 for a in runs["DSL-O"].alpha)
    assert summary["digits"]["dslo_minus_static"][1] == 0.0


def _entry(seeds: list[int], diff: float, spread: float) -> dict:
    return {
        "seeds": seeds,
        "methods": {"DSL-O": {"test": (80.0, spread), "gap": (5.0, spread)}},
        "teacher_rounds": [(85.0, 1.0)],
        "dslo_minus_static": (diff, spread),
        "dslo_minus_static_per_seed": [diff] * len(seeds),
        "dslo_boosted_updates": [0] * len(seeds),
        "dslo_drift_thresholds": [0.5] * len(seeds),
    }


def test_report_of_one_seed_shows_no_spread() -> None:
    from dslo_edge.eval_report import markdown_table, render_page

    entry = _entry([0], -5.3, 0.0)
    page = render_page({"digits": entry}, "dslo-edge evaluate --seeds 1", 60.0, 1)

    assert "On digits, DSL-O loses to static KD by 5.3 points in one seed" in page
    assert "over 1 seed (so no standard deviation)" in page
    assert "| DSL-O | 80.0 | 5.0 |" in markdown_table("digits", entry)
    assert "DSL-O minus static KD: -5.3 points" in page
    assert "±" not in markdown_table("digits", entry)
    tie = render_page({"digits": _entry([0], 0.0, 0.0)}, "cmd", 60.0, 1)
    assert "On digits, DSL-O and static KD tie in one seed" in tie


def test_report_setup_names_what_was_tuned() -> None:
    from dslo_edge.eval_report import render_page

    entry = _entry([0, 1], -1.0, 2.0)
    full = render_page({"digits": entry}, "dslo-edge evaluate", 60.0, 2)
    quick = render_page({"digits": entry}, "dslo-edge evaluate --quick", 60.0, 2)

    tuned = "are chosen per seed on a shifted validation split"
    assert tuned in full
    assert "Hard labels only tunes its learning rate alone" in full
    assert tuned not in quick
    assert "so the validation split chooses nothing" in quick
    assert "Teacher test accuracy by round (%, mean over 2 seeds)" in full
    assert "among 0.5, 0.15, 0.05 nats (0.5 is the library default)" in full
    assert "DSL-O's drift threshold (nats), per seed: 0.5, 0.5." in full


def test_plots_without_curves_say_so(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from dslo_edge.evaluate import RunResult, SeedResult

    runs = {m.name: RunResult(m.name, {}, 0.5, 0.6) for m in METHODS}
    results = [SeedResult("digits", 0, [0.9], runs, 1.0)]
    drawn = []
    # Record each figure's texts and legend before write_plots closes it.
    original_savefig = plt.Figure.savefig

    def record(figure, *args, **kwargs):
        axes = figure.axes[0]
        drawn.append(([t.get_text() for t in axes.texts], axes.get_legend()))
        return original_savefig(figure, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Figure, "savefig", record)
        # matplotlib warns when legend() finds no labelled lines.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            written = eval_report.write_plots(results, tmp_path)

    assert [path.name for path in written] == [
        "digits-alpha.png",
        "digits-entropy.png",
        "digits-accuracy.png",
    ]
    for texts, legend in drawn:
        assert texts == ["no per-update values in the results"]
        assert legend is None


def test_report_verdict_names_size_without_sign() -> None:
    from dslo_edge.eval_report import markdown_table, render_page

    losing = render_page({"digits": _entry([0, 1, 2], -3.9, 2.3)}, "cmd", 60.0, 3)
    winning = render_page({"digits": _entry([0, 1, 2], 2.5, 1.0)}, "cmd", 60.0, 3)
    tied = render_page({"digits": _entry([0, 1, 2], -0.1, 1.9)}, "cmd", 60.0, 3)

    assert "On digits, DSL-O loses to static KD by 3.9 ± 2.3 points." in losing
    assert "On digits, DSL-O beats static KD by 2.5 ± 1.0 points." in winning
    assert "within one standard deviation of each other (-0.1 ± 1.9" in tied
    assert "over 3 seeds, on" in losing
    table = markdown_table("digits", _entry([0, 1, 2], -3.9, 2.3))
    assert "| DSL-O | 80.0 ± 2.3 | 5.0 ± 2.3 |" in table
    assert "DSL-O minus static KD: -3.9 ± 2.3 points" in table


def test_summary_line_of_one_seed() -> None:
    from dslo_edge.eval_report import summary_line

    one_seed = summary_line("digits", _entry([0], -5.3, 0.0))
    three_seeds = summary_line("digits", _entry([0, 1, 2], -3.9, 2.3))

    assert one_seed == "digits: DSL-O minus static KD -5.3 points (one seed, no spread)"
    assert three_seeds == "digits: DSL-O minus static KD -3.9 ± 2.3 points"


def test_evaluate_rejects_unwritable_out(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "report"

    started = time.monotonic()
    result = CliRunner().invoke(
        main, ["evaluate", "--quick", "--seeds", "1", "--out", str(out)]
    )
    seconds = time.monotonic() - started

    assert result.exit_code == 2
    assert "Invalid value for --out" in result.output
    assert f"cannot write into {out / 'evaluation'}" in result.output
    assert "Not a directory" in result.output
    assert "Traceback" not in result.output
    # Rejected before the run: a quick one-seed run of digits alone took 45 to
    # 55 s on a 2-core machine.
    assert seconds < 10
    assert blocker.read_text() == "not a directory"


def test_evaluate_runs_repeated_dataset_once(tmp_path) -> None:
    pytest.importorskip("keras")
    pytest.importorskip("matplotlib")
    out = tmp_path / "docs"
    arguments = ["evaluate", "--quick", "--seeds", "1", "--out", str(out)]

    result = CliRunner().invoke(
        main, [*arguments, "--dataset", "digits", "--dataset", "digits"]
    )

    assert result.exit_code == 0, result.output
    assert result.output.count("digits seed 0:") == 1
    assert "(one seed, no spread)" in result.output
    page = (out / "evaluation.md").read_text()
    assert "over 1 seed (so no standard deviation)" in page
    assert "`dslo-edge evaluate --quick --seeds 1 --dataset digits`" in page


def test_report_write_error_keeps_results(tmp_path, monkeypatch) -> None:
    import json
    import tempfile

    import dslo_edge.evaluate as evaluate_module
    from dslo_edge.evaluate import RunResult, SeedResult

    pytest.importorskip("keras")
    pytest.importorskip("matplotlib")
    runs = {
        method.name: RunResult(
            method.name,
            {},
            0.5,
            0.6 + index / 100,
            alpha=[0.9, 0.8],
            entropy=[0.5, 0.4],
            accuracy=[0.6, 0.7],
        )
        for index, method in enumerate(METHODS)
    }
    results = [SeedResult("digits", 0, [0.7, 0.9], runs, 1.0)]
    monkeypatch.setattr(evaluate_module, "run_evaluation", lambda *_a, **_k: results)
    saved_dir = tmp_path / "tmp"
    saved_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(saved_dir))
    out = tmp_path / "docs"
    (out / "evaluation").mkdir(parents=True)
    (out / "evaluation.md").write_text("earlier report\n")
    earlier_plot = out / "evaluation" / "digits-alpha.png"
    earlier_plot.write_bytes(b"earlier plot")

    def disk_full(*_args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # The plots are written, then the disk fills up.
    monkeypatch.setattr(eval_report, "write_json", disk_full)
    result = CliRunner().invoke(main, ["evaluate", "--seeds", "1", "--out", str(out)])
    monkeypatch.undo()

    saved = list(saved_dir.glob("dslo-evaluation-*.json"))
    assert result.exit_code == 1
    assert "cannot write the evaluation report" in result.output
    assert "No space left on device" in result.output
    assert f"the files of an earlier report in {out} are unchanged" in result.output
    assert (out / "evaluation.md").read_text() == "earlier report\n"
    assert earlier_plot.read_bytes() == b"earlier plot"
    assert sorted(path.name for path in (out / "evaluation").iterdir()) == [
        "digits-alpha.png"
    ]
    assert sorted(path.name for path in out.iterdir()) == [
        "evaluation",
        "evaluation.md",
    ]
    assert len(saved) == 1
    assert f"the results of every run are saved in {saved[0]}" in result.output
    document = json.loads(saved[0].read_text())
    assert document["command"] == "dslo-edge evaluate --seeds 1"
    assert document["cpus"] == len(os.sched_getaffinity(0))
    rows = document["results"]
    assert rows[0]["teacher_test_accuracy"] == [0.7, 0.9]
    assert rows[0]["runs"]["DSL-O"]["test_accuracy"] == runs["DSL-O"].test_accuracy
    assert rows[0]["runs"]["DSL-O"]["alpha"] == [0.9, 0.8]
    rerun = f"dslo-edge evaluate --from-results {saved[0]} --out {out}"
    assert rerun in result.output

    # The command in the message writes the report once the disk has room.
    monkeypatch.setattr(evaluate_module, "run_evaluation", None)
    written = CliRunner().invoke(main, rerun.split()[1:])

    assert written.exit_code == 0, written.output
    # Each method's test accuracy is 0.6 + its index in METHODS / 100.
    names = [method.name for method in METHODS]
    difference = names.index("DSL-O") - names.index("static KD")
    assert f"digits: DSL-O minus static KD {difference:+.1f} points" in written.output
    page = (out / "evaluation.md").read_text()
    assert "`dslo-edge evaluate --seeds 1`" in page
    assert f"on a machine with {document['cpus']} CPU" in page
    image = out / "evaluation" / "digits-alpha.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "taken", ["evaluation.md", "evaluation/results.json", "evaluation/digits-alpha.png"]
)
def test_evaluate_rejects_directory_in_the_way(tmp_path, monkeypatch, taken) -> None:
    import dslo_edge.evaluate as evaluate_module

    pytest.importorskip("keras")
    pytest.importorskip("matplotlib")
    out = tmp_path / "docs"
    (out / taken).mkdir(parents=True)
    # The run must not start, so a call of it fails the test.
    monkeypatch.setattr(evaluate_module, "run_evaluation", None)

    result = CliRunner().invoke(
        main, ["evaluate", "--seeds", "1", "--dataset", "digits", "--out", str(out)]
    )

    assert result.exit_code == 2, result.output
    assert f"{out / taken} is not a regular file" in result.output
    assert "move it away or choose another --out" in result.output
    assert (out / taken).is_dir()


def saved_results(tmp_path, document) -> str:
    import json

    path = tmp_path / "results.json"
    path.write_text(json.dumps(document))
    return str(path)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([1, 2], "is a list, like the results.json that a report writes"),
        ({"results": 3}, "has no list of results"),
        ({"results": [], "command": "c", "seconds": 1}, "contains no results"),
        (
            {
                "results": [
                    {
                        "dataset": "digits",
                        "seed": 0,
                        "teacher_test_accuracy": [float("nan")],
                        "runs": {},
                        "seconds": 1.0,
                    }
                ],
                "command": "dslo-edge evaluate",
                "seconds": 1.0,
            },
            "accuracy nan is not a fraction in [0, 1]",
        ),
        (
            {"results": [{"dataset": "digits"}], "command": "c", "seconds": 1},
            "KeyError",
        ),
        (
            {
                "results": [
                    {
                        "dataset": "digits",
                        "seed": 0,
                        "teacher_test_accuracy": [0.9],
                        "runs": {},
                        "seconds": 1.0,
                    }
                ],
                "command": "dslo-edge evaluate",
                "seconds": 1.0,
            },
            "digits seed 0 has no runs of factory student",
        ),
    ],
)
def test_report_from_bad_results_rejected(tmp_path, document, message) -> None:
    pytest.importorskip("matplotlib")
    path = saved_results(tmp_path, document)

    result = CliRunner().invoke(
        main, ["evaluate", "--from-results", path, "--out", str(tmp_path / "docs")]
    )

    assert result.exit_code == 78
    assert message in result.output
    assert "expected the JSON file that dslo-edge evaluate saved" in result.output
    assert not (tmp_path / "docs" / "evaluation.md").exists()


def results_row(dataset: str, seed: int, teacher: list[float]) -> dict:
    """Return one seed's saved results, with a run of every method."""
    run = {"values": {}, "val_accuracy": 0.5, "test_accuracy": 0.6}
    return {
        "dataset": dataset,
        "seed": seed,
        "teacher_test_accuracy": teacher,
        "runs": {method.name: {"method": method.name, **run} for method in METHODS},
        "seconds": 1.0,
    }


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        # A dataset name is part of the plot file names.
        ([results_row("../../x", 0, [0.9])], "unknown dataset '../../x'"),
        ([results_row("digits", 0, [])], "digits seed 0 has no teacher accuracy"),
        (
            [results_row("digits", 0, [0.8, 0.9]), results_row("digits", 1, [0.9])],
            "digits seed 1 has 1 teacher rounds, seed 0 has 2",
        ),
        (
            [results_row("digits", 0, [0.9]), results_row("digits", 0, [0.9])],
            "digits seed 0 appears twice",
        ),
    ],
)
def test_report_from_inconsistent_results_rejected(tmp_path, rows, message) -> None:
    pytest.importorskip("matplotlib")
    document = {"results": rows, "command": "dslo-edge evaluate", "seconds": 1.0}
    path = saved_results(tmp_path, document)

    result = CliRunner().invoke(
        main, ["evaluate", "--from-results", path, "--out", str(tmp_path / "docs")]
    )

    assert result.exit_code == 78, result.output
    assert message in result.output
    assert "expected the JSON file that dslo-edge evaluate saved" in result.output
    assert not (tmp_path / "x-alpha.png").exists()
    assert not (tmp_path / "docs").exists()


def test_report_from_infinite_count_rejected(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    row = results_row("digits", 0, [0.9])
    row["runs"]["DSL-O"]["boosted_updates"] = float("inf")
    document = {"results": [row], "command": "dslo-edge evaluate", "seconds": 1.0}
    path = saved_results(tmp_path, document)

    result = CliRunner().invoke(
        main, ["evaluate", "--from-results", path, "--out", str(tmp_path / "docs")]
    )

    assert result.exit_code == 78, result.output
    assert "OverflowError" in result.output


def test_report_from_results_keeps_input_file(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    row = results_row("digits", 0, [0.9])
    document = {"results": [row], "command": "dslo-edge evaluate", "seconds": 1.0}
    out = tmp_path / "docs"
    # The report writes evaluation/results.json, without the curves.
    (out / "evaluation").mkdir(parents=True)
    path = out / "evaluation" / "results.json"
    path.write_text(json.dumps(document))

    result = CliRunner().invoke(
        main, ["evaluate", "--from-results", str(path), "--out", str(out)]
    )

    assert result.exit_code == 2, result.output
    assert "the report would replace it" in result.output
    assert json.loads(path.read_text()) == document
    assert not (out / "evaluation.md").exists()


@pytest.mark.parametrize(
    ("cpus", "machine"),
    [
        (8, "on a machine with 8 CPUs)"),
        (1, "on a machine with 1 CPU)"),
        (None, "on a machine)"),
        ("2", "on a machine)"),
    ],
)
def test_report_page_states_run_cpus(tmp_path, cpus, machine) -> None:
    pytest.importorskip("matplotlib")
    row = results_row("digits", 0, [0.9])
    document = {"results": [row], "command": "dslo-edge evaluate", "seconds": 60.0}
    if cpus is not None:
        document["cpus"] = cpus
    out = tmp_path / "docs"

    result = CliRunner().invoke(
        main,
        ["evaluate", "--from-results", saved_results(tmp_path, document)]
        + ["--out", str(out)],
    )

    assert result.exit_code == 0, result.output
    page = (out / "evaluation.md").read_text()
    assert f"(took 1.0 minutes {machine}." in page
    assert "2-core" not in page


def test_report_from_results_rejects_run_options(tmp_path) -> None:
    path = saved_results(tmp_path, {"results": []})

    result = CliRunner().invoke(
        main, ["evaluate", "--from-results", path, "--quick", "--seeds", "3"]
    )

    assert result.exit_code == 2
    assert "drop --seeds and --quick" in result.output


# Creates the temporary files of a report in OUT, then dies as on SIGKILL.
_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from dslo_edge.eval_staging import make_page_file, make_staging_dir
out = Path(sys.argv[1])
staging = make_staging_dir(out / "evaluation")
(staging / "digits-alpha.png").write_bytes(b"half a plot")
make_page_file(out).write_text("half a page")
os.kill(os.getpid(), signal.SIGKILL)
"""


def own_pid_namespace() -> int:
    """Return the inode number of this process's PID namespace."""
    return os.stat("/proc/self/ns/pid").st_ino


def test_report_keeps_other_namespace_staging(tmp_path, caplog) -> None:
    pytest.importorskip("matplotlib")
    if not Path("/proc/self/ns/pid").exists():
        pytest.skip("no /proc/self/ns/pid, so no PID namespace in the names")
    out = tmp_path / "docs"
    (out / "evaluation").mkdir(parents=True)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    assert ended.wait(timeout=60) == 0
    # Process ids only mean something in their own PID namespace: one that
    # does not run here may run in a container that shares the host name.
    container = own_pid_namespace() + 1
    ids = {
        "container": f"{socket.gethostname()}-{ended.pid}-{container}",
        "huge": f"{socket.gethostname()}-99999999999999999999-{own_pid_namespace()}",
    }
    entries = {
        name: out / "evaluation" / f".staging-{owner}-ab_1"
        for name, owner in ids.items()
    }
    for entry in entries.values():
        entry.mkdir()
    row = results_row("digits", 0, [0.9])
    document = {"results": [row], "command": "dslo-edge evaluate", "seconds": 1.0}
    path = saved_results(tmp_path, document)

    with caplog.at_level("INFO", logger="dslo_edge"):
        result = CliRunner().invoke(
            main, ["evaluate", "--from-results", path, "--out", str(out)]
        )

    assert result.exit_code == 0, result.output
    for entry in entries.values():
        assert entry.is_dir()
        assert f"{entry} may be left by a killed dslo-edge evaluate" in caplog.text


def test_report_deletes_stale_staging(tmp_path, caplog) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "docs"
    (out / "evaluation").mkdir(parents=True)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(out)], timeout=60
    )
    assert killed.returncode == -9
    stale = sorted(out.glob(".evaluation-*.md"))
    stale += sorted((out / "evaluation").glob(".staging-*"))
    assert len(stale) == 2
    # A run that is still writing, and a folder named without its writer.
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = f"{socket.gethostname()}-{running.pid}-{own_pid_namespace()}"
    live = out / "evaluation" / f".staging-{owner}-ab_1"
    live.mkdir()
    unnamed = out / "evaluation" / ".staging-ab12cd34"
    unnamed.mkdir()
    row = results_row("digits", 0, [0.9])
    document = {"results": [row], "command": "dslo-edge evaluate", "seconds": 1.0}
    path = saved_results(tmp_path, document)

    try:
        with caplog.at_level("INFO", logger="dslo_edge"):
            result = CliRunner().invoke(
                main, ["evaluate", "--from-results", path, "--out", str(out)]
            )
    finally:
        running.kill()
        running.wait()

    assert result.exit_code == 0, result.output
    for leftover in stale:
        assert not leftover.exists()
        assert f"Deleted {leftover}, left by process" in caplog.text
    assert live.is_dir()
    assert f"Kept {live}: process {running.pid}" in caplog.text
    assert unnamed.is_dir()
    assert f"{unnamed} may be left by a killed dslo-edge evaluate" in caplog.text
    hidden = sorted(entry.name for entry in (out / "evaluation").glob(".*"))
    assert hidden == sorted([live.name, unnamed.name])
    assert list(out.glob(".*")) == []
    assert (out / "evaluation.md").read_text().startswith("#")


@pytest.mark.slow
def test_evaluate_sigterm_deletes_temporary_files(tmp_path) -> None:
    import signal

    pytest.importorskip("keras")
    pytest.importorskip("matplotlib")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    out = tmp_path / "docs"
    command = ["evaluate", "--quick", "--seeds", "1", "--dataset", "digits"]
    evaluate = subprocess.Popen(
        [sys.executable, "-m", "dslo_edge.cli", *command, "--out", str(out)],
        env={**os.environ, "TMPDIR": str(temporary)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(temporary.glob("dslo-eval-*")):
            assert evaluate.poll() is None, "evaluate ended before its run started"
            assert time.monotonic() < deadline, "no run directory within 120 s"
            time.sleep(0.1)

        evaluate.send_signal(signal.SIGTERM)
        _, stderr = evaluate.communicate(timeout=60)
    finally:
        if evaluate.poll() is None:
            evaluate.kill()
            evaluate.wait()

    assert evaluate.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert list(temporary.iterdir()) == []
    assert not (out / "evaluation.md").exists()


def test_evaluate_rejects_file_as_report_folder(tmp_path) -> None:
    out = tmp_path / "docs"
    out.mkdir()
    (out / "evaluation").write_text("not a folder")

    result = CliRunner().invoke(
        main, ["evaluate", "--quick", "--seeds", "1", "--out", str(out)]
    )

    assert result.exit_code == 2, result.output
    assert "Invalid value for --out" in result.output
    assert f"{out / 'evaluation'} is a file, not a directory" in result.output
    assert "move it away or choose another --out" in result.output
    assert (out / "evaluation").read_text() == "not a folder"


def run_without_write_override(*arguments: str) -> subprocess.CompletedProcess:
    """Run the CLI so that a read-only directory rejects writes, even for root."""
    prefix = []
    if os.geteuid() == 0:
        # Root writes anywhere through CAP_DAC_OVERRIDE, which this drops.
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is not installed")
        prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "dslo_edge.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_evaluate_rejects_read_only_out(tmp_path) -> None:
    out = tmp_path / "docs"
    # The plot folder is writable, but the page goes into out itself.
    (out / "evaluation").mkdir(parents=True)
    out.chmod(0o555)
    arguments = ["--quick", "--seeds", "1", "--dataset", "digits"]

    try:
        started = time.monotonic()
        result = run_without_write_override("evaluate", *arguments, "--out", str(out))
        seconds = time.monotonic() - started
    finally:
        out.chmod(0o755)

    assert result.returncode == 2, result.stderr
    assert f"cannot write into {out}: Permission denied" in result.stderr
    assert "Traceback" not in result.stderr
    # Rejected before the run, which takes about a minute.
    assert seconds < 10
    assert sorted(path.name for path in out.iterdir()) == ["evaluation"]


def test_report_page_mode_follows_umask(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    row = results_row("digits", 0, [0.9])
    document = {"results": [row], "command": "dslo-edge evaluate", "seconds": 1.0}
    path = saved_results(tmp_path, document)
    out = tmp_path / "docs"
    previous = os.umask(0o022)

    try:
        result = CliRunner().invoke(
            main, ["evaluate", "--from-results", path, "--out", str(out)]
        )
    finally:
        os.umask(previous)

    assert result.exit_code == 0, result.output
    page_mode = (out / "evaluation.md").stat().st_mode & 0o777
    plot_mode = (out / "evaluation" / "digits-alpha.png").stat().st_mode & 0o777
    assert page_mode == 0o644
    assert plot_mode == 0o644


@pytest.mark.parametrize(
    ("arguments", "folder"),
    [
        ([], "docs"),
        (["--quick"], "evaluate-out"),
        (["--seeds", "2"], "evaluate-out"),
        (["--dataset", "digits"], "evaluate-out"),
    ],
)
def test_default_out_spares_recorded_report(
    tmp_path, monkeypatch, arguments: list[str], folder: str
) -> None:
    # A file where the report would go stops the run before it starts, and
    # shows which folder the command chose.
    monkeypatch.chdir(tmp_path)
    (tmp_path / folder).write_text("not a folder\n")

    result = CliRunner().invoke(main, ["evaluate", *arguments])

    assert result.exit_code == 2
    assert f"cannot write into {folder}/evaluation: Not a directory" in result.output
    assert (tmp_path / folder).read_text() == "not a folder\n"


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> tuple[list[np.ndarray], object]:
    """Train the evaluation's digits teacher for seed 0.

    Returns its probabilities on the device stream per round, and the stream.
    """
    pytest.importorskip("keras")
    from converters.eval_models import train_eval_models
    from dslo_edge.evaluate import ROUND_EPOCHS, STUDENT_HIDDEN, _stream

    splits = load_eval_splits("digits", seed=0)
    models = train_eval_models(
        splits.base,
        splits.teacher,
        {"adapt": splits.adapt[0]},
        tmp_path_factory.mktemp("teacher"),
        seed=0,
        round_epochs=ROUND_EPOCHS,
        student_hidden=STUDENT_HIDDEN["digits"],
        student_epochs=1,
    )
    samples = len(splits.adapt[1])
    stream = _stream(samples, len(ROUND_EPOCHS), np.random.default_rng(0))
    return [rounds["adapt"] for rounds in models.teacher_rounds], stream


def _lambdas(engine, rounds: list[np.ndarray], stream) -> list[tuple]:
    """Run the stream through an engine; return round, drift, rows, lambda."""
    seen = []
    for batch, teacher_round in zip(stream.batches, stream.rounds, strict=True):
        ids = [f"adapt-{i}" for i in batch]
        targets = engine.prepare(ids, rounds[teacher_round - 1][batch], teacher_round)
        drift_rows = engine.monitor.batch_drift_rows
        seen.append(
            (teacher_round, targets.batch_drift, drift_rows, targets.smoothing_lambda)
        )
        engine.finish_update()
    return seen


def test_teacher_round_change_boost(digits_teacher) -> None:
    from dslo_edge.dynamic import SoftLabelEngine, TaskSettings

    rounds, stream = digits_teacher
    default = _lambdas(SoftLabelEngine(TaskSettings()), rounds, stream)
    low = TaskSettings(drift=DriftBoost(threshold=0.05))
    tuned = _lambdas(SoftLabelEngine(low), rounds, stream)

    changes = [
        n
        for n in range(1, len(stream.rounds))
        if stream.rounds[n - 1] != stream.rounds[n]
    ]
    assert len(changes) == 4
    for n in changes:
        teacher_round, drift, drift_rows, _ = default[n]
        # Every row of a round's first batch was seen in the round before.
        assert drift_rows == 32, teacher_round
        assert 0.05 < drift < DriftBoost().threshold, (teacher_round, drift)
        assert tuned[n][3] == DriftBoost().smoothing_lambda, teacher_round
    assert {lam for *_, lam in default} == {TaskSettings().smoothing_lambda}
    assert all(
        lam == TaskSettings().smoothing_lambda for *_, lam in tuned[: changes[0]]
    )


def test_same_round_repeat_no_boost(digits_teacher) -> None:
    from dslo_edge.dynamic import SoftLabelEngine, TaskSettings

    rounds, stream = digits_teacher
    engine = SoftLabelEngine(TaskSettings(drift=DriftBoost(threshold=0.05)))
    batch = stream.batches[0]
    ids = [f"adapt-{i}" for i in batch]

    first = engine.prepare(ids, rounds[0][batch], 1)
    repeat = engine.prepare(ids, rounds[0][batch], 1)
    relabelled = engine.prepare(ids, rounds[1][batch], 2)

    assert first.batch_drift is None
    assert repeat.batch_drift is None
    assert repeat.smoothing_lambda == TaskSettings().smoothing_lambda
    assert relabelled.batch_drift > 0.05
    assert relabelled.smoothing_lambda == DriftBoost().smoothing_lambda


def test_evaluate_prints_each_seed_once(tmp_path) -> None:
    pytest.importorskip("keras")
    pytest.importorskip("matplotlib")
    out = tmp_path / "docs"
    command = [sys.executable, "-m", "dslo_edge.console", "evaluate", "--quick"]
    arguments = ["--seeds", "1", "--dataset", "segment", "--out", str(out)]

    result = subprocess.run(
        [*command, *arguments], capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 0, result.stderr
    seed_lines = [line for line in result.stderr.splitlines() if "seed 0" in line]
    assert len(seed_lines) == 1, seed_lines
    assert seed_lines[0].startswith("segment seed 0: ")
