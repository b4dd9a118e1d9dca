"""send_all and receive_some of a trio stream, two layers thinner over a TCP socket.

A trio.SocketStream wraps every call to its socket in a conflict detector, an error-translating
context manager (a generator) and a memoryview; its trio socket wraps every call again in a
generic non-blocking helper (a method wrapper, an async context manager and two awaited
helpers): together about 10 us per call, a third of the trio cost of a 100-byte round trip
(issue 16). A SecureConnection already guarantees what the conflict detector checks (one
reader; writers one at a time), so over a SocketStream it calls the standard-library socket
under the trio socket itself, with trio's own rules written out once:

- every call is a cancel point first (trio.lowlevel.checkpoint_if_cancelled);
- a call the socket completes at once is a schedule point after it
  (trio.lowlevel.cancel_shielded_checkpoint), so a busy connection never starves other tasks;
- a call that would block waits for the socket (wait_readable / wait_writable: a schedule
  point and a cancel point) and tries again;

with the same error translation and the same partial-send loop. Any other stream (memory
streams in tests, anything wrapped), or a SocketStream whose trio socket does not expose its
standard-library socket, is used as it is.

Closing the stream closes the trio socket, which first wakes a blocked wait with
trio.ClosedResourceError (trio.lowlevel.notify_closing) and then closes the standard-library
socket, whose calls from then on raise EBADF (ClosedResourceError below), never touching a
reused descriptor.
"""

from __future__ import annotations

import errno
import socket as stdlib_socket
from collections.abc import Awaitable, Callable

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    wait_readable,
    wait_writable,
)

SendAll = Callable[[bytes | bytearray | memoryview], Awaitable[None]]
ReceiveSome = Callable[[int], Awaitable[bytes | bytearray]]

# The errnos trio's SocketStream reports as ClosedResourceError (its socket closed under it).
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


def raw_socket(stream: trio.abc.Stream) -> stdlib_socket.socket | None:
    """The standard-library socket under a trio SocketStream, or None (not TCP, or a trio
    whose socket keeps it elsewhere: then the stream's own methods are used)."""
    if type(stream) is not trio.SocketStream:
        return None
    raw = getattr(stream.socket, "_sock", None)  # trio's _SocketType keeps it here
    return raw if isinstance(raw, stdlib_socket.socket) else None


def stream_io(stream: trio.abc.Stream) -> tuple[SendAll, ReceiveSome]:
    """(send_all, receive_some) for stream: its own methods, or its socket's for TCP.

    The TCP receive_some raises the socket's OSError, which the caller turns into the
    stream's error with stream_error(); send_all raises the stream's errors already.
    """
    raw = raw_socket(stream)
    if raw is None:
        return stream.send_all, stream.receive_some
    send, recv = raw.send, raw.recv

    async def send_all(data: bytes | bytearray | memoryview) -> None:
        await checkpoint_if_cancelled()
        try:
            try:
                sent = send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                await cancel_shielded_checkpoint()
                return
            view = memoryview(data)
            while sent < len(view):
                await wait_writable(raw)
                try:
                    sent += send(view[sent:])
                except BlockingIOError:
                    pass
        except OSError as err:
            raise stream_error(err) from err

    async def receive_some(max_bytes: int) -> bytes:
        await checkpoint_if_cancelled()
        try:
            data = recv(max_bytes)
        except BlockingIOError:
            pass
        else:
            await cancel_shielded_checkpoint()
            return data
        while True:
            await wait_readable(raw)
            try:
                return recv(max_bytes)
            except BlockingIOError:
                pass

    return send_all, receive_some


def stream_error(err: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """What trio's SocketStream raises for err (its _translate_socket_errors_to_stream_errors)."""
    if err.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {err}")
