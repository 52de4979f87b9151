"""The ``dslo-edge evaluate`` command; ``dslo_edge.cli`` registers it on ``main``.

This module imports ``dslo_edge.cli`` only when the command runs, because
``cli`` imports this module while it is itself being imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from dslo_edge.cli_device import handle_errors
from dslo_edge.cli_params import non_empty_path
from dslo_edge.errors import DsloError

# The report folder of a quick or partial evaluation without --out.
PARTIAL_EVALUATION_OUT = "evaluate-out"


@click.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    callback=non_empty_path,
    help="Folder for evaluation.md and the evaluation/ plots (default: docs "
    f"for the full run and --from-results, {PARTIAL_EVALUATION_OUT} for a run "
    "with --quick, --seeds or --dataset, so it does not replace the recorded "
    "report).",
)
@click.option(
    "--seeds",
    default=5,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Number of seeds, 0 to N-1.",
)
@click.option(
    "--dataset",
    "datasets",
    multiple=True,
    type=click.Choice(["digits", "segment"]),
    help="Dataset to run; repeat for several (default all).",
)
@click.option(
    "--quick",
    is_flag=True,
    help="One grid point and shorter teacher training, for CI (minutes).",
)
@click.option(
    "--from-results",
    "from_results",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Write the report from results that an earlier run saved, without a new run.",
)
@click.pass_context
@handle_errors
def evaluate(
    context: click.Context,
    out: str | None,
    seeds: int,
    datasets: tuple[str, ...],
    quick: bool,
    from_results: Path | None,
) -> None:
    """Compare DSL-O with static and annealed KD on shifted real data."""
    from dslo_edge.cli import _require_modules, sigterm_as_exit

    run_options = {"seeds": "--seeds", "datasets": "--dataset", "quick": "--quick"}
    passed = [
        option
        for name, option in run_options.items()
        if context.get_parameter_source(name) is not ParameterSource.DEFAULT
    ]
    if out is None:
        out = PARTIAL_EVALUATION_OUT if passed and from_results is None else "docs"
    if from_results is not None:
        if passed:
            raise click.BadParameter(
                f"the saved results fix the seeds and datasets; drop "
                f"{' and '.join(passed)}",
                param_hint="--from-results",
            )
        _report_from_results(from_results, out)
        return
    _require_modules(("keras", "sklearn", "river", "matplotlib"), "convert,eval")
    from dslo_edge.eval_data import DATASETS

    # A repeated --dataset would run again and count as more seeds.
    datasets = tuple(dict.fromkeys(datasets))
    chosen = datasets or DATASETS
    # The run takes minutes, so an unwritable --out is reported before it.
    _check_report_dirs(Path(out))
    _check_report_paths(Path(out), list(chosen))

    # SIGTERM then deletes the run's temporary directory and the report's
    # staging files, as Ctrl-C does.
    with sigterm_as_exit():
        _run_and_report(chosen, datasets, seeds, quick, out)


def _run_and_report(
    chosen: tuple[str, ...],
    datasets: tuple[str, ...],
    seeds: int,
    quick: bool,
    out: str,
) -> None:
    """Run the evaluation of the ``chosen`` datasets and write its report."""
    import time

    from dslo_edge.eval_report import usable_cpus
    from dslo_edge.evaluate import run_evaluation

    started = time.monotonic()
    results = run_evaluation(
        chosen, seeds, quick=quick, progress=lambda line: click.echo(line, err=True)
    )
    command = "dslo-edge evaluate" + (" --quick" if quick else "")
    if seeds != 5:
        command += f" --seeds {seeds}"
    command += "".join(f" --dataset {name}" for name in datasets)
    seconds = time.monotonic() - started
    cpus = usable_cpus()
    _write_evaluation_report(
        results,
        out,
        (command, seconds, cpus),
        lambda: _save_results_elsewhere(results, (command, seconds, cpus), out),
    )


def _report_from_results(path: Path, out: str) -> None:
    """Write the evaluation report from a file of saved results, without a run."""
    from dslo_edge.cli import _require_modules, sigterm_as_exit

    _require_modules(("matplotlib",), "eval")
    written = Path(out) / "evaluation" / "results.json"
    # That file gets the results without their curves, which the report needs.
    if written.exists() and written.samefile(path):
        raise click.BadParameter(
            f"{path} is the results.json that the report writes, so the report "
            "would replace it; move the file out of --out first",
            param_hint="--from-results",
        )
    from dslo_edge.eval_report import load_results

    results, command, seconds, cpus = load_results(path)
    # Checked after the results load, so an invalid file creates no folders.
    _check_report_dirs(Path(out))
    _check_report_paths(Path(out), [result.dataset for result in results])
    with sigterm_as_exit():
        _write_evaluation_report(
            results,
            out,
            (command, seconds, cpus),
            lambda: f"the results stay in {path}",
        )


def _write_evaluation_report(
    results: list[Any],
    out: str,
    run: tuple[str, float, int | None],
    keep_results: Callable[[], str],
) -> None:
    """Write the report into ``out`` and print the summary lines.

    ``run`` is the run's command, seconds and number of CPUs. When the report
    cannot be written, ``keep_results`` returns the end of the error message,
    which names the file that contains the results.
    """
    from dslo_edge.eval_report import summary_line, write_report

    try:
        summary = write_report(results, Path(out), *run)
    except OSError as error:
        raise DsloError(
            f"cannot write the evaluation report: {error}; the files of an "
            f"earlier report in {out} are unchanged; {keep_results()}"
        ) from error
    for dataset, entry in summary.items():
        click.echo(summary_line(dataset, entry))
    click.echo(f"wrote {Path(out) / 'evaluation.md'}")


def _save_results_elsewhere(
    results: list[Any], run: tuple[str, float, int | None], out: str
) -> str:
    """Write the results as JSON into the temporary directory.

    Used when the report cannot be written, so that a run of many minutes is
    not lost. Returns the end of the error message, which names the file and
    the command that writes the report from it.
    """
    import json
    import shlex
    import tempfile

    from dslo_edge.eval_report import results_document

    try:
        handle, name = tempfile.mkstemp(prefix="dslo-evaluation-", suffix=".json")
        with os.fdopen(handle, "w") as file:
            json.dump(results_document(results, *run), file, indent=1)
    except OSError as error:
        return f"saving the results in the temporary directory also failed: {error}"
    return (
        f"the results of every run are saved in {name}; once the error is "
        "fixed, write the report from them with "
        f"dslo-edge evaluate --from-results {shlex.quote(name)} "
        f"--out {shlex.quote(out)}"
    )


def _check_report_paths(out: Path, datasets: list[str]) -> None:
    """Raise BadParameter when a directory or other non-file is at a report path."""
    from dslo_edge.eval_report import report_paths

    for path in report_paths(out, list(dict.fromkeys(datasets))):
        if path.exists() and not path.is_file():
            raise click.BadParameter(
                f"{path} is not a regular file, so the report cannot replace "
                "it; move it away or choose another --out",
                param_hint="--out",
            )


def _check_report_dirs(out: Path) -> None:
    """Check that the report can write its page into ``out`` and plots below it."""
    from dslo_edge.cli import _check_writable_dir

    _check_writable_dir(out / "evaluation", "--out")
    _check_writable_dir(out, "--out")
