"""The systemd unit that runs the edge daemon on a device."""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import sys
from pathlib import Path, PurePosixPath

from dslo_edge.errors import ConfigError

UNIT_NAME = "dslo-edge.service"
DEFAULT_EXEC = PurePosixPath("/opt/dslo-edge/venv/bin/dslo-edge")
SCRIPT_NAME = "dslo-edge"
DEFAULT_CONFIG = PurePosixPath("/etc/dslo-edge/device.toml")
DEFAULT_STATE_DIR = PurePosixPath("/var/lib/dslo-edge")
# sysexits.h EX_CONFIG, the status `dslo-edge run` exits with on a config error.
EXIT_CONFIG = 78
# The user name rule of shadow's useradd (useradd(8) and libmisc/chkname.c): a
# lower-case letter or '_', then lower-case letters, digits, '_' or '-', and
# an optional ending '$' for Samba machine accounts, at most 32 characters.
USER_NAME_PATTERN = re.compile(r"[a-z_][a-z0-9_-]*[$]?")
USER_NAME_MAX_LENGTH = 32
# Characters that make systemd split a word or read it as a quote or escape.
_QUOTE_TRIGGER = re.compile(r"""[\s"'\\]""")
# Directories the system owns. ReadWritePaths= on one of them opens all of it
# to writes, and ReadWritePaths=/ turns the ProtectSystem=strict sandbox off.
SYSTEM_DIRECTORIES = frozenset(
    {
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/lib",
        "/proc",
        "/run",
        "/sbin",
        "/sys",
        "/tmp",
        "/usr",
        "/var",
        "/var/tmp",
    }
)
# Directories that hold other programs' data, which ReadWritePaths= would make
# writable too, or a recursive chown for User= would hand to the service.
SHARED_DIRECTORIES = frozenset(
    {
        "/home",
        "/lib64",
        "/media",
        "/mnt",
        "/opt",
        "/root",
        "/srv",
        "/usr/local",
        "/var/cache",
        "/var/lib",
        "/var/log",
        "/var/spool",
    }
)
# PrivateTmp=yes gives the service new, empty copies of these on every start.
PRIVATE_TMP_DIRECTORIES = frozenset({"/tmp", "/var/tmp"})
# systemd creates each StateDirectory= name below this directory.
STATE_DIRECTORY_ROOT = PurePosixPath("/var/lib")
# Characters that StateDirectory= reads as more than part of a name. systemd 250
# and later read ':' as the start of a symlink path, and quotes and backslashes
# take part in quoting and escapes.
_STATE_DIRECTORY_SPECIAL = re.compile(r"""[:"'\\]""")


def check_unit_path(value: str, option: str) -> PurePosixPath:
    """Return ``value`` as an absolute path to write into a unit file.

    Args:
        value: the path as given.
        option: the option or argument name that error messages name.

    Raises:
        ConfigError: the path is relative or contains a control character,
            which would end the unit file line.
    """
    if not value.startswith("/"):
        raise ConfigError(
            f"{option} {value!r} is not an absolute path; pass the absolute "
            "path that the service will use, starting with /"
        )
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise ConfigError(
            f"{option} {value!r} contains a control character; pass a path "
            "without newlines, tabs or other control characters"
        )
    return PurePosixPath(value)


def check_normalized_path(value: str, option: str) -> PurePosixPath:
    """Return ``value`` as an absolute path without ``.``, ``..`` or extra slashes.

    systemd ignores a ``ReadWritePaths=`` entry that is not normalized
    ("path is not normalized, ignoring", systemd 252), and under
    ``ProtectSystem=strict`` the service then cannot write there.

    Raises:
        ConfigError: the path fails ``check_unit_path`` or is not normalized.
            The message shows the normalized form.
    """
    path = check_unit_path(value, option)
    normalized = "/" + posixpath.normpath(value).lstrip("/")
    if value != normalized:
        raise ConfigError(
            f"{option} {value!r} is not a normalized path; pass {normalized!r}, "
            "without '.' or '..' components or repeated or trailing slashes"
        )
    return path


def check_state_dir(value: str, option: str) -> PurePosixPath:
    """Return ``value`` as the directory for ``ReadWritePaths=``.

    Raises:
        ConfigError: the path fails ``check_normalized_path``, is one of
            ``SYSTEM_DIRECTORIES`` or ``SHARED_DIRECTORIES``, a directory right
            under /usr, or lies below /tmp or /var/tmp.
    """
    path = check_normalized_path(value, option)
    if value in PRIVATE_TMP_DIRECTORIES:
        reason = (
            "PrivateTmp=yes gives the service an empty one on every start, so "
            "its checkpoints would be lost"
        )
    elif value == "/":
        reason = "ReadWritePaths=/ turns the ProtectSystem=strict sandbox off"
    elif value in SYSTEM_DIRECTORIES or path.parent == PurePosixPath("/usr"):
        # Every directory right under /usr, such as /usr/lib or /usr/share,
        # contains files of the system's packages.
        reason = "ReadWritePaths= would let the service write all of it"
    elif value in SHARED_DIRECTORIES:
        raise ConfigError(
            f"{option} {value!r} is a directory that other programs share, and "
            "ReadWritePaths= would let the service write all of it; pass a "
            "directory of the service's own, such as /var/lib/dslo-edge"
        )
    else:
        _reject_below_private_tmp(path, option)
        return path
    raise ConfigError(
        f"{option} {value!r} is a system directory, and {reason}; pass a "
        "directory of the service's own, such as /var/lib/dslo-edge"
    )


def _reject_below_private_tmp(path: PurePosixPath, option: str) -> None:
    """Raise ConfigError for a state directory that PrivateTmp=yes hides."""
    directory = private_tmp_directory(path)
    if directory is not None:
        raise ConfigError(
            f"{option} {str(path)!r} lies below {directory}, but PrivateTmp=yes "
            f"gives the service an empty {directory} on every start, so the "
            "service would not find this directory; pass a directory of the "
            "service's own, such as /var/lib/dslo-edge"
        )


def private_tmp_directory(path: PurePosixPath) -> str | None:
    """Return /tmp or /var/tmp when ``path`` lies in it, else None.

    PrivateTmp=yes gives the service empty copies of both, so it cannot
    find a path there.
    """
    for directory in sorted(PRIVATE_TMP_DIRECTORIES):
        if path.is_relative_to(directory):
            return directory
    return None


def private_tmp_exec_warning(
    executable: str, paths: tuple[PurePosixPath, ...], machine: str
) -> str | None:
    """Return the warning for a script or interpreter that PrivateTmp=yes hides.

    Args:
        executable: the ``--exec`` value, as given.
        paths: the script and the files it runs (``script_paths``).
        machine: where the unit runs, "device" or "hub".
    """
    hidden = [
        str(path)
        for path in dict.fromkeys(paths)
        if private_tmp_directory(path) is not None
    ]
    if not hidden:
        return None
    # A warning, not an error: --exec names the path on the target machine,
    # which may differ from this one's, such as a test run from a venv in /tmp.
    return (
        f"warning: --exec {executable!r} runs {', '.join(hidden)}, in /tmp or "
        "/var/tmp, but PrivateTmp=yes gives the service empty copies of both, so "
        f"the unit fails to start (status 203/EXEC); on the {machine}, install "
        "dslo-edge elsewhere, such as in /opt/dslo-edge/venv, and pass its "
        "dslo-edge script as --exec"
    )


def check_config_path(value: str, option: str) -> PurePosixPath:
    """Return ``value`` as the config file path to write into a unit file.

    Raises:
        ConfigError: the path fails ``check_normalized_path`` or lies in
            /tmp or /var/tmp, which the service cannot see.
    """
    path = check_normalized_path(value, option)
    directory = private_tmp_directory(path)
    if directory is not None:
        raise ConfigError(
            f"{option} {value!r} lies in {directory}, but PrivateTmp=yes gives "
            f"the service an empty {directory} on every start, so the service "
            "would not find the file and exit with status 78; put the config "
            "file elsewhere, such as in /etc/dslo-edge"
        )
    return path


def check_unit_dir(value: str, option: str) -> Path:
    """Return ``value`` as the existing directory to write a unit file into.

    Raises:
        ConfigError: the path does not exist or is not a directory.
    """
    path = Path(value)
    if not path.exists():
        raise ConfigError(
            f"{option} {value!r} does not exist; create it first or check the "
            "path (systemd reads units from /etc/systemd/system)"
        )
    if not path.is_dir():
        raise ConfigError(
            f"{option} {value!r} is not a directory; pass the directory that "
            "systemd reads units from, such as /etc/systemd/system"
        )
    return path


def running_script() -> str:
    """Return the path of the ``dslo-edge`` script that runs this process.

    That is the install the unit should start, even when another
    ``dslo-edge`` comes first on PATH. Under ``python -m dslo_edge.cli`` it
    is the script beside the interpreter, then the one on PATH.
    """
    started_as = Path(sys.argv[0])
    if started_as.name == SCRIPT_NAME and started_as.is_file():
        return os.path.abspath(started_as)
    beside = Path(sys.executable).parent / SCRIPT_NAME
    if beside.is_file():
        return str(beside)
    return shutil.which(SCRIPT_NAME) or sys.argv[0]


def check_user_name(value: str, option: str = "--user") -> str:
    """Return ``value`` if it is a valid user name for ``User=``.

    Raises:
        ConfigError: the name does not match ``USER_NAME_PATTERN`` or is
            longer than ``USER_NAME_MAX_LENGTH`` characters.
    """
    if len(value) > USER_NAME_MAX_LENGTH or not USER_NAME_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{option} {value!r} is not a valid user name; expected at most "
            f"{USER_NAME_MAX_LENGTH} characters: a lower-case letter or '_', then "
            "lower-case letters, digits, '_' or '-', for example dslo"
        )
    return value


def quote_exec_word(word: str) -> str:
    """Return ``word`` written as one argument of a systemd ``Exec*=`` line.

    systemd (systemd.service, "Command lines") splits the line on whitespace
    outside quotes, reads C escapes inside double quotes, expands ``%``
    specifiers and ``$`` variables in every word. ``%%`` and ``$$`` are the
    literal characters. A lone ``;`` (a command separator) is not handled,
    because the units here pass only absolute paths and fixed words.
    """
    return _quote_word(word.replace("$", "$$"))


def quote_path_list_entry(path: PurePosixPath) -> str:
    """Return ``path`` written as one entry of a ``ReadWritePaths=`` list.

    systemd splits the list on whitespace outside quotes and expands ``%``
    specifiers, but not ``$`` variables.
    """
    return _quote_word(str(path))


def _quote_word(word: str) -> str:
    escaped = word.replace("%", "%%")
    if not _QUOTE_TRIGGER.search(word):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _exec_line(*words: str) -> str:
    return " ".join(quote_exec_word(word) for word in words)


def _user_line(user: str | None) -> str:
    return f"User={check_user_name(user, 'user')}\n" if user else ""


def state_directory_name(state_dir: PurePosixPath) -> str | None:
    """Return ``state_dir`` as a ``StateDirectory=`` name, or None if it has none.

    systemd (systemd.exec(5), version 252) creates a ``StateDirectory=``
    below /var/lib and, at every start, changes its owner recursively to
    ``User=``. A directory elsewhere, /var/lib itself and a name with ``:``,
    a quote or a backslash cannot be written that way.
    """
    if state_dir == STATE_DIRECTORY_ROOT:
        return None
    if not state_dir.is_relative_to(STATE_DIRECTORY_ROOT):
        return None
    name = str(state_dir.relative_to(STATE_DIRECTORY_ROOT))
    if _STATE_DIRECTORY_SPECIAL.search(name):
        return None
    return name


def _state_directory_lines(state_dir: PurePosixPath, user: str | None) -> str:
    """Return the ``StateDirectory=`` line that creates ``state_dir`` for ``user``.

    ``ReadWritePaths=`` on a missing directory stops the unit from starting,
    so the line is there for root too. When ``state_dir`` has no
    ``StateDirectory=`` name, the returned text is empty, and the caller has
    to tell the user to create the directory, and with ``User=`` to chown it.
    """
    name = state_directory_name(state_dir)
    if name is None:
        return ""
    if user is None:
        comment = "# systemd creates the state directory when it is missing.\n"
    else:
        comment = (
            "# systemd creates the state directory and, at every start, makes User=\n"
            "# the owner of it and of its content.\n"
        )
    return f"{comment}StateDirectory={_quote_word(name)}\n"


def _check_paths(
    exec_path: PurePosixPath, config_path: PurePosixPath, state_dir: PurePosixPath
) -> None:
    check_unit_path(str(exec_path), "executable path")
    check_config_path(str(config_path), "config path")
    check_state_dir(str(state_dir), "state directory")


# systemd's ProtectHome= hides these directories from the service.
HOME_DIRECTORIES = (
    PurePosixPath("/home"),
    PurePosixPath("/root"),
    PurePosixPath("/run/user"),
)


def script_paths(script: str) -> tuple[PurePosixPath, ...]:
    """Return the files that running ``script`` reads, as far as this machine shows.

    These are the script's resolved path, the interpreter on its ``#!``
    line, and that interpreter's resolved path. A virtualenv's script may
    lie in /opt while its Python links into a home directory, such as a pyenv
    install under /root. Returns nothing when the script is not
    a readable file here.
    """
    path = Path(script)
    try:
        with path.open("rb") as stream:
            first_line = stream.readline(4096)
    except OSError:
        return ()
    found = [os.path.realpath(path)]
    words = first_line[2:].decode(errors="replace").split()
    if not first_line.startswith(b"#!") or not words:
        return (PurePosixPath(found[0]),)
    interpreter = words[0]
    if Path(interpreter).name == "env" and len(words) > 1:
        interpreter = shutil.which(words[1]) or ""
    if interpreter.startswith("/"):
        found += [interpreter, os.path.realpath(interpreter)]
    return tuple(dict.fromkeys(PurePosixPath(item) for item in found))


def _protect_home_lines(*paths: PurePosixPath) -> str:
    """Return the ``ProtectHome=`` line, with a comment when it is read-only.

    ``yes`` hides the home directories from the service. When the script,
    config or state directory lies inside one, the unit uses ``read-only``.
    ``ReadWritePaths=`` still lets the service write its state directory.
    The comment lists each path once, although the executable is usually
    also among ``script_paths``.
    """
    inside = [
        str(path)
        for path in dict.fromkeys(paths)
        if any(path.is_relative_to(home) for home in HOME_DIRECTORIES)
    ]
    if not inside:
        return "ProtectHome=yes\n"
    return (
        "# read-only, because yes would hide these paths inside a home directory:\n"
        f"# {' '.join(inside)}\n"
        "ProtectHome=read-only\n"
    )


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
    read_paths: tuple[PurePosixPath, ...] = (),
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
        read_paths: more files the service reads, such as the script's
            interpreter (``script_paths``). One inside a home directory
            makes ``ProtectHome=read-only``.

    Raises:
        ConfigError: a path is not absolute or contains a control character,
            the config path or state directory is not normalized, the state
            directory is a system directory, or ``user`` is not a valid user
            name.
    """
    _check_paths(exec_path, config_path, state_dir)
    user_line = _user_line(user)
    command = _exec_line(str(exec_path), "run", "--config", str(config_path))
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
ExecStart={command}
{user_line}Restart=on-failure
RestartSec={restart_sec}
# Exit status {EXIT_CONFIG} (EX_CONFIG) means the configuration is invalid, and a
# restart cannot fix that.
RestartPreventExitStatus={EXIT_CONFIG}
NoNewPrivileges=yes
ProtectSystem=strict
{_protect_home_lines(exec_path, config_path, state_dir, *read_paths)}PrivateTmp=yes
ReadWritePaths={quote_path_list_entry(state_dir)}
{_state_directory_lines(state_dir, user)}
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
    watchdog_sec: int = 60,
    read_paths: tuple[PurePosixPath, ...] = (),
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
        watchdog_sec: systemd restarts a worker that sends no WATCHDOG=1 for
            this long; the worker pings at half this period while its
            watchdog thread runs.
        read_paths: other files the worker must read, such as the script's
            interpreter (``script_paths``); one in a home directory makes
            ``ProtectHome`` read-only.

    Raises:
        ConfigError: a path is not absolute or contains a control character,
            the config path or state directory is not normalized, the state
            directory is a system directory, or ``user`` is not a valid user
            name.
    """
    _check_paths(exec_path, config_path, state_dir)
    user_line = _user_line(user)
    command = _exec_line(str(exec_path), "hub", "--config", str(config_path))
    return f"""[Unit]
Description=dslo-edge hub worker %i
After=network-online.target
Wants=network-online.target

[Service]
# The worker sends READY=1 once its teacher is loaded and its threads run. Its
# watchdog thread exits it with status 70 when a thread died or made no
# progress for hub.watchdog_stall_s (300 s by default), and sends WATCHDOG=1
# every WatchdogSec / 2 while none did. WatchdogSec catches a worker whose
# watchdog thread itself no longer runs, so it can be shorter than the
# stall limit.
Type=notify
WatchdogSec={watchdog_sec}
ExecStart={command} --worker-id %i
# SIGHUP makes the worker look for a new teacher version at once.
ExecReload=/bin/kill -HUP $MAINPID
{user_line}Restart=on-failure
RestartSec={restart_sec}
TimeoutStopSec={stop_timeout_sec}
RestartPreventExitStatus={EXIT_CONFIG}
NoNewPrivileges=yes
ProtectSystem=strict
{_protect_home_lines(exec_path, config_path, state_dir, *read_paths)}PrivateTmp=yes
ReadWritePaths={quote_path_list_entry(state_dir)}
{_state_directory_lines(state_dir, user)}
[Install]
WantedBy=multi-user.target
"""


def install_unit(unit_dir: Path, unit_text: str) -> tuple[Path, Path | None]:
    """Write the unit file atomically into the existing ``unit_dir``.

    A unit file there with other content is first copied to
    ``dslo-edge.service.bak`` (or ``.bak.1`` and so on, when an older backup
    with other content is there), which systemd does not read as a unit.

    Returns:
        The path of the unit file, and of the backup or None.
    """
    target = unit_dir / UNIT_NAME
    backup = None
    if target.is_file() and target.read_text() != unit_text:
        existing = target.read_bytes()
        backup = free_backup_path(target.with_name(UNIT_NAME + ".bak"), existing)
        shutil.copy2(target, backup)
    temporary = target.with_name(f".{UNIT_NAME}.tmp")
    temporary.write_text(unit_text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)
    return target, backup


def free_backup_path(first: Path, content: bytes) -> Path:
    """Return the first of ``first``, ``first``.1, ... that is free or has ``content``.

    A backup that already has ``content`` is reused rather than duplicated.
    """
    candidate = first
    number = 0
    while candidate.exists() and not (
        candidate.is_file() and candidate.read_bytes() == content
    ):
        number += 1
        candidate = first.with_name(f"{first.name}.{number}")
    return candidate
