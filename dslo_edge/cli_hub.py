"""The ``dslo-edge hub`` command: run one hub worker, or print its unit.

``dslo_edge.cli`` registers it on its ``main`` group.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from dslo_edge.cli_device import handle_errors
from dslo_edge.errors import ConfigError, DsloError, RuntimeMissing

if TYPE_CHECKING:
    from dslo_edge.hub_config import HubConfig


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Hub TOML file. With --print-unit: its absolute path on the hub, which "
    "the unit passes to the worker; default: /etc/dslo-edge/hub.toml.",
)
@click.option(
    "--worker-id",
    help="Worker id, unique among the workers on one broker; overrides hub.worker_id.",
)
@click.option(
    "--print-unit",
    is_flag=True,
    help="Print the systemd template unit for hub workers and exit.",
)
@click.option(
    "--show-budget",
    is_flag=True,
    help="Print each device's released samples and spent privacy epsilon, read "
    "from hub.state_file with the [privacy] settings of --config, and exit.",
)
@click.option(
    "--exec",
    "exec_path",
    help="With --print-unit: path of the dslo-edge script that the unit starts; "
    "default: this one.",
)
@click.option(
    "--user",
    help="With --print-unit: run the workers as this user instead of root, e.g. dslo.",
)
@handle_errors
def hub(
    config_path: str | None,
    worker_id: str | None,
    print_unit: bool,
    show_budget: bool,
    exec_path: str | None,
    user: str | None,
) -> None:
    """Run a hub worker: serve label requests, run pushes, serve the teacher."""
    if exec_path is not None and not print_unit:
        raise click.UsageError("--exec is used only with --print-unit")
    if user is not None and not print_unit:
        raise click.UsageError(
            "--user is used only with --print-unit; a worker started by hand "
            "runs as the user who starts it"
        )
    if print_unit and show_budget:
        raise click.UsageError("give --print-unit or --show-budget, not both")
    if print_unit and worker_id is not None:
        raise click.UsageError(
            "--worker-id is not used with --print-unit: the unit is a template, "
            "and each instance name, as in dslo-edge-hub@1, is its worker id"
        )
    if print_unit:
        from dslo_edge.service import (
            DEFAULT_HUB_CONFIG,
            check_config_path,
            check_unit_path,
            check_user_name,
            private_tmp_exec_warning,
            render_hub_unit,
            running_script,
            script_paths,
        )

        path = DEFAULT_HUB_CONFIG
        if config_path is not None:
            path = check_config_path(config_path, "--config")
        # By default the unit starts this install, as 'service install' does.
        executable = exec_path or running_script()
        exec_unit_path = check_unit_path(executable, "--exec")
        read_paths = script_paths(executable)
        unit = render_hub_unit(
            exec_path=exec_unit_path,
            config_path=path,
            user=check_user_name(user, "--user") if user is not None else None,
            read_paths=read_paths,
        )
        warning = private_tmp_exec_warning(
            executable, (exec_unit_path, *read_paths), "hub"
        )
        if warning is not None:
            # The warning goes to stderr, so a unit redirected to a file stays valid.
            click.echo(warning, err=True)
        click.echo(unit, nl=False)
        return
    if config_path is None:
        raise click.UsageError("--config is required unless --print-unit is given")
    from dslo_edge.hub_config import load_hub_config

    config = load_hub_config(config_path, worker_id)
    if show_budget:
        _show_budget(config)
        return
    from dslo_edge.hub_service import HubWorker

    with _naming_config_file(config), _naming_state_file_errors(config):
        worker = HubWorker(config)
    sys.exit(worker.run())


def _show_budget(config: HubConfig) -> None:
    """Print the spent privacy budget of every device in the state file."""
    from dslo_edge.hub_budget import format_budgets, read_budgets

    if config.privacy is None:
        raise ConfigError(
            f"{config.source}: --show-budget needs the [privacy] table that the "
            "workers use, because epsilon depends on its delta and accountant; "
            "without it the workers charge no privacy budget"
        )
    with _naming_config_file(config):
        budgets = read_budgets(config.state_file, config.privacy)
    click.echo(format_budgets(budgets, config.privacy, config.state_file), nl=False)


@contextlib.contextmanager
def _naming_state_file_errors(config: HubConfig) -> Iterator[None]:
    """Turn an SQLite error of the state file at start-up into one line.

    It is a DsloError but not a ConfigError, so the exit status is 1 and
    systemd restarts the worker, because a lock held by another process
    usually ends.
    """
    from dslo_edge import hub_state_file

    try:
        yield
    except sqlite3.OperationalError as error:
        if "locked" in str(error):
            waited_s = hub_state_file.BUSY_TIMEOUT_S
            hint = (
                f"another process held a lock on it for more than {waited_s:g} s; "
                f"find it with 'fuser {config.state_file}' and stop it, or let "
                "it finish, then start this worker again"
            )
        else:
            hint = "check the file and its directory, then start this worker again"
        raise DsloError(
            f"{config.source}: hub.state_file {config.state_file} failed while "
            f"the worker started ({error}); {hint}"
        ) from error


@contextlib.contextmanager
def _naming_config_file(config: HubConfig) -> Iterator[None]:
    """Put the config file in front of a ConfigError that does not name it.

    The worker opens hub.state_file and teacher.path, and the budget report
    opens hub.state_file, in code that does not know which file named them.
    """
    try:
        yield
    except RuntimeMissing:
        raise
    except ConfigError as error:
        if str(error).startswith(f"{config.source}: "):
            raise
        raise ConfigError(f"{config.source}: {error}") from error
