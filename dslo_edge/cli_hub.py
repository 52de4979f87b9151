"""The ``dslo-edge hub`` command: run one hub worker, or print its unit.

``dslo_edge.cli`` registers it on its ``main`` group.
"""

from __future__ import annotations

import sys
from pathlib import PurePosixPath

import click

from dslo_edge.cli_device import handle_errors


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Hub TOML file.",
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
    "--exec",
    "exec_path",
    help="With --print-unit: path of the dslo-edge script that the unit starts; "
    "default: this one.",
)
@handle_errors
def hub(
    config_path: str | None,
    worker_id: str | None,
    print_unit: bool,
    exec_path: str | None,
) -> None:
    """Run a hub worker: serve label requests, run pushes, serve the teacher."""
    if exec_path is not None and not print_unit:
        raise click.UsageError("--exec is used only with --print-unit")
    if print_unit:
        from dslo_edge.service import (
            DEFAULT_HUB_CONFIG,
            check_unit_path,
            render_hub_unit,
            running_script,
            script_paths,
        )

        path = PurePosixPath(config_path) if config_path else DEFAULT_HUB_CONFIG
        # By default the unit starts this install, as 'service install' does.
        executable = exec_path or running_script()
        unit = render_hub_unit(
            exec_path=check_unit_path(executable, "--exec"),
            config_path=path,
            read_paths=script_paths(executable),
        )
        click.echo(unit, nl=False)
        return
    if config_path is None:
        raise click.UsageError("--config is required unless --print-unit is given")
    from dslo_edge.hub_config import load_hub_config
    from dslo_edge.hub_service import HubWorker

    config = load_hub_config(config_path, worker_id)
    sys.exit(HubWorker(config).run())
