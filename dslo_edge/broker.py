"""Launcher for a local MQTT broker on 127.0.0.1, for the demo and the tests.

Two brokers are supported, each run as a child process so that a broker crash
cannot take down the caller:

- ``mosquitto``: the system binary with a generated configuration file.
- ``amqtt``: the pure-Python amqtt broker, run by this module's entry point
  ``python -m dslo_edge.broker --amqtt PORT``.

Example::

    with Broker.start() as broker:
        client.connect(broker.host, broker.port)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from dslo_edge.errors import BrokerError, ConfigError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
BROKER_KINDS = ("auto", "mosquitto", "amqtt")
# Debian installs mosquitto in /usr/sbin, which is not on a normal user's PATH.
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")

START_TIMEOUT_S = 10.0
# Free ports that ``Broker.start`` tries, because another socket can take a
# port between free_port's check and the broker's bind.
PORT_ATTEMPTS = 3
STOP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 20


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when checked.

    Another process may take the port before the caller binds it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> Path | None:
    """Return the mosquitto binary from PATH or /usr/sbin, or None if missing."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    if os.access(MOSQUITTO_FALLBACK, os.X_OK):
        return MOSQUITTO_FALLBACK
    return None


def amqtt_available() -> bool:
    """Return whether the amqtt package can be imported."""
    return importlib.util.find_spec("amqtt") is not None


def _resolve_kind(kind: str) -> str:
    if kind not in BROKER_KINDS:
        raise ConfigError(
            f"invalid broker kind {kind!r}: expected one of {', '.join(BROKER_KINDS)}"
        )
    if kind == "mosquitto" and find_mosquitto() is None:
        raise BrokerError(
            "mosquitto not found on PATH or at /usr/sbin/mosquitto; install it "
            "(apt-get install mosquitto) or use the amqtt broker "
            "(dslo-edge demo --broker amqtt, or kind='amqtt' in Broker.start)"
        )
    if kind == "amqtt" and not amqtt_available():
        raise BrokerError(
            "amqtt is not installed; install it (pip install amqtt) or use "
            "mosquitto (dslo-edge demo --broker mosquitto, or kind='mosquitto' "
            "in Broker.start)"
        )
    if kind != "auto":
        return kind
    if find_mosquitto() is not None:
        return "mosquitto"
    if amqtt_available():
        return "amqtt"
    raise BrokerError(
        "no MQTT broker available: install mosquitto (apt-get install mosquitto) "
        "or amqtt (pip install amqtt)"
    )


class _PortTaken(BrokerError):
    """The broker's port is in use by another socket."""


def _check_port_free(port: int) -> None:
    # Without this check, a foreign listener on the port would pass the
    # readiness probe before our broker exits with "address in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise _PortTaken(
                f"port {port} on {HOST} is already in use ({exc}); "
                "pass another port or port=None to pick a free one"
            ) from exc


def _mosquitto_config(
    port: int, log_path: Path, persistence: bool, custom: str | None
) -> str:
    if custom is not None:
        lines = [custom.format(port=port, workdir=log_path.parent)]
    else:
        lines = [
            f"listener {port} {HOST}",
            "allow_anonymous true",
            "max_queued_messages 10000",
            "max_inflight_messages 100",
            # Without it, small updates wait for delayed TCP ACKs (20-45 ms).
            "set_tcp_nodelay true",
        ]
    if persistence:
        lines += ["persistence true", f"persistence_location {log_path.parent}/"]
    else:
        lines.append("persistence false")
    lines.append(f"log_dest file {log_path}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Started as root, mosquitto switches to the "mosquitto" user, which
        # cannot write the log file in our private work directory.
        lines.append("user root")
    return "\n".join(lines) + "\n"


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class Broker:
    """A running MQTT broker child process on 127.0.0.1.

    Create one with ``Broker.start``. Use it as a context manager, or call
    ``stop`` when done. ``restart`` stops the process and starts a new one on
    the same port, so that clients can test reconnecting.

    Attributes:
        host: always ``"127.0.0.1"``.
        port: TCP port of the listener.
        kind: ``"mosquitto"`` or ``"amqtt"``.
        workdir: directory with the configuration and log files.
    """

    host = HOST

    def __init__(
        self,
        kind: str,
        port: int,
        workdir: Path,
        owns_workdir: bool,
        persistence: bool = False,
        config_text: str | None = None,
    ):
        """Store the settings; call ``Broker.start`` instead to get a running one."""
        self.persistence = persistence
        self.config_text = config_text
        self.kind = kind
        self.port = port
        self.workdir = workdir
        self._owns_workdir = owns_workdir
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Broker address as ``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """File that the broker process writes its log to."""
        return self.workdir / f"{self.kind}.log"

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, or None when stopped."""
        return self._process.pid if self._process is not None else None

    @classmethod
    def start(
        cls,
        port: int | None = None,
        kind: str = "auto",
        workdir: Path | None = None,
        *,
        persistence: bool = False,
        config_text: str | None = None,
    ) -> Broker:
        """Start a broker on 127.0.0.1 and wait until it accepts TCP connections.

        Args:
            port: TCP port to listen on; None picks a free one, and picks
                another, up to ``PORT_ATTEMPTS`` in all, when the broker
                finds it taken.
            kind: ``"mosquitto"``, ``"amqtt"``, or ``"auto"`` for mosquitto
                when installed, else amqtt.
            workdir: directory for the configuration and log files; None
                creates a temporary directory, removed by ``stop``.
            persistence: mosquitto only; keep sessions and queued messages
                in the work directory across ``restart``.
            config_text: mosquitto only; the configuration to use instead of
                the default anonymous listener, with ``{port}`` and
                ``{workdir}`` placeholders. Log and persistence lines are
                added.

        Raises:
            ConfigError: ``kind`` is not one of ``BROKER_KINDS``.
            BrokerError: the broker is not installed, the port is in use, or
                the broker did not accept connections within 10 s. The
                message includes the end of the broker log.
        """
        resolved = _resolve_kind(kind)
        owns_workdir = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="dslo-broker-"))
        else:
            workdir = Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            broker = cls(
                resolved,
                port or free_port(),
                workdir,
                owns_workdir,
                persistence,
                config_text,
            )
            try:
                broker._launch()
                return broker
            except _PortTaken as error:
                if attempt == attempts:
                    broker.stop()
                    if port:
                        raise
                    raise BrokerError(
                        f"{attempts} free ports on {HOST} were taken before the "
                        f"broker could bind them, the last was port {broker.port} "
                        "(already in use); start it again, and stop whatever "
                        "opens many local sockets if this repeats"
                    ) from error
                # Removing the log keeps the next attempt's errors apart.
                broker._terminate()
                broker.log_path.unlink(missing_ok=True)
                logger.warning(
                    "Retrying the %s broker on another port (%d of %d): %s",
                    resolved,
                    attempt + 1,
                    attempts,
                    error,
                )
            except BaseException:
                broker.stop()
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _launch(self) -> None:
        _check_port_free(self.port)
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = self._command()
        log_file = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._environment(),
            )
        finally:
            log_file.close()
        self._wait_until_ready()
        logger.info(
            "Started %s broker on %s (pid %d)", self.kind, self.url, self._process.pid
        )

    def _command(self) -> list[str]:
        if self.kind == "amqtt":
            return [sys.executable, "-m", "dslo_edge.broker", "--amqtt", str(self.port)]
        config_path = self.workdir / "mosquitto.conf"
        config_path.write_text(
            _mosquitto_config(
                self.port, self.log_path, self.persistence, self.config_text
            )
        )
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto not found on PATH or at /usr/sbin/mosquitto")
        return [str(binary), "-c", str(config_path)]

    def _environment(self) -> dict[str, str]:
        # The amqtt child must import this package even when it is not
        # installed, e.g. when run from a source checkout.
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        existing = env.get("PYTHONPATH")
        env["PYTHONPATH"] = (
            package_root if not existing else os.pathsep.join([package_root, existing])
        )
        return env

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                tail = _tail(self.log_path)
                # mosquitto 2.0.11 logs "Error: Address already in use".
                error = (
                    _PortTaken
                    if "address already in use" in tail.lower()
                    else BrokerError
                )
                raise error(
                    f"{self.kind} broker exited with code {code} while starting "
                    f"on port {self.port}; log tail:\n{tail}"
                )
            if _port_accepts(self.port):
                return
            time.sleep(0.05)
        self._terminate()
        raise BrokerError(
            f"{self.kind} broker did not accept connections on {self.url} within "
            f"{START_TIMEOUT_S:g} s; log tail:\n{_tail(self.log_path)}"
        )

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "%s broker (pid %d) did not stop within %g s after SIGTERM; killing it",
                self.kind,
                process.pid,
                STOP_TIMEOUT_S,
            )
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Stop the broker process and remove its temporary directory, if any.

        Calling ``stop`` again does nothing.
        """
        was_running = self._process is not None
        self._terminate()
        if was_running:
            logger.info("Stopped %s broker on %s", self.kind, self.url)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        """Stop the broker and start it again on the same port.

        Raises:
            BrokerError: the new process did not start; see ``start``.
        """
        self._terminate()
        logger.info("Restarting %s broker on %s", self.kind, self.url)
        self._launch()

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._process is not None else "stopped"
        return f"Broker(kind={self.kind!r}, url={self.url!r}, {state})"


async def _serve_amqtt(port: int) -> None:
    """Run an anonymous amqtt broker on 127.0.0.1:port until SIGTERM or SIGINT."""
    from amqtt.broker import Broker as AmqttBroker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {
                "allow_anonymous": True
            },
        },
    }
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)

    broker = AmqttBroker(config)
    await broker.start()
    logger.info("amqtt broker listening on %s:%d", HOST, port)
    await stop_requested.wait()
    await broker.shutdown()
    logger.info("amqtt broker on %s:%d shut down", HOST, port)


def main(argv: list[str] | None = None) -> int:
    """Run the amqtt broker child process; ``Broker.start`` calls this."""
    parser = argparse.ArgumentParser(
        prog="python -m dslo_edge.broker",
        description="Run an anonymous amqtt MQTT broker on 127.0.0.1.",
    )
    parser.add_argument(
        "--amqtt",
        type=int,
        required=True,
        metavar="PORT",
        help="TCP port on 127.0.0.1 to listen on",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The state machine library behind amqtt logs every transition at INFO.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    asyncio.run(_serve_amqtt(args.amqtt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
