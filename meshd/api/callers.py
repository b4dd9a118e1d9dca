"""Who is calling the local API: the peer's uid and gid (SO_PEERCRED), and whether they may.

The socket file's mode and group are the first gate (unixsocket.py); this is the second:
the caller's uid, checked against allowed_uids (plus root and the daemon's own uid) and
allowed_gids (a primary group, or a group listing the caller's user name).
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from collections.abc import Collection

import trio


def peer_credentials(sock: trio.socket.SocketType | socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    size = struct.calcsize("3i")
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))
    return pid, uid, gid


def caller_is_allowed(uid: int, gid: int, allowed_uids: Collection[int],
                      allowed_gids: Collection[int]) -> bool:
    if uid == 0 or uid == os.geteuid() or uid in allowed_uids or gid in allowed_gids:
        return True
    if not allowed_gids:
        return False
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    for group in allowed_gids:
        try:
            if name in grp.getgrgid(group).gr_mem:
                return True
        except KeyError:
            continue
    return False
