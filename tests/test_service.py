"""The systemd unit, sd_notify messages and the watchdog exit."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import PurePosixPath

import pytest
from click.testing import CliRunner

from dslo_edge.cli import EXIT_CONFIG, main
from dslo_edge.config import render_config
from dslo_edge.errors import ConfigError
from dslo_edge.service import (
    quote_exec_word,
    quote_path_list_entry,
    render_hub_unit,
    render_unit,
    script_paths,
)
from dslo_edge.systemd import EXIT_WATCHDOG

# A script outside /tmp, so that tests run from a venv in /tmp get no warning
# about PrivateTmp=yes. It does not exist here, so its #! line is not read.
DEVICE_SCRIPT = "/usr/local/bin/dslo-edge"


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


def test_service_install_backs_up_edited_unit(tmp_path) -> None:
    arguments = ["service", "install", "--unit-dir", str(tmp_path)]
    arguments += ["--exec", DEVICE_SCRIPT]
    unit = tmp_path / "dslo-edge.service"

    first = CliRunner().invoke(main, arguments)
    generated = unit.read_text()
    again = CliRunner().invoke(main, arguments)
    backup_before_edit = (tmp_path / "dslo-edge.service.bak").exists()
    unit.write_text(generated.replace("RestartSec=10", "RestartSec=30"))
    edited = unit.read_text()
    replaced = CliRunner().invoke(main, arguments)

    assert first.exit_code == again.exit_code == replaced.exit_code == 0
    assert "warning" not in first.output + again.output
    assert not backup_before_edit
    assert unit.read_text() == generated
    assert (tmp_path / "dslo-edge.service.bak").read_text() == edited
    assert f"the previous file is kept as {unit}.bak" in replaced.output
    assert f"drop-in such as {unit}.d/local.conf" in replaced.output


def _console_script(folder) -> str:
    """Write a ``dslo-edge`` script like the one pip installs; return its path."""
    folder.mkdir()
    script = folder / "dslo-edge"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from dslo_edge.console import main\n"
        "sys.exit(main())\n"
    )
    script.chmod(0o755)
    return str(script)


def test_service_install_uses_running_script(tmp_path) -> None:
    running = _console_script(tmp_path / "venv-bin")
    other = _console_script(tmp_path / "path-bin")
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    env = dict(os.environ)
    env["PATH"] = f"{os.path.dirname(other)}{os.pathsep}{env['PATH']}"

    result = subprocess.run(
        [running, "service", "install", "--unit-dir", str(unit_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    lines = (unit_dir / "dslo-edge.service").read_text().splitlines()
    assert f"ExecStart={running} run --config /etc/dslo-edge/device.toml" in lines


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)
@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--config", "/etc/dslo edge/device.toml", "--state-dir", "/var/lib/dslo 1"],
        ["--user", "root", "--state-dir", "/var/lib/dslo 1/kitchen"],
    ],
)
def test_unit_passes_systemd_analyze_verify(tmp_path, options) -> None:
    installed = CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(tmp_path), "--exec", sys.executable]
        + options,
    )
    assert installed.exit_code == 0, installed.output

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


def test_service_install_quotes_path_with_space(tmp_path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "service",
            "install",
            "--unit-dir",
            str(tmp_path),
            "--exec",
            sys.executable,
            "--config",
            "/etc/dslo edge/100% device.toml",
            "--state-dir",
            "/var/lib/dslo edge",
        ],
    )

    assert result.exit_code == 0, result.output
    lines = set((tmp_path / "dslo-edge.service").read_text().splitlines())
    expected_exec = (
        f'ExecStart={sys.executable} run --config "/etc/dslo edge/100%% device.toml"'
    )
    assert expected_exec in lines
    assert 'ReadWritePaths="/var/lib/dslo edge"' in lines


@pytest.mark.parametrize(
    ("word", "written"),
    [
        ("/opt/dslo-edge/venv/bin/dslo-edge", "/opt/dslo-edge/venv/bin/dslo-edge"),
        ("/etc/a b.toml", '"/etc/a b.toml"'),
        ('/etc/say "hi".toml', '"/etc/say \\"hi\\".toml"'),
        ("/etc/back\\slash", '"/etc/back\\\\slash"'),
        ("/etc/it's", '"/etc/it\'s"'),
        ("/etc/50%", "/etc/50%%"),
        ("/etc/$HOME", "/etc/$$HOME"),
    ],
)
def test_quote_exec_word_follows_systemd_rules(word: str, written: str) -> None:
    assert quote_exec_word(word) == written


def test_hub_unit_rejects_relative_config() -> None:
    with pytest.raises(ConfigError) as caught:
        render_hub_unit(config_path=PurePosixPath("hub.toml"))
    assert str(caught.value) == (
        "config path 'hub.toml' is not an absolute path; pass the absolute "
        "path that the service will use, starting with /"
    )


def test_path_list_entry_keeps_dollar() -> None:
    assert quote_path_list_entry(PurePosixPath("/var/lib/$x y")) == '"/var/lib/$x y"'


def test_daemon_module_exports_exit_watchdog() -> None:
    from dslo_edge import daemon

    # Callers that imported the status from the daemon keep working.
    assert daemon.EXIT_WATCHDOG == 70
    assert daemon.EXIT_WATCHDOG == EXIT_WATCHDOG


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--config", "etc/device.toml"],
            "error: --config 'etc/device.toml' is not an absolute path; pass the "
            "absolute path that the service will use, starting with /",
        ),
        (
            ["--state-dir", "relative/dir"],
            "error: --state-dir 'relative/dir' is not an absolute path",
        ),
        (["--exec", "bin/dslo-edge"], "error: --exec 'bin/dslo-edge' is not an"),
        (
            ["--config", "/etc/device.toml\nExecStartPre=/bin/sh"],
            "contains a control character; pass a path without newlines",
        ),
        (
            ["--user", "bad user"],
            "error: --user 'bad user' is not a valid user name; expected at most "
            "32 characters: a lower-case letter or '_', then lower-case letters, "
            "digits, '_' or '-', for example dslo",
        ),
        (["--user", ""], "error: --user '' is not a valid user name"),
        (["--user", "Dslo"], "error: --user 'Dslo' is not a valid user name"),
        (["--user", "a" * 33], "is not a valid user name; expected at most 32"),
    ],
)
def test_service_install_rejects_bad_option(tmp_path, arguments, message) -> None:
    unit_dir = tmp_path / "units"
    result = CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(unit_dir), "--exec", sys.executable]
        + arguments,
    )

    assert result.exit_code == EXIT_CONFIG
    assert message in result.output
    assert len(result.output.splitlines()) == 1
    assert not unit_dir.exists()


@pytest.mark.parametrize("user", ["dslo", "_dslo", "dslo-edge_2", "host$", "a" * 32])
def test_service_install_accepts_user(tmp_path, user: str) -> None:
    result = CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(tmp_path), "--user", user],
    )

    assert result.exit_code == 0, result.output
    assert f"User={user}" in (tmp_path / "dslo-edge.service").read_text()


@pytest.mark.parametrize(
    ("state_dir", "line"),
    [
        ("/var/lib/dslo-edge", "StateDirectory=dslo-edge"),
        ("/var/lib/dslo-edge/kitchen", "StateDirectory=dslo-edge/kitchen"),
        ("/var/lib/dslo 1", 'StateDirectory="dslo 1"'),
        ("/var/lib/100%", "StateDirectory=100%%"),
    ],
)
def test_service_install_user_gets_state_directory(
    tmp_path, state_dir: str, line: str
) -> None:
    result = CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(tmp_path), "--user", "dslo"]
        + ["--state-dir", state_dir, "--exec", DEVICE_SCRIPT],
    )

    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    lines = (tmp_path / "dslo-edge.service").read_text().splitlines()
    assert "User=dslo" in lines
    assert [item for item in lines if item.startswith("StateDirectory=")] == [line]


def test_service_install_root_gets_state_directory(tmp_path) -> None:
    result = CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(tmp_path), "--exec", DEVICE_SCRIPT],
    )

    assert result.exit_code == 0, result.output
    lines = (tmp_path / "dslo-edge.service").read_text().splitlines()
    assert "StateDirectory=dslo-edge" in lines
    assert "ReadWritePaths=/var/lib/dslo-edge" in lines
    assert not any(line.startswith("User=") for line in lines)
    assert "warning" not in result.output


def test_service_install_root_warns_to_create(tmp_path) -> None:
    result = CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(tmp_path), "--state-dir", "/srv/dslo"],
    )

    assert result.exit_code == 0, result.output
    unit = (tmp_path / "dslo-edge.service").read_text()
    assert "StateDirectory=" not in unit
    warning = result.output.splitlines()[0]
    assert warning.startswith(
        "warning: systemd's StateDirectory= cannot create --state-dir '/srv/dslo'"
    )
    assert warning.endswith("run on the device: mkdir -p /srv/dslo")


@pytest.mark.parametrize(
    ("state_dir", "command"),
    [
        ("/srv/dslo", "mkdir -p /srv/dslo && chown -R dslo: /srv/dslo"),
        (
            "/home/pi/dslo state",
            "mkdir -p '/home/pi/dslo state' && chown -R dslo: '/home/pi/dslo state'",
        ),
        ("/var/lib/a:b", "mkdir -p /var/lib/a:b && chown -R dslo: /var/lib/a:b"),
        ("/var/lib/it's", """mkdir -p '/var/lib/it'"'"'s' && chown -R dslo:"""),
    ],
)
def test_service_install_user_warns_to_chown(
    tmp_path, state_dir: str, command: str
) -> None:
    result = CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(tmp_path), "--user", "dslo"]
        + ["--state-dir", state_dir],
    )

    assert result.exit_code == 0, result.output
    unit = (tmp_path / "dslo-edge.service").read_text()
    assert "User=dslo\n" in unit
    assert "StateDirectory=" not in unit
    warning = result.output.splitlines()[0]
    assert warning.startswith(
        f"warning: the unit runs as user 'dslo', but systemd's StateDirectory= "
        f"cannot give it --state-dir {state_dir!r}, because it covers only "
        "directories below /var/lib"
    )
    assert f"run on the device: {command}" in warning


def test_hub_unit_user_gets_state_directory() -> None:
    lines = render_hub_unit(user="dslo").splitlines()

    assert "User=dslo" in lines
    assert "StateDirectory=dslo-edge-hub" in lines
    assert "StateDirectory=dslo-edge-hub" in render_hub_unit().splitlines()


def _config(tmp_path, mlp_pair, broker) -> str:
    path = tmp_path / "device.toml"
    path.write_text(
        render_config("svc", mlp_pair.bundle, tmp_path / "state", broker.port)
    )
    return str(path)


# Seconds to wait for READY=1 from a daemon subprocess.
STARTUP_TIMEOUT_S = 60


def test_daemon_sends_ready_and_watchdog(tmp_path, mlp_pair, broker) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
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
        # The daemon loads its models before READY=1, which can take several
        # seconds on a busy machine. Watchdog pings then come every second.
        sock.settimeout(STARTUP_TIMEOUT_S)
        messages.append(sock.recv(256).decode())
        sock.settimeout(10)
        while len(messages) < 3:
            messages.append(sock.recv(256).decode())
    finally:
        process.terminate()
        process.wait(30)
        sock.close()

    assert messages[0] == "READY=1"
    assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
    assert process.returncode == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_daemon_stop_signal_exits_zero(tmp_path, mlp_pair, broker, signum) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(STARTUP_TIMEOUT_S)
    log_path = tmp_path / "daemon.log"
    config = _config(tmp_path, mlp_pair, broker)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dslo_edge.cli", "run", "--config", config],
            env={**os.environ, "NOTIFY_SOCKET": address},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        ready = sock.recv(256).decode()
        process.send_signal(signum)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        sock.close()

    assert ready == "READY=1"
    # Restart=on-failure does not restart a service that exits with status 0.
    assert process.returncode == 0
    assert f"received signal {int(signum)}, stopping" in log_path.read_text()


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


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--state-dir", "/var/lib/../../etc"],
            "error: --state-dir '/var/lib/../../etc' is not a normalized path; "
            "pass '/etc', without '.' or '..' components or repeated or trailing "
            "slashes",
        ),
        (
            ["--state-dir", "/var/lib/dslo-edge/"],
            "error: --state-dir '/var/lib/dslo-edge/' is not a normalized path; "
            "pass '/var/lib/dslo-edge',",
        ),
        (
            ["--state-dir", "/var/lib/./dslo-edge"],
            "pass '/var/lib/dslo-edge',",
        ),
        (
            ["--state-dir", "//var//lib/dslo-edge"],
            "pass '/var/lib/dslo-edge',",
        ),
        (
            ["--config", "/etc/dslo-edge/../dslo-edge/device.toml"],
            "error: --config '/etc/dslo-edge/../dslo-edge/device.toml' is not a "
            "normalized path; pass '/etc/dslo-edge/device.toml',",
        ),
        (
            ["--config", "/etc//dslo-edge/device.toml"],
            "pass '/etc/dslo-edge/device.toml',",
        ),
        (
            ["--state-dir", "/"],
            "error: --state-dir '/' is a system directory, and ReadWritePaths=/ "
            "turns the ProtectSystem=strict sandbox off; pass a directory of the "
            "service's own, such as /var/lib/dslo-edge",
        ),
        (
            ["--state-dir", "/tmp"],
            "error: --state-dir '/tmp' is a system directory, and PrivateTmp=yes "
            "gives the service an empty one on every start",
        ),
        (["--state-dir", "/var/tmp"], "PrivateTmp=yes gives the service an empty"),
        (
            ["--state-dir", "/tmp/dslo-edge"],
            "error: --state-dir '/tmp/dslo-edge' lies below /tmp, but PrivateTmp=yes "
            "gives the service an empty /tmp on every start, so the service would "
            "not find this directory; pass a directory of the service's own, such "
            "as /var/lib/dslo-edge",
        ),
        (["--state-dir", "/var/tmp/a/b"], "lies below /var/tmp, but PrivateTmp=yes"),
        (
            ["--config", "/tmp/device.toml"],
            "error: --config '/tmp/device.toml' lies in /tmp, but PrivateTmp=yes "
            "gives the service an empty /tmp on every start, so the service would "
            "not find the file and exit with status 78; put the config file "
            "elsewhere, such as in /etc/dslo-edge",
        ),
        (["--config", "/var/tmp/a/device.toml"], "lies in /var/tmp, but PrivateTmp"),
        (
            ["--state-dir", "/etc"],
            "error: --state-dir '/etc' is a system directory, and ReadWritePaths= "
            "would let the service write all of it; pass a directory of the "
            "service's own, such as /var/lib/dslo-edge",
        ),
    ]
    + [
        (["--state-dir", path], f"error: --state-dir '{path}' is a system directory")
        for path in ("/bin", "/boot", "/dev", "/lib", "/proc", "/run", "/sbin")
        + ("/sys", "/usr", "/var")
        + ("/usr/lib", "/usr/share", "/usr/bin")
    ]
    + [
        (
            ["--state-dir", path],
            f"error: --state-dir '{path}' is a directory that other programs share",
        )
        for path in ("/home", "/opt", "/srv", "/var/lib", "/var/log")
    ],
)
def test_service_install_rejects_bad_path(tmp_path, arguments, message) -> None:
    result = CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(tmp_path), "--exec", sys.executable]
        + arguments,
    )

    assert result.exit_code == EXIT_CONFIG
    assert message in result.output
    assert len(result.output.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "state_dir", ["/var/lib/dslo-edge", "/srv/tmp", "/opt/dslo", "/usr/local/dslo"]
)
def test_service_install_accepts_state_dir(tmp_path, state_dir: str) -> None:
    result = CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(tmp_path), "--state-dir", state_dir],
    )

    assert result.exit_code == 0, result.output
    unit = (tmp_path / "dslo-edge.service").read_text()
    assert f"ReadWritePaths={state_dir}\n" in unit


def test_service_install_rejects_missing_unit_dir(tmp_path) -> None:
    unit_dir = tmp_path / "nonexist"
    result = CliRunner().invoke(
        main, ["service", "install", "--unit-dir", str(unit_dir)]
    )

    assert result.exit_code == EXIT_CONFIG
    assert (
        f"error: --unit-dir '{unit_dir}' does not exist; create it first or "
        "check the path" in result.output
    )
    assert len(result.output.splitlines()) == 1
    assert not unit_dir.exists()


def test_service_install_rejects_file_as_unit_dir(tmp_path) -> None:
    unit_file = tmp_path / "units"
    unit_file.write_text("")
    result = CliRunner().invoke(
        main, ["service", "install", "--unit-dir", str(unit_file)]
    )

    assert result.exit_code == EXIT_CONFIG
    assert f"error: --unit-dir '{unit_file}' is not a directory" in result.output
    assert len(result.output.splitlines()) == 1
    assert unit_file.read_text() == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["units"]


def test_render_unit_rejects_unnormalized_state_dir() -> None:
    with pytest.raises(ConfigError) as caught:
        render_unit(state_dir=PurePosixPath("/var/lib/../../etc"))
    assert "state directory '/var/lib/../../etc' is not a normalized path" in str(
        caught.value
    )


@pytest.mark.parametrize(
    ("paths", "protect_home"),
    [
        ({}, "yes"),
        ({"exec_path": PurePosixPath("/homework/bin/dslo-edge")}, "yes"),
        ({"exec_path": PurePosixPath("/home/pi/venv/bin/dslo-edge")}, "read-only"),
        ({"config_path": PurePosixPath("/root/device.toml")}, "read-only"),
        ({"state_dir": PurePosixPath("/run/user/1000/dslo")}, "read-only"),
    ],
)
def test_unit_keeps_home_paths_readable(paths, protect_home: str) -> None:
    for render in (render_unit, render_hub_unit):
        lines = render(**paths).splitlines()

        assert [line for line in lines if line.startswith("ProtectHome=")] == [
            f"ProtectHome={protect_home}"
        ]
        state_dir = paths.get("state_dir")
        if state_dir is not None:
            assert f"ReadWritePaths={state_dir}" in lines


def test_service_install_state_dir_in_home(tmp_path) -> None:
    options = [
        "--exec",
        "/usr/local/bin/dslo-edge",
        "--state-dir",
        "/home/pi/dslo-state",
    ]
    result = CliRunner().invoke(
        main, ["service", "install", "--unit-dir", str(tmp_path), *options]
    )

    assert result.exit_code == 0, result.output
    lines = (tmp_path / "dslo-edge.service").read_text().splitlines()
    assert "ProtectHome=read-only" in lines
    assert "# /home/pi/dslo-state" in lines
    assert "ReadWritePaths=/home/pi/dslo-state" in lines


def test_service_install_reads_script_interpreter(tmp_path) -> None:
    script = tmp_path / "bin" / "dslo-edge"
    script.parent.mkdir()
    script.write_text("#!/home/pi/venv/bin/python\nprint('dslo-edge')\n")
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()

    result = CliRunner().invoke(
        main, ["service", "install", "--unit-dir", str(unit_dir), "--exec", str(script)]
    )

    assert result.exit_code == 0, result.output
    lines = (unit_dir / "dslo-edge.service").read_text().splitlines()
    assert "ProtectHome=read-only" in lines
    assert "# /home/pi/venv/bin/python" in lines
    assert f"ExecStart={script} run --config /etc/dslo-edge/device.toml" in lines


def test_home_paths_comment_lists_each_once() -> None:
    script = PurePosixPath("/home/pi/.local/bin/dslo-edge")
    python = PurePosixPath("/home/pi/.local/bin/python3")
    # The executable again, as script_paths resolves it, and one path twice.
    read_paths = (script, python, python)

    for render in (render_unit, render_hub_unit):
        lines = render(exec_path=script, read_paths=read_paths).splitlines()

        assert f"# {script} {python}" in lines
        assert "ProtectHome=read-only" in lines


def test_hub_print_unit_lists_interpreter_once(tmp_path) -> None:
    script = tmp_path / "bin" / "dslo-edge"
    script.parent.mkdir()
    # Two spellings of one path: the shebang's, and its resolved form.
    script.write_text("#!/home/pi/.local//bin/python3\nprint('dslo-edge')\n")

    result = CliRunner().invoke(main, ["hub", "--print-unit", "--exec", str(script)])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "# /home/pi/.local/bin/python3" in lines
    assert "ProtectHome=read-only" in lines


def test_service_install_warns_exec_in_tmp(tmp_path) -> None:
    result = CliRunner().invoke(
        main,
        ["service", "install", "--unit-dir", str(tmp_path)]
        + ["--exec", "/tmp/venv/bin/dslo-edge"],
    )

    assert result.exit_code == 0, result.output
    lines = (tmp_path / "dslo-edge.service").read_text().splitlines()
    assert (
        "ExecStart=/tmp/venv/bin/dslo-edge run --config /etc/dslo-edge/device.toml"
        in lines
    )
    assert result.output.splitlines()[0] == (
        "warning: --exec '/tmp/venv/bin/dslo-edge' runs /tmp/venv/bin/dslo-edge, "
        "in /tmp or /var/tmp, but PrivateTmp=yes gives the service empty copies "
        "of both, so the unit fails to start (status 203/EXEC); on the device, "
        "install dslo-edge elsewhere, such as in /opt/dslo-edge/venv, and pass "
        "its dslo-edge script as --exec"
    )


def test_hub_print_unit_warns_exec_in_tmp() -> None:
    result = CliRunner().invoke(
        main, ["hub", "--print-unit", "--exec", "/tmp/venv/bin/dslo-edge"]
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("[Unit]\n")
    assert (
        "ExecStart=/tmp/venv/bin/dslo-edge hub --config /etc/dslo-edge/hub.toml "
        "--worker-id %i" in result.stdout.splitlines()
    )
    assert result.stderr.splitlines() == [
        "warning: --exec '/tmp/venv/bin/dslo-edge' runs /tmp/venv/bin/dslo-edge, "
        "in /tmp or /var/tmp, but PrivateTmp=yes gives the service empty copies "
        "of both, so the unit fails to start (status 203/EXEC); on the hub, "
        "install dslo-edge elsewhere, such as in /opt/dslo-edge/venv, and pass "
        "its dslo-edge script as --exec"
    ]


def test_hub_print_unit_no_warning_outside_tmp() -> None:
    result = CliRunner().invoke(
        main, ["hub", "--print-unit", "--exec", "/opt/hub/bin/dslo-edge"]
    )

    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_service_install_warns_interpreter_in_tmp(tmp_path) -> None:
    script = tmp_path / "bin" / "dslo-edge"
    script.parent.mkdir()
    script.write_text("#!/var/tmp/venv/bin/python\nprint('dslo-edge')\n")
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()

    result = CliRunner().invoke(
        main, ["service", "install", "--unit-dir", str(unit_dir), "--exec", str(script)]
    )

    assert result.exit_code == 0, result.output
    warning = result.output.splitlines()[0]
    assert warning.startswith(f"warning: --exec {str(script)!r} runs ")
    assert "/var/tmp/venv/bin/python, in /tmp or /var/tmp" in warning


def test_script_paths_of_missing_script() -> None:
    assert script_paths("/nonexistent/bin/dslo-edge") == ()
