"""The broker login options shared by the commands that connect to a broker."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)

_OPTIONS = (
    click.option("--username", default="", help="User name for the broker login."),
    click.option(
        "--password-file",
        type=_FILE,
        help="File whose first line is the password of --username.",
    ),
    click.option(
        "--tls-ca-file",
        type=_FILE,
        help="CA certificate (PEM) that signed the broker's certificate; "
        "needs an mqtts:// --broker URL.",
    ),
    click.option(
        "--tls-cert-file",
        type=_FILE,
        help="Client certificate (PEM), for brokers that require one.",
    ),
    click.option("--tls-key-file", type=_FILE, help="Key of --tls-cert-file (PEM)."),
)


def broker_login_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --username, --password-file and the --tls-* options to a command.

    The command receives them as one ``login`` argument, a ``BrokerLogin``.
    """

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        username: str,
        password_file: Path | None,
        tls_ca_file: Path | None,
        tls_cert_file: Path | None,
        tls_key_file: Path | None,
        **kwargs: Any,
    ) -> Any:
        # Imported here so that loading the CLI does not import paho.
        from dslo_edge.broker_login import BrokerLogin

        login = BrokerLogin(
            username, password_file, tls_ca_file, tls_cert_file, tls_key_file
        )
        return command(*args, login=login, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper
