"""The systemd unit that runs the edge daemon on a device."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

UNIT_NAME = "dslo-edge.service"
DEFAULT_EXEC = PurePosixPath("/opt/dslo-edge/venv/bin/dslo-edge")
DEFAULT_CONFIG = PurePosixPath("/etc/dslo-edge/device.toml")
DEFAULT_STATE_DIR = PurePosixPath("/var/lib/dslo-edge")
# sysexits.h EX_CONFIG, the status `dslo-edge run` exits with on a config error.
EXIT_CONFIG = 78


def render_unit(
    *,
    exec_path: PurePosixPath = DEFAULT_EXEC,
    config_path: PurePosixPath = DEFAULT_CONFIG,
    state_dir: PurePosixPath = DEFAULT_STATE_DIR,
    user: str | None = None,
    restart_sec: int = 10,
    start_limit_burst: int = 5,
    start_limit_interval_sec: int = 600,
    watchdog_sec: int = 60,
) -> str:
    """Return the text of ``dslo-edge.service``.

    Args:
        exec_path: the ``dslo-edge`` console script on the device.
        config_path: the device TOML file on the device.
        state_dir: the only directory the service may write.
        user: run as this user. None runs as root, which reading RAPL energy
            counters needs on Linux 5.10 and later.
        restart_sec: seconds between a failure and the restart.
        start_limit_burst: starts allowed within ``start_limit_interval_sec``
            before systemd stops restarting the service.
        start_limit_interval_sec: the window for ``start_limit_burst``.
        watchdog_sec: systemd restarts the daemon when it sends no
            WATCHDOG=1 for this long; the daemon pings at half this period
            while its trainer and MQTT threads are healthy.
    """
    user_line = f"User={user}\n" if user else ""
    return f"""[Unit]
Description=dslo-edge on-device distillation daemon
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec={start_limit_interval_sec}
StartLimitBurst={start_limit_burst}

[Service]
# The daemon sends READY=1 once its state is restored and WATCHDOG=1 while
# its threads are healthy; it exits with status 70 when one dies.
Type=notify
NotifyAccess=main
WatchdogSec={watchdog_sec}
TimeoutStopSec=90
ExecStart={exec_path} run --config {config_path}
{user_line}Restart=on-failure
RestartSec={restart_sec}
# Exit status {EXIT_CONFIG} (EX_CONFIG) means the configuration is invalid, and a
# restart cannot fix that.
RestartPreventExitStatus={EXIT_CONFIG}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths={state_dir}

[Install]
WantedBy=multi-user.target
"""


HUB_UNIT_NAME = "dslo-edge-hub@.service"
DEFAULT_HUB_CONFIG = PurePosixPath("/etc/dslo-edge/hub.toml")
DEFAULT_HUB_STATE_DIR = PurePosixPath("/var/lib/dslo-edge-hub")


def render_hub_unit(
    *,
    exec_path: PurePosixPath = DEFAULT_EXEC,
    config_path: PurePosixPath = DEFAULT_HUB_CONFIG,
    state_dir: PurePosixPath = DEFAULT_HUB_STATE_DIR,
    user: str | None = None,
    restart_sec: int = 2,
    stop_timeout_sec: int = 30,
) -> str:
    """Return the text of the ``dslo-edge-hub@.service`` template unit.

    Each instance is one worker, and its instance name is the worker id:
    ``systemctl enable --now dslo-edge-hub@1 dslo-edge-hub@2`` starts two
    workers that share ``config_path`` and the state file in ``state_dir``.

    Args:
        exec_path: the ``dslo-edge`` console script on the hub.
        config_path: the hub TOML file.
        state_dir: the only directory the service may write; put the hub's
            ``state_file`` here.
        user: run as this user; None runs as root.
        restart_sec: seconds between a crash and the restart. A restarted
            worker resumes its MQTT session and serves the requests it held,
            so keep this short.
        stop_timeout_sec: time to answer the received requests on SIGTERM.
    """
    user_line = f"User={user}\n" if user else ""
    return f"""[Unit]
Description=dslo-edge hub worker %i
After=network-online.target
Wants=network-online.target

[Service]
# The worker sends READY=1 once its teacher is loaded and its threads run.
Type=notify
ExecStart={exec_path} hub --config {config_path} --worker-id %i
# SIGHUP makes the worker look for a new teacher version at once.
ExecReload=/bin/kill -HUP $MAINPID
{user_line}Restart=on-failure
RestartSec={restart_sec}
TimeoutStopSec={stop_timeout_sec}
RestartPreventExitStatus={EXIT_CONFIG}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths={state_dir}

[Install]
WantedBy=multi-user.target
"""


def install_unit(unit_dir: Path, unit_text: str) -> Path:
    """Write the unit file atomically into ``unit_dir`` and return its path."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    target = unit_dir / UNIT_NAME
    temporary = target.with_name(f".{UNIT_NAME}.tmp")
    temporary.write_text(unit_text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)
    return target
