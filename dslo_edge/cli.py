"""The ``dslo-edge`` command line."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dslo_edge.errors import ConfigError, DsloError

# sysexits.h EX_CONFIG: a service manager can exclude it from restarts.
EXIT_CONFIG = 78
EXIT_ERROR = 1

logger = logging.getLogger("dslo_edge")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("tensorflow", "absl", "h5py", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a DsloError as one line and exit non-zero; traceback with --verbose."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DsloError as error:
            if click.get_current_context().find_root().params.get("verbose"):
                logger.exception("Command failed")
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_CONFIG if isinstance(error, ConfigError) else EXIT_ERROR)

    return wrapper


@click.group()
@click.option("--verbose", is_flag=True, help="Debug logging and tracebacks on errors.")
@click.version_option(package_name="dslo-edge")
def main(verbose: bool) -> None:
    """Distil a hub teacher into a LiteRT student on an edge device."""
    _configure_logging(verbose)


@main.command()
@click.option(
    "--teacher",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Teacher .keras file.",
)
@click.option(
    "--student",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Student .keras file.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Bundle directory to create.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
@handle_errors
def convert(teacher: str, student: str, out: str, overwrite: bool) -> None:
    """Convert a Keras teacher and student into a bundle (needs the convert extra)."""
    try:
        from converters.bundle import convert_bundle
    except ImportError as error:
        raise ConfigError(
            f"conversion needs TensorFlow ({error}); "
            "install it with: pip install 'dslo-edge[convert]'"
        ) from error
    manifest = convert_bundle(teacher, student, out, overwrite=overwrite)
    student_ops = manifest["student"]["signatures"]["train"]["ops"]
    click.echo(
        f"wrote {out}: {manifest['class_count']} classes, train signature uses "
        f"{len(student_ops)} builtin op types, no Flex ops"
    )


@main.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Device TOML file.",
)
@handle_errors
def run(config_path: str) -> None:
    """Run the edge daemon until SIGTERM or Ctrl-C."""
    from dslo_edge.config import load_config
    from dslo_edge.daemon import EdgeDaemon

    EdgeDaemon(load_config(config_path)).run()


@main.command()
@click.option(
    "--bundle",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Bundle directory; its teacher.tflite is used unless --teacher is given.",
)
@click.option(
    "--teacher",
    "teachers",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Teacher .tflite snapshot; repeat for several rounds, in order.",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help=".npz file with x and optional y and ids arrays.",
)
@click.option(
    "--device", "device_id", required=True, help="Device id, as in its config."
)
@click.option(
    "--broker", default="mqtt://127.0.0.1:1883", show_default=True, help="Broker URL."
)
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Samples per message.",
)
@click.option(
    "--hard-labels", is_flag=True, help="Send the file's y array as hard labels."
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait for the device to process each round.",
)
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds to wait per round.",
)
@handle_errors
def push(
    bundle: str,
    teachers: tuple[str, ...],
    data: str,
    device_id: str,
    broker: str,
    batch_size: int,
    hard_labels: bool,
    wait: bool,
    timeout: float,
) -> None:
    """Publish soft labels from the hub's teacher to one device."""
    from dslo_edge import hub
    from dslo_edge.bundle import load_bundle

    loaded = load_bundle(bundle)
    paths = [Path(t) for t in teachers] or [loaded.teacher_path]
    samples = hub.load_samples(data)
    if not hard_labels:
        samples = hub.SampleSet(samples.x, samples.ids)
    result = hub.push(
        paths,
        loaded.teacher_output_kind,
        samples,
        device_id,
        broker,
        batch_size=batch_size,
        wait=wait,
        timeout=timeout,
    )
    click.echo(
        f"sent {result.messages} messages ({result.samples} samples, "
        f"{result.payload_bytes} bytes) in {result.rounds} rounds"
    )
    if result.device_metrics:
        metrics = result.device_metrics
        click.echo(
            f"device {device_id}: applied {metrics['applied']}, "
            f"rejected {sum(metrics['rejected'].values())}"
        )


@main.command()
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Working directory for models, bundle and state.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Write the report as JSON here (default OUT/report.json).",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Random seed for splits and training.",
)
@click.option(
    "--broker",
    "broker_kind",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    help="Broker to start on loopback.",
)
@handle_errors
def demo(out: str, report_path: str | None, seed: int, broker_kind: str) -> None:
    """Run the whole loop on scikit-learn's digits: train, convert, adapt, report."""
    from dslo_edge.demo import run_demo

    report = run_demo(
        Path(out),
        Path(report_path) if report_path else None,
        seed=seed,
        broker_kind=broker_kind,
    )
    from dslo_edge.demo import format_report

    click.echo(format_report(report))


# Imported here, after main and handle_errors exist, because cli_device
# imports this module when its commands run.
from dslo_edge.cli_device import flash, profiles, report  # noqa: E402

main.add_command(profiles)
main.add_command(flash)
main.add_command(report)


if __name__ == "__main__":
    main()
