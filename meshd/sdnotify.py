"""sd_notify(3) by hand: readiness, status, stopping and watchdog pings to systemd.

systemd passes NOTIFY_SOCKET (a filesystem path, or an abstract name starting with "@") to a
Type=notify service; each notification is one datagram of "KEY=VALUE" lines. Outside systemd
there is no NOTIFY_SOCKET and every call is a cheap no-op, so the daemon calls these
unconditionally. A failed send is logged once and never raised: systemd being unreachable must
not take the daemon down (if it matters, the watchdog will notice).

The watchdog is pinged from the trio loop itself, at half the interval systemd asked for, so
a wedged loop (not just a dead process) gets the service restarted.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

from .quietlog import QuietLogger

log = logging.getLogger(__name__)
_quiet = QuietLogger(log)


def _address(env: Mapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]  # Linux abstract namespace
    return path


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification such as "READY=1" or "STATUS=syncing\\nWATCHDOG=1".

    Returns True if it was sent, False if there is no NOTIFY_SOCKET or the send failed.
    """
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a full queue drops a ping rather than stalling the loop
            sock.sendto(state.encode(), address)
    except OSError as err:
        _quiet.warning(("sd_notify", err.errno), "sd_notify to %s failed: %s", address, err.strerror)
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between the deadlines systemd enforces (WatchdogSec=), or None if not asked.

    WATCHDOG_PID, when set, names the process the watchdog is meant for; a child that
    inherited the environment must not ping on its parent's behalf.
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watched = env.get("WATCHDOG_PID")
    if watched and watched != str(os.getpid() if pid is None else pid):
        return None
    return usec / 1_000_000


async def run_watchdog(*, env: Mapping[str, str] | None = None,
                       task_status: trio.TaskStatus[float | None] = trio.TASK_STATUS_IGNORED) -> None:
    """Ping WATCHDOG=1 every half interval until cancelled; returns at once if not asked.

    task_status.started() reports the interval (None when there is no watchdog).
    """
    interval = watchdog_interval(env)
    task_status.started(interval)
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1", env=env)
        await trio.sleep(interval / 2)


# --- sd_listen_fds(3): sockets systemd opened for us (meshd.socket) -------------------------

SD_LISTEN_FDS_START = 3


def listeners_from_systemd(env: dict[str, str] | None = None) -> list[trio.SocketListener]:
    """The listening stream sockets passed by socket activation (LISTEN_FDS), in fd order.

    Empty when the process was not socket-activated, or when LISTEN_PID names another process
    (the variables were inherited). The variables are removed from os.environ (when env is
    None) so a child process cannot mistake our sockets for its own.
    """
    source = os.environ if env is None else env
    try:
        pid = int(source.get("LISTEN_PID", ""))
        count = int(source.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if env is None:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    listeners = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise OSError(f"socket activation passed fd {fd} which is not a stream socket; "
                          "use ListenStream= in meshd.socket")
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners
