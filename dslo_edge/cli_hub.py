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
@handle_errors
def hub(config_path: str | None, worker_id: str | None, print_unit: bool) -> None:
    """Run a hub worker: serve label requests, run pushes, serve the teacher."""
    if print_unit:
        from dslo_edge.service import DEFAULT_HUB_CONFIG, render_hub_unit

        path = PurePosixPath(config_path) if config_path else DEFAULT_HUB_CONFIG
        click.echo(render_hub_unit(config_path=path), nl=False)
        return
    if config_path is None:
        raise click.UsageError("--config is required unless --print-unit is given")
    from dslo_edge.hub_config import load_hub_config
    from dslo_edge.hub_service import HubWorker

    config = load_hub_config(config_path, worker_id)
    sys.exit(HubWorker(config).run())
