"""Tables, plots and JSON for ``dslo-edge evaluate``."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dslo_edge.dynamic import DriftBoost
from dslo_edge.errors import ConfigError
from dslo_edge.eval_data import DATASETS
from dslo_edge.eval_staging import make_page_file, make_staging_dir, remove_stale
from dslo_edge.evaluate import METHODS, Grid, RunResult, SeedResult
from dslo_edge.signal_deferral import signals_deferred

CURVE_METHODS = ("static KD", "annealed KD", "DSL-O")
# Per dataset: the curve field, the y-axis label and the title of each plot.
PLOTS = (
    ("alpha", "mean alpha of the update", "alpha(t)"),
    ("entropy", "teacher normalised entropy", "teacher entropy(t)"),
    ("accuracy", "student test accuracy", "student accuracy(t)"),
)
ENTROPY_LABELS = {
    "static KD": "final teacher (static KD)",
    "DSL-O": "evolving teacher (annealed KD, DSL-O)",
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    spread = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return float(array.mean()), spread


def summarise(results: list[SeedResult]) -> dict[str, Any]:
    """Return per dataset: method accuracy, teacher gap and paired differences.

    Accuracies and gaps are in percentage points, as mean and sample standard
    deviation over seeds. ``dslo_minus_static`` is the per-seed difference
    of DSL-O and static KD test accuracy, so its spread is paired.
    """
    summary: dict[str, Any] = {}
    for dataset in dict.fromkeys(result.dataset for result in results):
        seeds = [result for result in results if result.dataset == dataset]
        teacher = [100 * seed.teacher_test_accuracy[-1] for seed in seeds]
        rows = {}
        for method in METHODS:
            test = [100 * seed.runs[method.name].test_accuracy for seed in seeds]
            gaps = [t - s for t, s in zip(teacher, test, strict=True)]
            rows[method.name] = {
                "test": _mean_std(test),
                "gap": _mean_std(gaps),
                "chosen": [seed.runs[method.name].values for seed in seeds],
            }
        differences = [
            100
            * (seed.runs["DSL-O"].test_accuracy - seed.runs["static KD"].test_accuracy)
            for seed in seeds
        ]
        summary[dataset] = {
            "seeds": [seed.seed for seed in seeds],
            "dslo_boosted_updates": [
                seed.runs["DSL-O"].boosted_updates for seed in seeds
            ],
            "dslo_drift_thresholds": [
                _drift_threshold(seed.runs["DSL-O"]) for seed in seeds
            ],
            "teacher_rounds": [
                _mean_std([100 * seed.teacher_test_accuracy[r] for seed in seeds])
                for r in range(len(seeds[0].teacher_test_accuracy))
            ],
            "methods": rows,
            "dslo_minus_static": _mean_std(differences),
            "dslo_minus_static_per_seed": differences,
        }
    return summary


def _drift_threshold(run: RunResult) -> float:
    # Results saved before the threshold was tuned ran at the default.
    return run.values.get("drift_threshold", DriftBoost().threshold)


def _spread(mean: float, std: float, seeds: int, sign: str = "") -> str:
    """Format a mean with its standard deviation, which one seed does not have."""
    if seeds < 2:
        return f"{mean:{sign}.1f}"
    return f"{mean:{sign}.1f} ± {std:.1f}"


def markdown_table(dataset: str, entry: dict[str, Any]) -> str:
    """Return the markdown table of one dataset's summary."""
    seeds = len(entry["seeds"])
    lines = [
        "| method | test accuracy (%) | gap to final teacher (points) |",
        "|---|---|---|",
    ]
    for name, row in entry["methods"].items():
        mean, std = row["test"]
        gap_mean, gap_std = row["gap"]
        test = _spread(mean, std, seeds)
        gap = _spread(gap_mean, gap_std, seeds)
        lines.append(f"| {name} | {test} | {gap} |")
    rounds = ", ".join(f"{mean:.1f}" for mean, _ in entry["teacher_rounds"])
    averaged = "1 seed" if seeds == 1 else f"mean over {seeds} seeds"
    diff, spread = entry["dslo_minus_static"]
    per_seed = ", ".join(f"{d:+.1f}" for d in entry["dslo_minus_static_per_seed"])
    boosted = ", ".join(str(count) for count in entry["dslo_boosted_updates"])
    thresholds = ", ".join(f"{value:g}" for value in entry["dslo_drift_thresholds"])
    lines += [
        "",
        f"Teacher test accuracy by round (%, {averaged}): {rounds}.",
        f"DSL-O's drift threshold (nats), per seed: {thresholds}.",
        f"Updates in which the drift boost raised DSL-O's lambda, per seed: {boosted}.",
        f"DSL-O minus static KD: {_spread(diff, spread, seeds, '+')} points "
        f"(per seed: {per_seed}).",
    ]
    return "\n".join(lines)


def _curves(results: list[SeedResult], dataset: str, field: str) -> dict[str, Any]:
    curves = {}
    for name in CURVE_METHODS:
        rows = [getattr(seed.runs[name], field) for seed in results]
        rows = [row for row in rows if row]
        if rows:
            length = min(len(row) for row in rows)
            curves[name] = np.mean([row[:length] for row in rows], axis=0)
    return curves


def write_plots(results: list[SeedResult], folder: Path) -> list[Path]:
    """Write alpha(t), teacher entropy(t) and accuracy(t) PNGs per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset in dict.fromkeys(result.dataset for result in results):
        seeds = [result for result in results if result.dataset == dataset]
        for field, label, title in PLOTS:
            figure, axes = plt.subplots(figsize=(6.4, 3.6))
            for name, curve in _curves(seeds, dataset, field).items():
                if field == "entropy" and name == "annealed KD":
                    continue  # the same evolving stream as DSL-O
                updates = np.arange(1, len(curve) + 1)
                axes.plot(
                    updates,
                    curve,
                    label=ENTROPY_LABELS.get(name, name)
                    if field == "entropy"
                    else name,
                )
            axes.set_xlabel("applied updates (5 teacher rounds)")
            axes.set_ylabel(label)
            averaged = "1 seed" if len(seeds) == 1 else f"mean of {len(seeds)} seeds"
            axes.set_title(f"{dataset}: {title}, {averaged}")
            axes.grid(alpha=0.3)
            if axes.lines:
                axes.legend()
            else:
                # load_results accepts runs without the per-update lists,
                # which leave the plot without lines.
                axes.text(
                    0.5,
                    0.5,
                    "no per-update values in the results",
                    ha="center",
                    va="center",
                    transform=axes.transAxes,
                )
            figure.tight_layout()
            path = folder / f"{dataset}-{field}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written.append(path)
    return written


def write_json(results: list[SeedResult], path: Path) -> None:
    """Write every seed's chosen runs without the per-update curves."""
    rows = []
    for result in results:
        entry = asdict(result)
        for run in entry["runs"].values():
            for curve in ("alpha", "entropy", "accuracy"):
                run.pop(curve)
        rows.append(entry)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def results_document(
    results: list[SeedResult], command: str, seconds: float, cpus: int | None
) -> dict[str, Any]:
    """Return every seed's runs with their curves, and the run's command and time.

    ``cpus`` is the number of CPUs that the run could use. ``load_results``
    reads the document back, so that ``write_report`` can run again without
    the evaluation.
    """
    return {
        "command": command,
        "seconds": seconds,
        "cpus": cpus,
        "results": [asdict(result) for result in results],
    }


def usable_cpus() -> int | None:
    """Return the number of CPUs this process may run on, None if unknown."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def load_results(path: Path) -> tuple[list[SeedResult], str, float, int | None]:
    """Read a ``results_document`` file: the results, command, time and CPUs.

    The CPU count is None in a document without one.

    Raises:
        ConfigError: the file cannot be read, is not JSON, or does not contain
            the runs of every method for each seed. Also raised when it names
            an unknown dataset or a seed twice, or when the seeds of one
            dataset differ in their number of teacher rounds.
    """
    expected = (
        "expected the JSON file that dslo-edge evaluate saved when it could not "
        "write its report"
    )
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {error}; {expected}") from error
    if isinstance(document, list):
        raise ConfigError(
            f"{path} is a list, like the results.json that a report writes "
            f"without the per-update curves the plots need; {expected}"
        )
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise ConfigError(f"{path} has no list of results; {expected}")
    try:
        results = [_seed_result(row) for row in document["results"]]
        command = str(document["command"])
        seconds = float(document["seconds"])
        cpus = _cpu_count(document.get("cpus"))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
        raise ConfigError(
            f"{path} is not a complete results file ({type(error).__name__}: "
            f"{error}); {expected}"
        ) from error
    if not results:
        raise ConfigError(f"{path} contains no results; {expected}")
    for result in results:
        missing = [m.name for m in METHODS if m.name not in result.runs]
        if missing:
            raise ConfigError(
                f"{path}: {result.dataset} seed {result.seed} has no runs of "
                f"{', '.join(missing)}; {expected}"
            )
    problem = _inconsistency(results)
    if problem:
        raise ConfigError(f"{path}: {problem}; {expected}")
    return results, command, seconds, cpus


def _cpu_count(value: Any) -> int | None:
    """Return a saved CPU count, or None when it is missing or not a count."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _inconsistency(results: list[SeedResult]) -> str | None:
    """Return what makes the results unfit for one report, or None."""
    rounds: dict[str, tuple[int, int]] = {}
    seen = set()
    for result in results:
        name = f"{result.dataset} seed {result.seed}"
        # The dataset name becomes part of the plot file names.
        if result.dataset not in DATASETS:
            return (
                f"unknown dataset {result.dataset!r}, expected one of "
                f"{', '.join(DATASETS)}"
            )
        if (result.dataset, result.seed) in seen:
            return f"{name} appears twice"
        seen.add((result.dataset, result.seed))
        count = len(result.teacher_test_accuracy)
        if count == 0:
            return f"{name} has no teacher accuracy"
        first_seed, first_count = rounds.setdefault(
            result.dataset, (result.seed, count)
        )
        if count != first_count:
            return (
                f"{name} has {count} teacher rounds, seed {first_seed} has "
                f"{first_count}"
            )
    return None


def _seed_result(row: dict[str, Any]) -> SeedResult:
    runs = {str(name): _run_result(run) for name, run in row["runs"].items()}
    return SeedResult(
        dataset=str(row["dataset"]),
        seed=int(row["seed"]),
        teacher_test_accuracy=[
            _accuracy(value) for value in row["teacher_test_accuracy"]
        ],
        runs=runs,
        seconds=float(row["seconds"]),
    )


def summary_line(dataset: str, entry: dict[str, Any]) -> str:
    """Return the one-line DSL-O minus static KD result that the CLI prints."""
    diff, spread = entry["dslo_minus_static"]
    if len(entry["seeds"]) < 2:
        return (
            f"{dataset}: DSL-O minus static KD {diff:+.1f} points (one seed, no spread)"
        )
    return f"{dataset}: DSL-O minus static KD {diff:+.1f} ± {spread:.1f} points"


def _verdict(dataset: str, entry: dict[str, Any]) -> str:
    diff, spread = entry["dslo_minus_static"]
    if len(entry["seeds"]) < 2:
        if diff == 0:
            return (
                f"On {dataset}, DSL-O and static KD tie in one seed, which gives "
                "no spread: run more seeds before concluding."
            )
        side = "beats" if diff > 0 else "loses to"
        return (
            f"On {dataset}, DSL-O {side} static KD by {abs(diff):.1f} points in "
            "one seed, which gives no spread: run more seeds before concluding."
        )
    if abs(diff) <= spread:
        return (
            f"On {dataset}, DSL-O and static KD are within one standard deviation "
            f"of each other ({diff:+.1f} ± {spread:.1f} points): no clear winner."
        )
    side = "beats" if diff > 0 else "loses to"
    return (
        f"On {dataset}, DSL-O {side} static KD by {abs(diff):.1f} ± {spread:.1f} "
        "points."
    )


def _seeds(count: int) -> str:
    return "1 seed (so no standard deviation)" if count == 1 else f"{count} seeds"


def _tuning(command: str) -> str:
    """Return the page's sentence on how hyper-parameters were set."""
    if "--quick" in command.split():
        return (
            "With `--quick`, each method tries one value of each hyper-parameter "
            "(`QUICK_GRID` in `dslo_edge/evaluate.py`), so the validation split "
            "chooses nothing."
        )
    thresholds = ", ".join(f"{value:g}" for value in Grid().drift_thresholds)
    return (
        "Each method's learning rate, temperature and alpha (static KD's "
        "constant alpha, alpha_start of the others) are chosen per seed on a "
        "shifted validation split. So is the drift threshold of DSL-O and of "
        f"its variants that keep the drift boost, among {thresholds} nats "
        f"({DriftBoost().threshold:g} is the library default). Hard labels only "
        "tunes its learning rate alone, and the factory student does not train."
    )


def render_page(
    summary: dict[str, Any],
    command: str,
    seconds: float,
    seeds: int,
    cpus: int | None = None,
) -> str:
    """Return docs/evaluation.md: setup, verdicts, one table per dataset.

    ``cpus`` is the number of CPUs of the run, None if it was not recorded.
    """
    machine = "" if cpus is None else f" with {cpus} CPU{'s' if cpus > 1 else ''}"
    parts = [
        "# Evaluation: DSL-O against static and annealed distillation",
        "",
        f"Regenerate this page and its plots with `{command}` "
        f"(took {seconds / 60:.1f} minutes on a machine{machine}). "
        "`dslo_edge/evaluate.py` describes the methods and "
        "`dslo_edge/eval_data.py` the datasets and device shifts.",
        "",
        "Setup: a factory student trained on clean data adapts on a shifted "
        "device stream (5 teacher rounds, 2 passes over the device data per "
        "round, batches of 32) through the converted LiteRT student and the "
        f"project's `Trainer`. {_tuning(command)} "
        f"Numbers are mean ± sample standard deviation over {_seeds(seeds)}, on "
        "the shifted test split, which no choice looked at. The gap is the "
        "final teacher's test accuracy minus the student's.",
        "",
        "Static KD labels every update with the final teacher. Annealed KD, "
        "DSL-O and its ablations follow the teacher round by round, so they "
        "also train on the weaker early rounds: compare the teacher accuracy "
        "by round under each table with the student accuracy curves.",
        "",
        "## Verdict",
        "",
    ]
    parts += [_verdict(dataset, entry) for dataset, entry in summary.items()]
    for dataset, entry in summary.items():
        parts += [
            "",
            f"## {dataset}",
            "",
            markdown_table(dataset, entry),
            "",
            f"![alpha(t)](evaluation/{dataset}-alpha.png)",
            f"![teacher entropy(t)](evaluation/{dataset}-entropy.png)",
            f"![student accuracy(t)](evaluation/{dataset}-accuracy.png)",
        ]
    return "\n".join(parts) + "\n"


def write_report(
    results: list[SeedResult],
    out: Path,
    command: str,
    seconds: float,
    cpus: int | None = None,
) -> dict[str, Any]:
    """Write evaluation.md, evaluation/*.png and evaluation/results.json.

    ``seconds`` and ``cpus`` are the run's time and number of CPUs, which the
    page states.

    The plots and results.json are written into a staging folder inside
    ``out/evaluation``, and the page into a temporary file in ``out``. Only
    then is each renamed into place within its own folder, so a failed
    write, such as a full disk, leaves an earlier report as it was. SIGINT
    and SIGTERM wait until the last rename, so Ctrl-C leaves the earlier or
    the new report and not a mix of both. Those temporary files of earlier
    writers that were killed are deleted first.
    """
    summary = summarise(results)
    folder = out / "evaluation"
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    staging = make_staging_dir(folder)
    page: Path | None = None
    try:
        page = make_page_file(out)
        written = write_plots(results, staging)
        written.append(staging / "results.json")
        write_json(results, written[-1])
        seeds = len({result.seed for result in results})
        page.write_text(render_page(summary, command, seconds, seeds, cpus))
        with signals_deferred():
            for path in written:
                os.replace(path, folder / path.name)
            os.replace(page, out / "evaluation.md")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if page is not None:
            page.unlink(missing_ok=True)
    return summary


def report_paths(out: Path, datasets: list[str]) -> list[Path]:
    """Return the paths that ``write_report`` replaces for ``datasets``."""
    folder = out / "evaluation"
    plots = [
        folder / f"{dataset}-{field}.png"
        for dataset in datasets
        for field, _, _ in PLOTS
    ]
    return [out / "evaluation.md", folder / "results.json", *plots]


def _run_result(run: dict[str, Any]) -> RunResult:
    def floats(name: str) -> list[float]:
        return [float(value) for value in run.get(name, [])]

    return RunResult(
        method=str(run["method"]),
        values={str(key): float(value) for key, value in run["values"].items()},
        val_accuracy=_accuracy(run["val_accuracy"]),
        test_accuracy=_accuracy(run["test_accuracy"]),
        boosted_updates=int(run.get("boosted_updates", 0)),
        alpha=floats("alpha"),
        entropy=floats("entropy"),
        accuracy=floats("accuracy"),
    )


def _accuracy(value: Any) -> float:
    """Return ``value`` as a float, or raise ValueError outside [0, 1]."""
    accuracy = float(value)
    # NaN fails both comparisons.
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy {value!r} is not a fraction in [0, 1]")
    return accuracy
