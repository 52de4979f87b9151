"""The ``dslo-edge bench`` command; ``dslo_edge.cli`` registers it on ``main``."""

from __future__ import annotations

import time
from pathlib import Path

import click

from dslo_edge.cli_device import handle_errors


@click.command()
@click.option(
    "--quick",
    is_flag=True,
    help="Few repeats and short runs, for CI (under a minute after conversion).",
)
@click.option(
    "--out",
    default="bench-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for bench.json, the bundle, and the broker and daemon logs. "
    "An earlier bench.json there is renamed to bench-previous.json at the start.",
)
@click.option(
    "--message-samples",
    default=32,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Samples per MQTT message in the throughput and latency runs.",
)
@click.option(
    "--tcp-nodelay",
    is_flag=True,
    help="Start mosquitto with set_tcp_nodelay true (Nagle's algorithm off).",
)
@click.option(
    "--queue-size",
    type=click.IntRange(40, 50000),
    help="training.queue_size of the bench's daemons, to compare with the "
    "default of the device config.",
)
@handle_errors
def bench(
    quick: bool,
    out: str,
    message_samples: int,
    tcp_nodelay: bool,
    queue_size: int | None,
) -> None:
    """Measure each performance figure beside its reference and print a table."""
    from dslo_edge.bench import BenchOptions, format_table, run_bench
    from dslo_edge.cli import _check_writable_dir, sigterm_as_exit

    _check_writable_dir(Path(out), "--out")

    options = (
        BenchOptions.quick_run(message_samples, tcp_nodelay, queue_size)
        if quick
        else BenchOptions(
            message_samples=message_samples,
            tcp_nodelay=tcp_nodelay,
            queue_size=queue_size,
        )
    )
    started = time.monotonic()
    with sigterm_as_exit():
        report = run_bench(Path(out), options)
    click.echo(format_table(report))
    click.echo(
        f"wrote {Path(out) / 'bench.json'} in {time.monotonic() - started:.0f} s"
    )
