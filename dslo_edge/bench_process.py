"""Process figures of ``dslo-edge bench``: daemon start-up and memory.

The reference is a bare Python process that imports numpy and exits. The
daemon counts as started when it sends ``READY=1`` on ``NOTIFY_SOCKET``, as
it does for systemd, which is after it has restored its checkpoint, loaded
the interpreter and started its MQTT connection.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dslo_edge.errors import DsloError

READY_TIMEOUT_S = 60.0
_BARE_NUMPY = (
    "import numpy\n"
    "for line in open('/proc/self/status'):\n"
    "    if line.startswith('VmHWM:'):\n"
    "        print(int(line.split()[1]) / 1024)\n"
)


def bare_numpy_process() -> tuple[float, float]:
    """Time a Python process that imports numpy and exits.

    Returns:
        Seconds from start to exit, and the process's peak RSS in MiB.
    """
    started = time.perf_counter()
    output = subprocess.run(
        [sys.executable, "-c", _BARE_NUMPY],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return time.perf_counter() - started, float(output.strip())


def daemon_start(config: Path, log: Path) -> tuple[float, float]:
    """Time ``dslo-edge run`` from start to READY=1, then stop it with SIGTERM.

    Returns:
        Seconds to READY=1, and the peak RSS in MiB when READY=1 arrived.
    """
    with tempfile.TemporaryDirectory(prefix="dslo-notify-") as folder:
        address = str(Path(folder) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(address)
            sock.settimeout(READY_TIMEOUT_S)
            env = dict(os.environ, NOTIFY_SOCKET=address)
            with open(log, "ab") as stream:
                started = time.perf_counter()
                process = subprocess.Popen(
                    [sys.executable, "-m", "dslo_edge.cli", "run"]
                    + ["--config", str(config)],
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            try:
                seconds = _wait_ready(sock, started)
                rss = _peak_rss_mb(process.pid)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    return seconds, rss


def _wait_ready(sock: socket.socket, started: float) -> float:
    while True:
        try:
            message = sock.recv(4096)
        except TimeoutError:
            raise DsloError(
                f"the daemon sent no READY=1 within {READY_TIMEOUT_S:g} s"
            ) from None
        if b"READY=1" in message.split(b"\n"):
            return time.perf_counter() - started


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise DsloError(f"/proc/{pid}/status has no VmHWM line")


def thread_cpu_s(pid: int) -> dict[int, float] | None:
    """Return CPU seconds per thread of a process, by thread id.

    Reads ``/proc/PID/task/*/schedstat``, whose first field counts
    nanoseconds on the CPU. Kernels built without scheduler statistics lack
    that file or show 0 there. For them it reads user + system time from
    ``stat``, which counts whole clock ticks (10 ms where ``SC_CLK_TCK`` is
    100). There, a thread busy for less than a tick may read 0. Returns None
    where ``/proc`` has no such entries.
    """
    tick = os.sysconf("SC_CLK_TCK")
    seconds = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            seconds[int(task)] = _task_cpu_s(f"/proc/{pid}/task/{task}", tick)
        except OSError:
            continue  # The thread ended after the listing.
    return seconds


def _task_cpu_s(task: str, tick: int) -> float:
    try:
        with open(f"{task}/schedstat") as schedstat:
            on_cpu_ns = int(schedstat.read().split()[0])
    except (OSError, ValueError, IndexError):
        on_cpu_ns = 0
    if on_cpu_ns > 0:
        return on_cpu_ns / 1e9
    with open(f"{task}/stat") as stat:
        # Fields after the ")" that ends the thread name: utime is the 12th
        # and stime the 13th.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / tick


def cpu_us_per_message(
    before: dict[int, float] | None, after: dict[int, float] | None, messages: int
) -> list[float] | None:
    """Return each thread's CPU microseconds per message, busiest first.

    Values are rounded to 0.1 us. Threads that used less than that per
    message between the two readings are left out.
    """
    if before is None or after is None or messages < 1:
        return None
    used = [after[task] - before.get(task, 0.0) for task in after]
    per_message = (round(seconds / messages * 1e6, 1) for seconds in used)
    return sorted((value for value in per_message if value > 0), reverse=True)


def measure_startup(config: Path, log: Path, repeats: int) -> dict[str, float]:
    """Alternate daemon starts with bare numpy processes and return medians."""
    daemon_s, daemon_mb, bare_s, bare_mb = [], [], [], []
    for _ in range(repeats):
        seconds, rss = bare_numpy_process()
        bare_s.append(seconds)
        bare_mb.append(rss)
        seconds, rss = daemon_start(config, log)
        daemon_s.append(seconds)
        daemon_mb.append(rss)
    return {
        "daemon_s": round(statistics.median(daemon_s), 3),
        "daemon_ready_rss_mb": round(statistics.median(daemon_mb), 1),
        "bare_numpy_s": round(statistics.median(bare_s), 3),
        "bare_numpy_rss_mb": round(statistics.median(bare_mb), 1),
        "repeats": repeats,
    }
