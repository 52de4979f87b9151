"""sd_notify for Type=notify services, without linking libsystemd.

The protocol is one datagram per message to the socket named in
NOTIFY_SOCKET (a leading "@" means the abstract namespace). Outside systemd
the variable is unset and every call does nothing.
"""

from __future__ import annotations

import os
import socket

# sysexits.h EX_SOFTWARE: the status that the device daemon and the hub worker
# exit with when an internal thread died or hung, so the service manager
# restarts them.
EXIT_WATCHDOG = 70


def notify(message: str) -> bool:
    """Send a state string such as "READY=1"; return False outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Return how often to send WATCHDOG=1: half of WatchdogSec, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
