"""The API's accept loop on a unix listener: a new connection for the price of a few syscalls.

Theory of operation. Simple clients (curl, the soak's writer, a shell script) open a new
connection per request. Through trio.serve_listeners each one cost ~8 trio task steps and
~0.15 ms of the trio thread before its request was read (issue 20: CPU per daemon): the
listener's accept (a checkpoint and a generic non-blocking helper), a SocketStream whose
constructor tries two TCP setsockopt calls that fail on a unix socket (two OSErrors), a
handler task wrapped in another, and the socket closed twice (by the handler's `async with`
and by serve_listeners' aclose_forcefully), each close a checkpoint. A keep-alive request
costs ~1 step. So, for a unix listener:

- serve_unix() waits until the listening socket is readable, then accepts with the
  standard-library socket until EAGAIN (at most ACCEPT_BATCH at a time, then a schedule
  point: a flood of connections cannot starve the daemon's other tasks), starting one task
  per connection in its nursery. Each accepted socket is made non-blocking (the only
  syscall added to accept's).
- Its errors are trio's SocketListener.accept's and serve_listeners': the errnos a client
  can cause (a connection aborted before it was accepted...) are skipped; running out of
  descriptors or memory (EMFILE, ENFILE, ENOMEM, ENOBUFS) is logged (once per errno, then
  at DEBUG) and the loop sleeps ACCEPT_RETRY_SECONDS before accepting again, so a full fd
  table neither spins nor ends the server; a closed listener raises ClosedResourceError;
  anything else is raised, as before.
- UnixStream is the connection's stream: the standard-library socket under trio's stream
  rules (every call a cancel point; a call that completes at once, a schedule point after
  it; one that would block waits on the socket), with SocketStream's error translation,
  and a synchronous close() that the server calls once. ConnectionIO (connio.py) reads
  and writes its socket directly, as it does a SocketStream's.

Any other listener (TCP, something wrapped) is served by trio.serve_listeners as before.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdlib_socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

from ..net.streamio import stream_error
from ..quietlog import QuietLogger

log = logging.getLogger("meshd.api")
_quiet = QuietLogger(log)

ACCEPT_BATCH = 16  # connections accepted between two schedule points
ACCEPT_RETRY_SECONDS = 0.1  # trio.serve_listeners' pause after EMFILE and the like
# trio's serve_listeners: out of descriptors or memory; pause, then accept again.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# trio's SocketListener.accept skips these: what a client (or a firewall) can cause.
ACCEPT_IGNORED_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
    "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT",
    "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET") if hasattr(errno, name))
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


class UnixStream(trio.abc.HalfCloseableStream):
    """An accepted unix-socket connection (module docstring); `socket` is the
    standard-library socket, non-blocking."""

    __slots__ = ("socket",)

    def __init__(self, sock: stdlib_socket.socket) -> None:
        self.socket = sock

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await checkpoint_if_cancelled()
        sock = self.socket
        try:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                await cancel_shielded_checkpoint()
                return
            with memoryview(data) as view:
                while sent < len(view):
                    await wait_writable(sock)
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:
                        pass
        except OSError as err:
            raise stream_error(err) from err

    async def wait_send_all_might_not_block(self) -> None:
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("this socket was already closed")
        await wait_writable(self.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await checkpoint_if_cancelled()
        sock = self.socket
        size = 65536 if max_bytes is None else max_bytes
        try:
            try:
                data = sock.recv(size)
            except BlockingIOError:
                pass
            else:
                await cancel_shielded_checkpoint()
                return data
            while True:
                await wait_readable(sock)
                try:
                    return sock.recv(size)
                except BlockingIOError:
                    pass
        except OSError as err:
            raise stream_error(err) from err

    async def send_eof(self) -> None:
        await checkpoint()
        try:
            self.socket.shutdown(stdlib_socket.SHUT_WR)
        except OSError as err:
            raise stream_error(err) from err

    def close(self) -> None:
        """Close the socket (a task waiting on it gets ClosedResourceError); idempotent."""
        if self.socket.fileno() != -1:
            notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await checkpoint()


def unix_listening_socket(listener: trio.abc.Listener[Any]) -> stdlib_socket.socket | None:
    """The standard-library socket of a trio SocketListener on a unix socket, or None."""
    if type(listener) is not trio.SocketListener:
        return None
    raw = getattr(listener.socket, "_sock", None)  # trio's _SocketType keeps it here
    if not isinstance(raw, stdlib_socket.socket) or raw.family != stdlib_socket.AF_UNIX:
        return None
    return raw


def _accept(listening: stdlib_socket.socket) -> stdlib_socket.socket:
    sock, _ = listening.accept()
    return sock


async def serve_unix(listening: stdlib_socket.socket, handler: Callable[[UnixStream], Awaitable[None]],
                     nursery: trio.Nursery) -> None:
    """Accept connections on listening (a unix socket, non-blocking) until cancelled, each
    handled by handler(stream) in a task of nursery (module docstring)."""
    while True:
        try:
            await wait_readable(listening)
        except OSError as err:  # (trio raises ClosedResourceError for a socket closed while waited)
            raise stream_error(err) from err
        for _ in range(ACCEPT_BATCH):
            try:
                sock = _accept(listening)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno in _CLOSED_ERRNOS:
                    raise trio.ClosedResourceError("the API listener was closed") from None
                if err.errno in ACCEPT_IGNORED_ERRNOS:
                    continue
                if err.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                _quiet.warning(("accept", err.errno), "API accept failed with %s (%s); retrying in %s s",
                               errno.errorcode[err.errno], os.strerror(err.errno), ACCEPT_RETRY_SECONDS)
                await trio.sleep(ACCEPT_RETRY_SECONDS)
                break
            try:
                sock.setblocking(False)
            except OSError as err:  # not seen in practice: that connection ends, the server goes on
                sock.close()
                _quiet.warning(("setblocking", err.errno), "API connection dropped: %s", err)
                continue
            nursery.start_soon(handler, UnixStream(sock))
