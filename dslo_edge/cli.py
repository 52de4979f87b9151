"""The ``dslo-edge`` command line."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dslo_edge.cli_broker import broker_login_options

# Re-exported, because other command modules import them from here.
from dslo_edge.cli_params import FiniteFloatRange
from dslo_edge.cli_params import file_path_only as file_path_only
from dslo_edge.cli_params import model_file_path as model_file_path
from dslo_edge.cli_params import non_empty_path as non_empty_path
from dslo_edge.errors import (
    BundleError,
    ConfigError,
    DsloError,
    OutputPathError,
    RepresentativeDataError,
    TrainableScopeError,
)
from dslo_edge.signal_deferral import SigtermExit

if TYPE_CHECKING:
    from converters.trainable import TrainableScope
    from dslo_edge.broker_login import BrokerLogin

# sysexits.h EX_CONFIG: a service manager can exclude it from restarts.
EXIT_CONFIG = 78
EXIT_ERROR = 1
# 128 + SIGINT, the shell's status of a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130

logger = logging.getLogger("dslo_edge")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("tensorflow", "absl", "h5py", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up lines off stderr (set before its import).

    oneDNN's notice can only be silenced by turning oneDNN off, which the
    conversion does not need; benchmarks leave it on.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _require_modules(modules: tuple[str, ...], extras: str) -> None:
    """Raise a ConfigError naming the extras to install if a module is missing."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"this command needs {', '.join(missing)}; install them with: "
            f"pip install 'dslo-edge[{extras}]'"
        )


def _trainable_scope(
    _context: click.Context, _parameter: click.Parameter, text: str
) -> TrainableScope:
    """Parse --trainable, or raise BadParameter naming the accepted forms."""
    from converters.trainable import TrainableScope

    try:
        return TrainableScope.parse(text)
    except DsloError as error:
        raise click.BadParameter(str(error), param_hint="--trainable") from error


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Print a DsloError as one line and exit non-zero; traceback with --verbose.

    An OutputPathError becomes click.BadParameter, which exits with status 2.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OutputPathError as error:
            raise click.BadParameter(str(error), param_hint=error.option) from error
        except DsloError as error:
            if click.get_current_context().find_root().params.get("verbose"):
                logger.exception("Command failed")
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_CONFIG if isinstance(error, ConfigError) else EXIT_ERROR)

    return wrapper


@contextlib.contextmanager
def _sigterm_handled_by(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Call ``handler`` on SIGTERM while the block runs, then restore the old one.

    In a thread other than the main thread the block runs unchanged,
    because signal.signal works only in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Raise SigtermExit(143) on SIGTERM while the block runs.

    Python's default action for SIGTERM ends the process at once, so the
    finally blocks that stop the brokers and daemons a command started never
    run and those children keep running. Raising lets them run, and
    InterruptibleGroup prints the line that names the signal.
    """

    def exit_now(signum: int, _frame: Any) -> None:
        raise SigtermExit(128 + signum)

    with _sigterm_handled_by(exit_now):
        yield


class InterruptibleGroup(click.Group):
    """A command group that exits with status 130 and one line on Ctrl-C.

    It also prints one line for the SIGTERM that ``sigterm_as_exit`` raises,
    and exits with status 143.

    click itself prints "Aborted!" and exits with status 1. Commands that
    report what an interrupt left behind, such as push, catch
    KeyboardInterrupt first.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SigtermExit as stop:
            command = ctx.invoked_subcommand or ctx.info_name
            click.echo(
                f"error: dslo-edge {command} stopped on SIGTERM before it completed",
                err=True,
            )
            sys.exit(stop.code)
        except KeyboardInterrupt:
            command = ctx.invoked_subcommand or ctx.info_name
            click.echo(
                f"error: dslo-edge {command} stopped on Ctrl-C (SIGINT) before "
                "it completed",
                err=True,
            )
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=InterruptibleGroup)
@click.option("--verbose", is_flag=True, help="Debug logging and tracebacks on errors.")
@click.version_option(package_name="dslo-edge")
def main(verbose: bool) -> None:
    """Distil a hub teacher into a LiteRT student on an edge device."""
    _configure_logging(verbose)


@main.command()
@click.option(
    "--teacher",
    required=True,
    type=click.Path(exists=True),
    callback=model_file_path,
    help="Teacher .keras or .h5 file.",
)
@click.option(
    "--student",
    required=True,
    type=click.Path(exists=True),
    callback=model_file_path,
    help="Student .keras or .h5 file.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    callback=non_empty_path,
    help="Bundle directory to create, with any missing parent directories.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing bundle; a directory with other files is never replaced.",
)
@click.option(
    "--optimizer",
    default="sgd",
    show_default=True,
    type=click.Choice(["sgd", "momentum", "adam", "adamw"]),
    help="Optimizer that the train signature runs.",
)
@click.option(
    "--momentum",
    default=0.9,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Momentum factor for --optimizer momentum.",
)
@click.option("--nesterov", is_flag=True, help="Nesterov momentum.")
@click.option(
    "--weight-decay",
    default=0.004,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Decoupled weight decay for --optimizer adamw.",
)
@click.option(
    "--clip-global-norm",
    type=click.FloatRange(min=0, min_open=True),
    help="Rescale gradients so their global L2 norm is at most this value.",
)
@click.option(
    "--trainable",
    default="all",
    show_default=True,
    callback=_trainable_scope,
    help="Weights to train: all, from:LAYER, last:N or biases-and-batchnorm.",
)
@click.option(
    "--student-precision",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "float16", "int8"]),
    help="Trainable student file: float16 stores weights as float16 and "
    "trains in float32; int8 cannot train and is rejected.",
)
@click.option(
    "--teacher-precision",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "float16", "int8"]),
    help="Teacher file precision; int8 needs --representative.",
)
@click.option(
    "--int8-student-copy",
    is_flag=True,
    help="Also write an int8 inference-only student; needs --representative.",
)
@click.option(
    "--representative",
    type=click.Path(exists=True, dir_okay=False),
    help=".npz file whose x array calibrates int8 files (a few hundred samples).",
)
@handle_errors
def convert(
    teacher: str,
    student: str,
    out: str,
    overwrite: bool,
    optimizer: str,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    clip_global_norm: float | None,
    trainable: TrainableScope,
    student_precision: str,
    teacher_precision: str,
    int8_student_copy: bool,
    representative: str | None,
) -> None:
    """Convert a Keras teacher and student into a bundle (needs the convert extra)."""
    # The option checks run before the TensorFlow import, which takes seconds.
    int8_options = _int8_options(teacher_precision, int8_student_copy)
    _check_given_options(optimizer, int8=bool(int8_options))
    _check_precision_options(student_precision, int8_options, representative)
    _check_keras_file(teacher, "--teacher")
    _check_keras_file(student, "--student")
    representative_data = _representative_samples(representative)
    _prepare_bundle_dir(Path(out), overwrite)
    _quiet_tensorflow()
    try:
        from converters.bundle import PrecisionOptions
        from converters.optimizers import OptimizerConfig
    except ImportError as error:
        raise ConfigError(
            f"conversion needs TensorFlow ({error}); "
            "install it with: pip install 'dslo-edge[convert]'"
        ) from error
    config = OptimizerConfig(
        optimizer,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        clip_global_norm=clip_global_norm,
    )
    precision = PrecisionOptions(
        student=student_precision,
        teacher=teacher_precision,
        int8_student_copy=int8_student_copy,
        representative_data=representative_data,
    )
    earlier_manifest = _manifest_identity(Path(out))
    try:
        manifest = _convert_bundle_in_place(
            (teacher, student, out),
            overwrite=overwrite,
            optimizer=config,
            trainable=trainable,
            precision=precision,
            representative=representative,
        )
    except (KeyboardInterrupt, SystemExit) as stop:
        signal_name = _stop_signal_name(stop)
        written = _manifest_identity(Path(out))
        if signal_name is None or written in (None, earlier_manifest):
            raise
        # The signal arrived during or just after the final rename, so the
        # bundle is complete. convert_bundle defers it during a swap.
        click.echo(
            f"{signal_name} arrived as the bundle was moved into place, after "
            "the conversion completed",
            err=True,
        )
        from dslo_edge.bundle import MANIFEST_NAME

        manifest = json.loads((Path(out) / MANIFEST_NAME).read_text())
    student_ops = manifest["student"]["signatures"]["train"]["ops"]
    click.echo(
        f"wrote {out}: {_class_summary(manifest)}, train signature uses "
        f"{len(student_ops)} builtin op types, no Flex ops"
    )


def _manifest_identity(out: Path) -> tuple[int, int] | None:
    """Return the device and inode of ``out``'s manifest, or None without one.

    convert writes a new manifest file in its staging directory while any
    earlier bundle still exists, so a manifest with another identity after
    the run is the new bundle's. Modification times would not do, because
    a copied bundle may keep a time ahead of this host's clock.
    """
    from dslo_edge.bundle import MANIFEST_NAME

    try:
        stat = (out / MANIFEST_NAME).stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def _stop_signal_name(stop: BaseException) -> str | None:
    """Return the signal that ``sigterm_as_exit`` or SIGINT raised as ``stop``."""
    if isinstance(stop, KeyboardInterrupt):
        return "Ctrl-C (SIGINT)"
    if isinstance(stop, SystemExit) and stop.code == 128 + signal.SIGTERM:
        return "SIGTERM"
    return None


def _convert_bundle_in_place(
    paths: tuple[str, str, str],
    *,
    overwrite: bool,
    optimizer: Any,
    trainable: TrainableScope,
    precision: Any,
    representative: str | None,
) -> dict[str, Any]:
    """Run convert_bundle, raising its errors as the CLI's, and return the manifest."""
    from converters.bundle import convert_bundle

    teacher, student, out = paths
    # SIGTERM then deletes the staging directory next to --out.
    with sigterm_as_exit():
        try:
            return convert_bundle(
                teacher,
                student,
                out,
                overwrite=overwrite,
                optimizer=optimizer,
                trainable=trainable,
                precision=precision,
                overwrite_hint="--overwrite",
            )
        except RepresentativeDataError as error:
            # The models' input shape is known only once TensorFlow loaded them.
            raise ConfigError(
                f"invalid --representative: {representative}: {error}"
            ) from error
        except OutputPathError as error:
            raise OutputPathError(str(error), option="--out") from error
        except TrainableScopeError as error:
            # The student's layers are known only once TensorFlow loaded it.
            raise click.BadParameter(str(error), param_hint="--trainable") from error


def _int8_options(teacher_precision: str, int8_student_copy: bool) -> list[str]:
    """Return the convert options that request an int8 file."""
    options = []
    if teacher_precision == "int8":
        options.append("--teacher-precision int8")
    if int8_student_copy:
        options.append("--int8-student-copy")
    return options


def _check_precision_options(
    student_precision: str, int8_options: list[str], representative: str | None
) -> None:
    """Reject precision options that the conversion cannot carry out."""
    if student_precision == "int8":
        raise click.BadParameter(
            "an int8 student cannot train, because gradient updates are far "
            "smaller than one int8 step of the weights; choose float32 or "
            "float16, and add --int8-student-copy for an int8 inference copy",
            param_hint="--student-precision",
        )
    if int8_options and representative is None:
        raise click.UsageError(
            "int8 files need --representative FILE.npz, an x array of a few "
            "hundred input samples that calibrates their ranges; add it, or "
            f"drop {' and '.join(int8_options)}"
        )


def _check_given_options(optimizer: str, *, int8: bool) -> None:
    """Reject an option given on the command line that the conversion would ignore."""
    readers = {
        "momentum": "--optimizer momentum",
        "nesterov": "--optimizer momentum",
        "weight_decay": "--optimizer adamw",
        "representative": "--teacher-precision int8 or --int8-student-copy",
    }
    used = set()
    if optimizer == "momentum":
        used |= {"momentum", "nesterov"}
    if optimizer == "adamw":
        used.add("weight_decay")
    if int8:
        used.add("representative")
    context = click.get_current_context()
    for name, reader in readers.items():
        source = context.get_parameter_source(name)
        if source == click.core.ParameterSource.COMMANDLINE and name not in used:
            raise click.UsageError(
                f"--{name.replace('_', '-')} is used only with {reader}; remove "
                "it, or add that choice if you meant it"
            )


def _check_keras_file(path: str, option: str) -> None:
    """Raise ConfigError unless ``path`` can be a model file that Keras loads.

    It rejects a wrong file before the TensorFlow import, which takes
    seconds. Keras 3 chooses the format by the file name's ending.
    """
    expected = "expected a .keras file written by model.save(), or a legacy .h5 file"
    if path.endswith((".h5", ".hdf5")):
        return
    if not path.endswith(".keras"):
        raise ConfigError(
            f"invalid {option} {path}: Keras loads only .keras, .h5 and .hdf5 "
            f"files; {expected}"
        )
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ConfigError(
            f"invalid {option} {path}: the file is not a zip archive; {expected}"
        ) from error
    if "config.json" not in names:
        raise ConfigError(
            f"invalid {option} {path}: the zip archive has no config.json, so "
            f"it is not a saved Keras model; {expected}"
        )


def _prepare_bundle_dir(out: Path, overwrite: bool) -> None:
    """Check --out and create its parents before TensorFlow loads."""
    from converters.output_dir import prepare_output_dir

    try:
        prepare_output_dir(out, overwrite=overwrite, overwrite_hint="--overwrite")
    except OutputPathError as error:
        raise OutputPathError(str(error), option="--out") from error
    except DsloError as error:
        raise ConfigError(str(error)) from error


def _class_summary(manifest: dict[str, Any]) -> str:
    if "heads" not in manifest:
        return f"{manifest['class_count']} classes"
    heads = [f"{h['name']}: {h['class_count']} classes" for h in manifest["heads"]]
    return f"{len(heads)} heads ({', '.join(heads)})"


def _representative_samples(path: str | None) -> Any:
    """Read the x array of --representative as float32, or return None.

    Raises:
        ConfigError: the file is not an .npz archive, or its x is missing,
            empty, not numeric or not finite.
    """
    if path is None:
        return None
    from dslo_edge.hub import load_samples

    try:
        return load_samples(path, read_labels=False).x
    except ConfigError as error:
        raise ConfigError(f"invalid --representative: {error}") from error


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(1, 65536),
    help="Batch size for the memory estimate.",
)
@click.option("--variables", is_flag=True, help="List every variable.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def inspect(bundle: str, batch_size: int, variables: bool, as_json: bool) -> None:
    """Show a bundle's ops, variables, memory estimate and Flex use."""
    import json

    from dslo_edge.inspect import format_report, inspect_bundle

    report = inspect_bundle(bundle, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report, show_variables=variables))


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

    config = load_config(config_path)
    if not config.bundle.is_dir():
        problem = "a file" if config.bundle.exists() else "missing"
        raise ConfigError(
            f"{config_path}: device.bundle {config.bundle} is {problem}; "
            "expected a directory written by 'dslo-edge convert'"
        )
    if config.logging.file is not None:
        _add_log_file(config.logging)
    try:
        daemon = EdgeDaemon(config)
    except BundleError as error:
        # A restart cannot repair a corrupt or incompatible bundle, so exit
        # with EX_CONFIG like a config error and keep systemd from restarting.
        raise ConfigError(str(error)) from error
    sys.exit(daemon.run())


def _add_log_file(settings: Any) -> None:
    """Also log to a size-capped file, rotated at settings.max_bytes."""
    handler = settings.open_file(settings.file, "logging.file")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.getLogger().addHandler(handler)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[list[int]]:
    """Raise KeyboardInterrupt on SIGTERM as on SIGINT while the block runs.

    The yielded list receives the number of each SIGTERM.
    """
    signals: list[int] = []

    def interrupt(signum: int, _frame: Any) -> None:
        signals.append(signum)
        raise KeyboardInterrupt

    with _sigterm_handled_by(interrupt):
        yield signals


def sigterm_interrupts(command: Callable[..., None]) -> Callable[..., None]:
    """Stop a command on SIGTERM as on Ctrl-C, then exit with status 143.

    Python's default action for SIGTERM ends the process at once, so push
    and ota-send would not report what they sent, as they do on Ctrl-C.
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        with _sigterm_as_interrupt() as signals:
            try:
                command(*args, **kwargs)
            except SystemExit as stop:
                if signals and stop.code == EXIT_INTERRUPTED:
                    raise SystemExit(128 + signals[0]) from None
                raise
            except KeyboardInterrupt:
                if not signals:
                    raise
                # The line that InterruptibleGroup prints names Ctrl-C.
                name = click.get_current_context().info_name
                click.echo(
                    f"error: dslo-edge {name} stopped on SIGTERM before it completed",
                    err=True,
                )
                raise SystemExit(128 + signals[0]) from None

    return run


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
    help=".npz file with x and optional y and ids arrays. Without ids, each "
    "sample's id is a hash of its x row, so an input keeps its id across files.",
)
@click.option(
    "--skip-samples",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Leave out the first N samples of --data in every round, to resume "
    "a push that was interrupted after the broker acknowledged N samples.",
)
@click.option(
    "--device", "device_id", required=True, help="Device id, as in its config."
)
@click.option(
    "--broker",
    default="mqtt://127.0.0.1:1883",
    show_default=True,
    help="Broker URL, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS, port 8883 "
    "by default); a bare HOST[:PORT] means mqtt://. Give the login with "
    "--username and --password-file.",
)
@broker_login_options
@click.option(
    "--topic-prefix",
    default="dslo",
    show_default=True,
    help="First level of the device's topics, its mqtt.topic_prefix.",
)
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Samples per message.",
)
@click.option(
    "--hard-labels",
    is_flag=True,
    help="Send the file's y array as hard labels, or its y_<head> arrays for a "
    "student with several heads. A label of -1 marks a sample without a hard "
    "label.",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait for the device to process each round and then to save a "
    "checkpoint, and exit 1 if it rolled back or rejected any update of this "
    "push for a reason other than duplicate. --no-wait publishes without "
    "pacing, so a broker drops the updates beyond its queue limit per client "
    "without an error (mosquitto's max_queued_messages, 1000 by default).",
)
@click.option(
    "--timeout",
    default=120.0,
    show_default=True,
    type=FiniteFloatRange(min=1),
    help="Seconds to wait per round, and for the final checkpoint, which "
    "the device saves after training.checkpoint_idle_s without updates.",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    help="Send only the k largest probabilities per sample (payload version 2).",
)
@click.option(
    "--dp-noise-multiplier",
    type=FiniteFloatRange(min=0, min_open=True),
    help="Add Gaussian noise of this many times the L2 sensitivity sqrt(2) to "
    "every probability vector (needs the hub extra).",
)
@click.option(
    "--dp-epsilon",
    type=FiniteFloatRange(min=0, min_open=True),
    help="Privacy budget per device; a push that would exceed it stops.",
)
@click.option(
    "--dp-delta",
    default=1e-5,
    show_default=True,
    type=FiniteFloatRange(0, 1, min_open=True, max_open=True),
    help="Delta of the (epsilon, delta) privacy guarantee.",
)
@click.option(
    "--dp-ledger",
    type=click.Path(dir_okay=False),
    help="JSON file that keeps the privacy spent per device across pushes.",
)
@click.option(
    "--float16-inputs",
    is_flag=True,
    help="Send inputs as float16, half the bytes (payload version 2).",
)
@click.option(
    "--hmac-key-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Sign updates with this device key (see 'dslo-edge keygen').",
)
@click.option(
    "--mqtt-protocol",
    type=click.Choice(["5", "3.1.1"]),
    default="5",
    show_default=True,
    help="MQTT protocol version of the broker.",
)
@handle_errors
@sigterm_interrupts
def push(
    bundle: str,
    teachers: tuple[str, ...],
    data: str,
    skip_samples: int,
    device_id: str,
    broker: str,
    login: BrokerLogin,
    topic_prefix: str,
    batch_size: int,
    hard_labels: bool,
    wait: bool,
    timeout: float,
    top_k: int | None,
    dp_noise_multiplier: float | None,
    dp_epsilon: float | None,
    dp_delta: float,
    dp_ledger: str | None,
    float16_inputs: bool,
    hmac_key_file: str | None,
    mqtt_protocol: str,
) -> None:
    """Publish soft labels from the hub's teacher to one device."""
    from dslo_edge import hub
    from dslo_edge.broker_login import broker_settings
    from dslo_edge.bundle import load_bundle
    from dslo_edge.protocol import Topics
    from dslo_edge.push_checks import check_top_k
    from dslo_edge.push_progress import counted
    from dslo_edge.signing import load_key

    with _exit_on_sigint_before_push():
        privacy = _private_release(
            device_id, dp_noise_multiplier, dp_epsilon, dp_delta, dp_ledger
        )
        if privacy is not None and hard_labels:
            # Hard labels go out unnoised and uncharged, which would break the
            # (epsilon, delta) guarantee of the private release.
            raise click.BadParameter(
                "a private release sends only noised soft labels, but --hard-labels "
                "would send the file's y unnoised and outside the privacy budget; "
                "drop --hard-labels or the --dp-* options",
                param_hint="--hard-labels",
            )
        broker_settings(broker, login)
        Topics.for_device(device_id, topic_prefix)

        loaded = load_bundle(bundle)
        head_output_kinds = _head_output_kinds(loaded)
        if privacy is not None and head_output_kinds is not None:
            raise ConfigError(
                f"--dp-noise-multiplier, --dp-epsilon and --dp-ledger make private "
                f"labels for single-head students only, but the student of "
                f"{bundle} has several heads ({', '.join(head_output_kinds)}); "
                "drop the --dp-* options to push soft labels to it"
            )
        paths = _checked_teachers(loaded, teachers)
        check_top_k(top_k, loaded)
        samples = _push_samples(loaded, data, hard_labels, skip_samples)
        if float16_inputs:
            _check_float16_range(samples.x, data)
        hmac_key = load_key(Path(hmac_key_file)) if hmac_key_file else None
    try:
        result = hub.push(
            paths,
            loaded.teacher_output_kind,
            samples,
            device_id,
            broker,
            login=login,
            batch_size=batch_size,
            wait=wait,
            timeout=timeout,
            top_k=top_k,
            privacy=privacy,
            hmac_key=hmac_key,
            protocol=5 if mqtt_protocol == "5" else 4,
            input_dtype="float16" if float16_inputs else "float32",
            head_output_kinds=head_output_kinds,
            topic_prefix=topic_prefix,
        )
    except hub.PushInterrupted as interrupt:
        resumable = len(paths) == 1
        click.echo(_interrupted_push(interrupt, skip_samples, resumable), err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(
        f"sent {counted(result.messages, 'message')} "
        f"({counted(result.samples, 'sample')}, "
        f"{counted(result.payload_bytes, 'byte')}) in "
        f"{counted(result.rounds, 'round')}"
    )
    counts = result.device_counts
    if counts is None:
        return
    click.echo(f"device {device_id}: {counts.describe()} of this push's updates")
    if counts.duplicates == 1:
        click.echo(
            "1 duplicate rejection was a copy of an update the device had "
            "already applied, which the broker delivered again after a restart "
            "or reconnect; it is not an error"
        )
    elif counts.duplicates:
        click.echo(
            f"{counts.duplicates} duplicate rejections were copies of updates "
            "the device had already applied, which the broker delivered again "
            "after a restart or reconnect; they are not errors"
        )
    if counts.failed_count:
        advice = "; ".join(counts.hints()) or "its log names each update and reason"
        click.echo(
            f"error: device {device_id} rejected {counts.failed_count} of the "
            f"{counted(result.messages, 'update')} of this push "
            f"({counts.reasons(failed_only=True)}); {advice}",
            err=True,
        )
        sys.exit(EXIT_ERROR)


def _checked_teachers(bundle: Any, teachers: tuple[str, ...]) -> list[Path]:
    """Return the teacher files of a push, each checked against the student."""
    from dslo_edge.push_checks import check_teacher

    if not teachers:
        source = f"the bundle's teacher {bundle.teacher_path}"
        check_teacher(bundle.teacher_path, bundle, source)
        return [bundle.teacher_path]
    for teacher in teachers:
        check_teacher(Path(teacher), bundle, f"--teacher {teacher}")
    return [Path(teacher) for teacher in teachers]


@contextlib.contextmanager
def _exit_on_sigint_before_push() -> Iterator[None]:
    """Exit with status 130 on SIGINT while push loads and checks its inputs.

    Without this, click prints "Aborted!" and exits with status 1.
    """
    try:
        yield
    except KeyboardInterrupt:
        click.echo(
            "interrupted before the push connected to the broker, so nothing "
            "was sent; push again to send all samples",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)


def _interrupted_push(interrupt: Any, skipped: int, resumable: bool) -> str:
    """Return one line on what an interrupted push published, and how to resume.

    ``skipped`` is the --skip-samples of this push. ``resumable`` is true for
    a push of one round, which --skip-samples can resume.
    """
    from dslo_edge.push_progress import counted

    result = interrupt.result
    published = result.messages + interrupt.unacknowledged
    messages = counted(interrupt.total_messages, "message")
    line = (
        f"interrupted: published {published} and the broker acknowledged "
        f"{result.messages} (PUBACK) of the {messages} of this push, "
        f"{result.samples} of its "
        f"{counted(interrupt.total_samples, 'sample')} acknowledged"
    )
    if interrupt.unacknowledged:
        line += (
            f"; the unacknowledged message "
            f"({counted(interrupt.unacknowledged_samples, 'sample')}) may or may "
            "not reach the device"
        )
    if not published:
        return f"{line}. Nothing was sent, so push again to send all of them"
    line += (
        f". Pushing the same file again sends all {messages} again, and the "
        "device trains twice on the samples it already received"
    )
    if resumable and result.samples < interrupt.total_samples:
        line += (
            "; to send only the rest, push again with --skip-samples "
            f"{skipped + result.samples}"
        )
    return line


def _push_samples(bundle: Any, data: str, hard_labels: bool, skip: int = 0) -> Any:
    """Load and check the --data samples; keep their labels only with --hard-labels.

    The labels are ``y``, or one ``y_<head>`` per head of a student with
    several heads. ``skip`` leaves out the first samples after their ids are
    derived, so a sample keeps the id it has in a push of the whole file.
    """
    from dslo_edge import hub

    # Empty for a student with one head.
    heads = bundle.heads
    try:
        samples = hub.load_samples(data, read_labels=hard_labels, heads=list(heads))
    except ConfigError as error:
        raise ConfigError(f"invalid --data: {error}") from error
    if hard_labels and not heads and samples.y is None:
        raise ConfigError(
            f"--hard-labels needs a 'y' array (one class index per sample) in "
            f"--data {data}, which has none; add y to the .npz or drop --hard-labels"
        )
    # Without hard labels the class count is not read, so a multi-head
    # student passes 0.
    class_count = 0 if heads else bundle.class_count
    try:
        hub.check_samples(
            samples, bundle.input_shape, class_count, data, head_classes=heads
        )
    except ConfigError as error:
        raise ConfigError(f"invalid --data: {error}") from error
    return _skipped(samples, skip, data)


def _skipped(samples: Any, skip: int, data: str) -> Any:
    """Return ``samples`` without the first ``skip``, or raise if none are left."""
    if skip == 0:
        return samples
    if skip >= len(samples.x):
        raise click.BadParameter(
            f"{skip} skips all {len(samples.x)} samples of {data}, so nothing is "
            f"left to push; give a number below {len(samples.x)}",
            param_hint="--skip-samples",
        )
    return samples.skip(skip)


def _check_float16_range(x: Any, data: str) -> None:
    """Raise ConfigError before sending if --float16-inputs cannot carry ``x``.

    The encoder would otherwise fail at the first such batch, after the
    earlier batches were sent.
    """
    import numpy as np

    largest = float(np.max(np.abs(x))) if x.size else 0.0
    if largest > float(np.finfo(np.float16).max):
        raise ConfigError(
            f"invalid --data: {data} has an input of magnitude {largest:.3g}, "
            "beyond float16's 65504, so --float16-inputs cannot send it; push "
            "without --float16-inputs or rescale the inputs"
        )


def _head_output_kinds(bundle: Any) -> dict[str, str] | None:
    """Return the teacher output kind per head, or None for a single-head bundle."""
    if not bundle.is_multi_head:
        return None
    from dslo_edge.hub_multihead import head_output_kinds

    return head_output_kinds(bundle.manifest)


def _check_writable_dir(folder: Path, option: str) -> None:
    """Create ``folder`` and write a probe file in it, or raise BadParameter."""
    import tempfile

    if folder.exists() and not folder.is_dir():
        raise click.BadParameter(
            f"{folder} is a file, not a directory; move it away or choose "
            f"another {option}",
            param_hint=option,
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise click.BadParameter(
            f"cannot write into {folder}: {error.strerror or error}; "
            "choose a directory you can write to",
            param_hint=option,
        ) from error


def _private_release(
    device_id: str,
    noise_multiplier: float | None,
    epsilon: float | None,
    delta: float,
    ledger_path: str | None,
) -> Any:
    """Return the privacy settings of a push, or None when no option is given."""
    if noise_multiplier is None and epsilon is None and ledger_path is None:
        return None
    if noise_multiplier is None or epsilon is None or ledger_path is None:
        raise click.BadParameter(
            "private release needs --dp-noise-multiplier, --dp-epsilon and "
            "--dp-ledger together",
            param_hint="--dp-*",
        )
    import numpy as np

    from dslo_edge.privacy import PrivacyLedger, PrivacySettings, PrivateRelease

    settings = PrivacySettings(noise_multiplier, epsilon, delta)
    ledger = PrivacyLedger(settings, ledger_path)
    return PrivateRelease(ledger, device_id, np.random.default_rng())


@main.command()
@click.option("--faults", is_flag=True, required=True, help="Run the fault suite.")
@click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False),
    help="Bundle to run; default: convert a small MLP (needs the convert extra).",
)
@click.option(
    "--out",
    default="selftest-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Work directory for brokers, daemons and their logs.",
)
@click.option("--quick", is_flag=True, help="Fewer updates, kills and fuzz payloads.")
@click.option(
    "--only",
    multiple=True,
    help="Run only this scenario; repeat for several. Default: all.",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    callback=file_path_only,
    help="Also write the table here.",
)
@handle_errors
def selftest(
    faults: bool,
    bundle: str | None,
    out: str,
    quick: bool,
    only: tuple[str, ...],
    report: str | None,
) -> None:
    """Run the daemon against mosquitto under faults and print a table."""
    from dslo_edge.fault_scenarios import SCENARIOS, Scale, format_table, run_suite

    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        raise click.BadParameter(
            f"unknown scenario {unknown[0]}; choose from {', '.join(SCENARIOS)}",
            param_hint="--only",
        )
    # Absolute, because the device configs written under it resolve relative
    # paths against their own folder.
    workdir = Path(out).resolve()
    _check_writable_dir(workdir, "--out")
    if report:
        _check_writable_dir(Path(report).resolve().parent, "--report")
    bundle_path = (
        Path(bundle).resolve() if bundle else _selftest_bundle(workdir / "bundle")
    )
    scale = Scale.quick() if quick else Scale()
    with sigterm_as_exit():
        rows = run_suite(
            workdir,
            bundle_path,
            scale,
            list(only) or None,
            on_row=lambda row: click.echo(
                f"{'pass' if row.passed else 'FAIL'}: {row.scenario}", err=True
            ),
        )
    table = format_table(rows)
    click.echo(table)
    if report:
        Path(report).write_text(table + "\n")
    if not all(row.passed for row in rows):
        sys.exit(EXIT_ERROR)


def _selftest_bundle(path: Path) -> Path:
    """Convert an untrained 64-32-10 MLP pair into a bundle, once."""
    if (path / "manifest.json").is_file():
        return path
    try:
        import keras

        from converters.bundle import convert_bundle
    except ImportError as error:
        raise ConfigError(
            f"no --bundle given and TensorFlow is missing ({error}); pass a "
            "bundle or install the convert extra"
        ) from error
    keras.utils.set_random_seed(0)
    layers = keras.layers
    student = keras.Sequential(
        [keras.Input((64,)), layers.Dense(32, "relu"), layers.Dense(10, "softmax")]
    )
    teacher = keras.Sequential(
        [keras.Input((64,)), layers.Dense(64, "relu"), layers.Dense(10, "softmax")]
    )
    convert_bundle(teacher, student, path, overwrite=True)
    return path


@main.group()
def service() -> None:
    """Install the edge daemon as a systemd service."""


@service.command("install")
@click.option(
    "--unit-dir",
    default="/etc/systemd/system",
    show_default=True,
    help="Existing directory to write dslo-edge.service into.",
)
@click.option(
    "--exec",
    "exec_path",
    help="Path of the dslo-edge script on the device; default: this one.",
)
@click.option(
    "--config",
    "config_path",
    default="/etc/dslo-edge/device.toml",
    show_default=True,
    help="Device TOML file, as an absolute path on the device.",
)
@click.option(
    "--state-dir",
    default="/var/lib/dslo-edge",
    show_default=True,
    help="The only directory the service may write, as an absolute path on the "
    "device; match device.state_dir.",
)
@click.option("--user", help="Run as this user instead of root, e.g. dslo.")
@click.option(
    "--watchdog-sec",
    default=60,
    show_default=True,
    type=click.IntRange(10, 3600),
    help="Restart the daemon when it stops pinging for this many seconds.",
)
@handle_errors
def service_install(
    unit_dir: str,
    exec_path: str | None,
    config_path: str,
    state_dir: str,
    user: str | None,
    watchdog_sec: int,
) -> None:
    """Write dslo-edge.service with a watchdog, restarts and sandboxing."""
    from dslo_edge.service import (
        check_config_path,
        check_state_dir,
        check_unit_dir,
        check_unit_path,
        check_user_name,
        install_unit,
        private_tmp_exec_warning,
        render_unit,
        running_script,
        script_paths,
        state_directory_name,
    )

    executable = exec_path or running_script()
    state_path = check_state_dir(state_dir, "--state-dir")
    exec_unit_path = check_unit_path(executable, "--exec")
    read_paths = script_paths(executable)
    text = render_unit(
        exec_path=exec_unit_path,
        config_path=check_config_path(config_path, "--config"),
        state_dir=state_path,
        user=check_user_name(user, "--user") if user is not None else None,
        watchdog_sec=watchdog_sec,
        read_paths=read_paths,
    )
    directory = check_unit_dir(unit_dir, "--unit-dir")
    try:
        path, backup = install_unit(directory, text)
    except OSError as error:
        raise ConfigError(f"cannot write the unit into {unit_dir}: {error}") from error
    if backup is not None:
        click.echo(
            f"warning: replaced {path}, which differed from the generated unit; "
            f"the previous file is kept as {backup}. Put local settings in a "
            f"drop-in such as {path}.d/local.conf, which install does not change",
            err=True,
        )
    if state_directory_name(state_path) is None:
        click.echo(_create_state_dir_warning(state_dir, user), err=True)
    warning = private_tmp_exec_warning(
        executable, (exec_unit_path, *read_paths), "device"
    )
    if warning is not None:
        click.echo(warning, err=True)
    click.echo(
        f"wrote {path}; enable it with: systemctl daemon-reload && "
        "systemctl enable --now dslo-edge"
    )


def _create_state_dir_warning(state_dir: str, user: str | None) -> str:
    """Return the set-up step for a state dir that StateDirectory= cannot name."""
    quoted = shlex.quote(state_dir)
    reason = (
        "because it covers only directories below /var/lib whose name has no "
        "':', quote or backslash"
    )
    if user is None:
        return (
            f"warning: systemd's StateDirectory= cannot create --state-dir "
            f"{state_dir!r}, {reason}, and the unit does not start while it is "
            f"missing. Before you start the service, run on the device: "
            f"mkdir -p {quoted}"
        )
    return (
        f"warning: the unit runs as user {user!r}, but systemd's StateDirectory= "
        f"cannot give it --state-dir {state_dir!r}, {reason}. "
        "Before you start the service, run on the device: "
        f"mkdir -p {quoted} && chown -R {shlex.quote(user + ':')} {quoted}"
    )


@main.command()
@click.argument("path", type=click.Path(dir_okay=False), callback=file_path_only)
@handle_errors
def keygen(path: str) -> None:
    """Write a new random HMAC key for one device (mode 0600)."""
    from dslo_edge.signing import generate_key_file

    if not path.strip():
        # Path("") is the current directory, so the error would claim the key exists.
        raise click.BadParameter(
            f"expected a file path, got {path!r}", param_hint="'PATH'"
        )
    key_path = Path(path)
    try:
        generate_key_file(key_path)
    except FileExistsError:
        raise ConfigError(
            f"{path} exists, and keygen never overwrites a key; remove the file "
            "first to replace its key (the device and the hub then need the new "
            "one), or choose another path"
        ) from None
    except OSError as error:
        raise OutputPathError(_key_write_error(key_path, error), "'PATH'") from None
    click.echo(f"wrote {path}; give it to the device and to the hub")


def _key_write_error(path: Path, error: OSError) -> str:
    directory = path.parent
    if not directory.exists():
        return (
            f"cannot write {path}: directory {directory} does not exist; "
            "create it first or choose another path"
        )
    if not directory.is_dir():
        return f"cannot write {path}: {directory} is a file, not a directory"
    return f"cannot write {path}: {error.strerror}; choose a writable directory"


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
    callback=file_path_only,
    help="Write the report as JSON here (default OUT/report.json).",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    # numpy.random.seed, which Keras calls, accepts 0 to 2**32 - 1.
    type=click.IntRange(0, 2**32 - 1),
    help="Random seed for splits and training, from 0 to 4294967295.",
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
    _quiet_tensorflow()
    _require_modules(("keras", "sklearn", "scipy"), "convert,demo")
    from dslo_edge.demo import run_demo

    with sigterm_as_exit():
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
from dslo_edge.cli_device import flash, ota_send, profiles, report  # noqa: E402

main.add_command(profiles)
main.add_command(flash)
main.add_command(report)
main.add_command(ota_send)

from dslo_edge.cli_hub import hub  # noqa: E402

main.add_command(hub)

from dslo_edge.cli_bench import bench  # noqa: E402

main.add_command(bench)

from dslo_edge.cli_evaluate import evaluate  # noqa: E402

main.add_command(evaluate)


if __name__ == "__main__":
    from dslo_edge.console import ignore_late_interrupts

    try:
        main()
    finally:
        ignore_late_interrupts()
