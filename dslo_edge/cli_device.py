"""Device-side commands: firmware profiles, flash and metrics reports.

``dslo_edge.cli`` registers these on its ``main`` group. This module imports
``dslo_edge.cli`` only when a command runs, because ``cli`` imports this
module while it is itself being imported.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from dslo_edge.cli_broker import broker_login_options
from dslo_edge.cli_params import FiniteFloatRange
from dslo_edge.config import DEFAULT_QUEUE_SIZE
from dslo_edge.console import EXIT_INTERRUPTED
from dslo_edge.errors import BundleError, OutputPathError

PROFILES_DIR_OPTION = click.option(
    "--profiles-dir",
    type=click.Path(exists=True, file_okay=False),
    help="Directory of firmware profile TOML files (default: firmware_profiles "
    "of the source tree, or $DSLO_EDGE_PROFILES).",
)


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Apply ``dslo_edge.cli.handle_errors`` when the command runs."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from dslo_edge.cli import handle_errors as cli_handle_errors

        return cli_handle_errors(command)(*args, **kwargs)

    return wrapper


def sigterm_interrupts(command: Callable[..., Any]) -> Callable[..., Any]:
    """Apply ``dslo_edge.cli.sigterm_interrupts`` when the command runs."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from dslo_edge.cli import sigterm_interrupts as cli_sigterm_interrupts

        return cli_sigterm_interrupts(command)(*args, **kwargs)

    return wrapper


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


@click.group()
def profiles() -> None:
    """List, show and check firmware profiles of edge boards."""


@profiles.command("list")
@PROFILES_DIR_OPTION
@handle_errors
def list_command(profiles_dir: str | None) -> None:
    """List the known boards with their RAM budget and power figures."""
    from dslo_edge.profiles import list_profiles

    rows = [("NAME", "ARCH", "RAM", "BUDGET", "IDLE-ACTIVE W", "TITLE")]
    for profile in list_profiles(profiles_dir):
        rows.append(
            (
                profile.name,
                profile.architecture,
                f"{profile.ram_mb} MiB",
                f"{profile.budget_ram_mb} MiB",
                f"{profile.idle_watts:g}-{profile.active_watts:g}",
                profile.title,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[-1]]))


@profiles.command("show")
@click.argument("name")
@PROFILES_DIR_OPTION
@handle_errors
def show_command(name: str, profiles_dir: str | None) -> None:
    """Print every field of one profile."""
    from dslo_edge.profiles import load_profile

    profile = load_profile(name, profiles_dir)
    battery = f"{profile.battery_wh:g} Wh" if profile.battery_wh else "none"
    lines = [
        f"{profile.name}: {profile.title}",
        f"  file            {profile.source}",
        f"  architecture    {profile.architecture}, {profile.cores} cores",
        f"  RAM             {profile.ram_mb} MiB (budget {profile.budget_ram_mb} MiB)",
        f"  storage         {profile.storage_mb} MiB "
        f"(budget {profile.budget_storage_mb} MiB)",
        f"  OS              {profile.os_name}: Python {profile.python}, "
        f"numpy {profile.numpy}, glibc {profile.glibc}",
        f"  power           {profile.idle_watts:g} W idle, "
        f"{profile.active_watts:g} W all cores busy",
        f"  battery         {battery}",
        f"  thermal limit   {profile.thermal_limit_c:g} C",
    ]
    for path, unit in profile.power_files:
        lines.append(f"  power sensor    {path} ({unit})")
    for wheel in profile.interpreters:
        lines.append(
            f"  interpreter     {wheel.package} {wheel.version}: Python "
            f"{wheel.python}, numpy {wheel.numpy}, glibc >= {wheel.min_glibc}"
        )
    click.echo("\n".join(lines))


@profiles.command("check")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--profile", "profile_name", required=True, help="Profile name or file.")
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Samples per update the hub sends.",
)
@click.option(
    "--queue-size",
    default=DEFAULT_QUEUE_SIZE,
    show_default=True,
    type=click.IntRange(1, 100000),
    help="Updates the daemon may hold waiting.",
)
@PROFILES_DIR_OPTION
@handle_errors
def check_command(
    bundle: str,
    profile_name: str,
    batch_size: int,
    queue_size: int,
    profiles_dir: str | None,
) -> None:
    """Check that BUNDLE fits a board's RAM and storage and has an interpreter."""
    from dslo_edge.bundle import load_bundle
    from dslo_edge.fit import check_bundle
    from dslo_edge.health import check_bundle_probe
    from dslo_edge.profiles import load_profile

    profile = load_profile(profile_name, profiles_dir)
    loaded = load_bundle(bundle)
    # The daemon does not start with such a probe set, so flash rejects it too.
    check_bundle_probe(loaded)
    report = check_bundle(loaded, profile, batch_size=batch_size, queue_size=queue_size)
    click.echo(f"{bundle} on {profile.name} ({profile.title})")
    click.echo(
        f"  memory   {_mib(report.memory.total)} estimated, budget "
        f"{profile.budget_ram_mb} MiB"
    )
    for part, size in report.memory.as_dict().items():
        if part != "total":
            click.echo(f"    {part:<18} {_mib(size)}")
    click.echo(
        f"  storage  {_mib(report.storage.total)} estimated, budget "
        f"{profile.budget_storage_mb} MiB"
    )
    click.echo(f"  interpreter  {report.interpreter or 'none'}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    for problem in report.problems:
        click.echo(f"  problem: {problem}")
    if not report.fits:
        raise BundleError(f"{bundle} does not fit profile {profile.name}")
    click.echo("  fits")


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--profile", "profile_name", required=True, help="Profile name or file.")
@click.option(
    "--target",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Mounted device root filesystem, or any directory.",
)
@click.option("--device-id", help="Device id for the config (default: profile name).")
@click.option(
    "--broker-host",
    default="127.0.0.1",
    show_default=True,
    help="MQTT broker host name or IP address the device connects to.",
)
@click.option(
    "--broker-port",
    default="1883",
    show_default=True,
    help="MQTT broker TCP port, from 1 to 65535.",
)
@click.option(
    "--replace-config",
    is_flag=True,
    help="Replace an existing device.toml that differs from the generated one, "
    "after copying it to device.toml.bak (default: keep it and write "
    "device.toml.new). A device.toml that an earlier flash generated and "
    "that was not edited since is replaced either way.",
)
@click.option(
    "--this-machine",
    is_flag=True,
    help="Allow --target /, which installs onto the machine that runs flash.",
)
@PROFILES_DIR_OPTION
@handle_errors
def flash(
    bundle: str,
    profile_name: str,
    target: str,
    device_id: str | None,
    broker_host: str,
    broker_port: str,
    replace_config: bool,
    this_machine: bool,
    profiles_dir: str | None,
) -> None:
    """Install BUNDLE, a device config and a systemd unit onto a device root."""
    if _is_this_root(target) and not this_machine:
        raise click.BadParameter(
            f"{target} is the root of this machine, so flash would install the "
            "unit into its /etc/systemd/system; point --target at the device's "
            "mounted root filesystem, such as /mnt/rootfs, or pass --this-machine "
            "when this machine is the device",
            param_hint="--target",
        )
    from dslo_edge.flash import flash as run_flash
    from dslo_edge.flash_config import (
        FlashOptions,
        check_broker_host,
        check_broker_port,
        check_device_id,
    )
    from dslo_edge.profiles import load_profile

    if device_id is not None:
        check_device_id(device_id, "--device-id")
    check_broker_host(broker_host, "--broker-host")
    port = check_broker_port(broker_port, "--broker-port")
    profile = load_profile(profile_name, profiles_dir)
    if device_id is None:
        fix = "; the device id defaults to the profile name, so pass --device-id"
        check_device_id(profile.name, fix=fix)
    options = FlashOptions(device_id or profile.name, broker_host, port)
    result = run_flash(bundle, profile, target, options, replace_config=replace_config)
    click.echo(
        f"installed release {result.release} for {profile.name} into {target}: "
        f"{len(result.changed)} paths written, {len(result.unchanged)} unchanged"
    )
    for path in result.changed:
        click.echo(f"  wrote {path}")
    for path in result.removed:
        click.echo(f"  removed {path}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        "on the device, create the environment the unit runs from a copy of "
        "the dslo-edge source tree in ./dslo-edge, because dslo-edge is not on "
        "PyPI: python3 -m venv /opt/dslo-edge/venv && "
        "/opt/dslo-edge/venv/bin/pip install ./dslo-edge"
    )


def _is_this_root(target: str) -> bool:
    """Return True when ``target`` is this machine's /, also through a bind mount."""
    try:
        return os.path.samefile(target, "/")
    except OSError:
        return False


@click.command()
@click.option(
    "--metrics",
    "metrics_paths",
    required=True,
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Metrics log: one JSON metrics report per line. Repeat it for the "
    "rotated logs (metrics.jsonl.2, metrics.jsonl.1, metrics.jsonl), in any "
    "order: they are read in time order. Reports of devices other than the "
    "one of the last report are left out, with a warning.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the PNG plots.",
)
@handle_errors
def report(metrics_paths: tuple[str, ...], out: str) -> None:
    """Plot latency, adaptation and energy from a metrics log (needs matplotlib)."""
    from dslo_edge.cli import sigterm_as_exit
    from dslo_edge.report import (
        newest_device_reports,
        read_metrics_logs,
        write_report,
    )

    read = read_metrics_logs(metrics_paths)
    records, others = newest_device_reports(read)
    if others:
        counts = ", ".join(f"{name}: {count}" for name, count in others.items())
        click.echo(
            f"warning: left out {sum(others.values())} reports of other devices "
            f"({counts}); the plots show only device {records[-1]['device']}, which "
            "sent the last report read. Give only one device's logs to plot another",
            err=True,
        )
    try:
        # By default SIGTERM ends the process at once and leaves the staging
        # folder beside --out. Raised as SystemExit, it lets write_report delete it.
        with sigterm_as_exit():
            paths = write_report(records, out)
    except OutputPathError as error:
        raise OutputPathError(str(error), option="--out") from error
    count = "1 metrics report" if len(read) == 1 else f"{len(read)} metrics reports"
    plotted = f", plotted {len(records)} of device {records[-1]['device']}"
    click.echo(
        f"read {count} from {', '.join(metrics_paths)}{plotted if others else ''}"
    )
    for path in paths:
        click.echo(f"  wrote {path}")


def _exit_interrupted_after_send(
    transfer_id: str, device_id: str, topic: str
) -> NoReturn:
    """Exit with status 130 and one line on Ctrl-C after every chunk was sent."""
    click.echo(
        f"interrupted after every chunk of transfer {transfer_id} was sent, so "
        f"device {device_id} may still install it; its outcome is the retained "
        f"message on {topic}",
        err=True,
    )
    sys.exit(EXIT_INTERRUPTED)


def _exit_interrupted_during_send(
    transfer_id: str,
    device_id: str,
    acknowledged: tuple[int, int],
    status_topic: str,
) -> NoReturn:
    """Exit with status 130 and one line on Ctrl-C before the last chunk's PUBACK.

    ``acknowledged`` is the chunks the broker acknowledged and the chunk
    count. ``sigterm_interrupts`` turns the status into 143 on SIGTERM.
    """
    done, count = acknowledged
    if done == count - 1:
        # Only the last PUBACK is missing, and the broker may have received
        # that chunk and delivered the whole transfer.
        click.echo(
            f"interrupted after the broker acknowledged {done} of {count} chunks "
            f"of transfer {transfer_id}, but the last chunk may have reached it, "
            f"so device {device_id} may still install it; its outcome is the "
            f"retained message on {status_topic}",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    # OtaReceiver keeps the stored chunks until another transfer starts, and
    # each ota-send run sends a new transfer id, so none of them is reused.
    click.echo(
        f"interrupted after the broker acknowledged {done} of "
        f"{count} chunks of transfer {transfer_id}, so device {device_id} "
        "installs nothing and deletes the chunks it stored when the next "
        "transfer starts; run ota-send again to send the whole bundle",
        err=True,
    )
    sys.exit(EXIT_INTERRUPTED)


@click.command("ota-send")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--device", "device_id", required=True, help="Device id, as in its config."
)
@click.option(
    "--broker",
    default="mqtt://127.0.0.1:1883",
    show_default=True,
    help="Broker URL, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS, port 8883 "
    "by default); a bare HOST[:PORT] means mqtt://.",
)
@broker_login_options
@click.option("--topic-prefix", default="dslo", show_default=True, help="Topic prefix.")
@click.option(
    "--chunk-size",
    default=64 * 1024,
    show_default=True,
    type=click.IntRange(1024, 1024 * 1024),
    help="Bundle bytes per MQTT message.",
)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=FiniteFloatRange(min=1),
    help="Seconds to wait for the broker to acknowledge each chunk, and then "
    "for the device to report the outcome.",
)
@click.option(
    "--hmac-key-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Sign every chunk with the device's key; devices with a key require it.",
)
@click.option(
    "--allow-model-change",
    is_flag=True,
    help="Let the device install a model with another input shape, classes or "
    "heads; it keeps the old model's last checkpoint to switch back.",
)
@handle_errors
@sigterm_interrupts
def ota_send(
    bundle: str,
    device_id: str,
    broker: str,
    login: Any,
    topic_prefix: str,
    chunk_size: int,
    timeout: float,
    hmac_key_file: str | None,
    allow_model_change: bool,
) -> None:
    """Send BUNDLE to a device as an over-the-air model update.

    Waits for the device's outcome and exits non-zero when the device
    rejected or rolled back the update, or reported nothing within --timeout.
    On Ctrl-C or SIGTERM it prints how many chunks the broker acknowledged.
    """
    import uuid
    from pathlib import Path

    import paho.mqtt.client as mqtt

    from dslo_edge.broker_login import broker_settings, start_client
    from dslo_edge.errors import BrokerError
    from dslo_edge.flash_config import check_device_id
    from dslo_edge.ota import ReleaseOptions, chunk_count
    from dslo_edge.ota_sender import (
        StatusWatcher,
        check_outcome,
        pack_bundle,
        send_archive,
    )
    from dslo_edge.protocol import Topics
    from dslo_edge.signing import load_key

    check_device_id(device_id)
    settings = broker_settings(broker, login)
    host, port = settings.host, settings.port
    topics = Topics.for_device(device_id, topic_prefix)
    key = load_key(Path(hmac_key_file)) if hmac_key_file else None
    # Packed before connecting, so an invalid or oversized bundle sends nothing.
    archive = pack_bundle(
        bundle, options=ReleaseOptions(allow_model_change=allow_model_change)
    )
    transfer = uuid.uuid4().bytes
    # The transfer id makes the client id unique. Two ota-send runs for one
    # device with one client id would take the connection from each other
    # every second, and each would lose its status subscription.
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"dslo-edge-{device_id}-ota-{transfer.hex()[:8]}",
    )
    start_client(client, settings, f"ota-send to {device_id}")
    try:
        watcher = StatusWatcher(client, topics)
        watcher.subscribe(timeout)
        acknowledged = 0

        def count_acknowledged(count: int) -> None:
            nonlocal acknowledged
            acknowledged = count

        try:
            sent = send_archive(
                client,
                topics,
                archive,
                transfer,
                chunk_bytes=chunk_size,
                timeout=timeout,
                hmac_key=key,
                stop=lambda: watcher.outcome(transfer.hex()) is not None,
                on_acknowledged=count_acknowledged,
            )
        except KeyboardInterrupt:
            _exit_interrupted_during_send(
                transfer.hex(),
                device_id,
                (acknowledged, chunk_count(len(archive), chunk_size)),
                watcher.topic,
            )
        try:
            click.echo(
                f"sent {bundle} to device {device_id} as transfer {transfer.hex()} "
                f"({sent} chunks, {len(archive)} bytes)"
            )
            status = watcher.wait(transfer.hex(), timeout)
        except KeyboardInterrupt:
            _exit_interrupted_after_send(transfer.hex(), device_id, watcher.topic)
    except (ValueError, RuntimeError) as error:
        raise BrokerError(
            f"sending the bundle to {host}:{port} failed: {error}"
        ) from error
    finally:
        client.disconnect()
        client.loop_stop()
    click.echo(check_outcome(status, topics, device_id, transfer.hex(), timeout))
