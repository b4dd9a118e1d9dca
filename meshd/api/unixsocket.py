"""The API's unix socket file: bound atomically with its mode and group, never stolen.

A leftover socket file is replaced only when nothing answers on it; the new socket is
bound under a temporary name and renamed into place once its permissions are set.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
from pathlib import Path

import trio

UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


class ApiSocketError(Exception):
    """The API socket cannot be opened (in use by a live daemon, not a socket, bad group...)."""


async def _socket_answers(path: Path) -> bool:
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        with trio.move_on_after(2):
            try:
                await probe.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                return False
            return True
        return True  # a live daemon with a full backlog: still not ours to delete


async def open_unix_listener(path: Path | str, mode: int = 0o600, group: str | None = None,
                             backlog: int = 128) -> trio.SocketListener:
    """Bind the API socket at path with the given mode (and group), atomically.

    A leftover socket file is replaced only after a connect to it is refused; if a daemon
    answers there, raises ApiSocketError rather than stealing its socket. The socket is bound
    under a temporary name, given its mode and group, then renamed into place, so it is never
    reachable with looser permissions.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(temporary)) > UNIX_PATH_MAX:
        raise ApiSocketError(f"{path}: path too long for a unix socket (keep it under ~90 bytes)")
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ApiSocketError(f"socket group {group!r} does not exist (create it, or unset socket_group)") from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750 if group else 0o700)
    try:
        existing = path.lstat()
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ApiSocketError(f"{path} exists and is not a socket; move it away")
        if await _socket_answers(path):
            raise ApiSocketError(f"another meshd is already serving on {path}; stop it first")
        path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        temporary.unlink(missing_ok=True)
        await sock.bind(str(temporary))
        os.chmod(temporary, mode)
        if gid != -1:
            os.chown(temporary, -1, gid)
        os.rename(temporary, path)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        temporary.unlink(missing_ok=True)
        if err.errno in (errno.EACCES, errno.EPERM):
            raise ApiSocketError(f"cannot create {path}: {err.strerror}") from None
        raise
    return trio.SocketListener(sock)


def socket_group_access(listener: trio.SocketListener) -> int | None:
    """The gid whose members the socket file lets in (mode g+rw), or None.

    The API's second gate (SO_PEERCRED) follows the first (the file's mode and group) rather
    than a group name guessed from the environment: whoever created the socket, meshd or
    systemd's meshd.socket (SocketGroup=), the group that can open it may use the API.
    """
    try:
        name = listener.socket.getsockname()
    except OSError:
        return None
    if not isinstance(name, str) or not name or name.startswith("\0"):
        return None  # unnamed or abstract: no file, no group
    try:
        info = os.stat(name)
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode) or info.st_mode & 0o060 != 0o060:
        return None
    return info.st_gid
