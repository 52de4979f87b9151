"""The systemd unit, sd_notify messages and the watchdog exit."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from dslo_edge.cli import main
from dslo_edge.config import render_config
from dslo_edge.daemon import EXIT_WATCHDOG


def test_service_install_writes_notify_unit(tmp_path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "service",
            "install",
            "--unit-dir",
            str(tmp_path),
            "--exec",
            sys.executable,
            "--state-dir",
            "/var/lib/dslo-edge",
            "--user",
            "dslo",
        ],
    )

    assert result.exit_code == 0, result.output
    lines = set((tmp_path / "dslo-edge.service").read_text().splitlines())
    for expected in (
        "Type=notify",
        "WatchdogSec=60",
        "Restart=on-failure",
        "RestartSec=10",
        "StartLimitBurst=5",
        "RestartPreventExitStatus=78",
        "After=network-online.target",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/dslo-edge",
        "User=dslo",
        f"ExecStart={sys.executable} run --config /etc/dslo-edge/device.toml",
    ):
        assert expected in lines, expected


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)
def test_unit_passes_systemd_analyze_verify(tmp_path) -> None:
    CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(tmp_path), "--exec", sys.executable],
    )

    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "dslo-edge.service")],
        capture_output=True,
        text=True,
    )

    problems = [
        line
        for line in result.stderr.splitlines()
        if "dslo-edge.service" in line and "Failed to" not in line
    ]
    assert result.returncode == 0, result.stderr
    assert problems == []


def _config(tmp_path, mlp_pair, broker) -> str:
    path = tmp_path / "device.toml"
    path.write_text(
        render_config("svc", mlp_pair.bundle, tmp_path / "state", broker.port)
    )
    return str(path)


def test_daemon_sends_ready_and_watchdog(tmp_path, mlp_pair, broker) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dslo_edge.cli",
            "run",
            "--config",
            _config(tmp_path, mlp_pair, broker),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    messages = []
    try:
        while len(messages) < 3:
            messages.append(sock.recv(256).decode())
    finally:
        process.terminate()
        process.wait(30)
        sock.close()

    assert messages[0] == "READY=1"
    assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
    assert process.returncode == 0


def test_watchdog_exits_when_trainer_thread_dies(tmp_path, mlp_pair, broker) -> None:
    script = textwrap.dedent(
        f"""
        from dslo_edge.config import load_config
        from dslo_edge.daemon import EdgeDaemon
        daemon = EdgeDaemon(load_config({_config(tmp_path, mlp_pair, broker)!r}))
        def crash():
            raise SystemExit("trainer gone")
        daemon._on_idle = crash
        daemon.run()
        """
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == EXIT_WATCHDOG, result.stderr
    assert "the trainer thread died" in result.stderr
    assert time.monotonic() - started < 30
