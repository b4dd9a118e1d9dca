"""send_all and receive_some of a trio stream, one layer thinner over a TCP socket.

A trio.SocketStream wraps every call to its socket in a conflict detector, an error-translating
context manager (a generator) and a memoryview: about 5 us per call, a quarter of the trio
cost of a 100-byte round trip (issue 16). A SecureConnection already guarantees what the
conflict detector checks (one reader; writers one at a time), so over a SocketStream it calls
the trio socket underneath directly, with the same error translation and the same partial-send
loop; any other stream (memory streams in tests, anything wrapped) is used as it is.

The trio socket's own calls keep trio's checkpoints and cancellation (each send or receive is a
checkpoint, as through the stream); closing the stream closes that socket, which wakes a
blocked call with trio.ClosedResourceError, as before.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import trio

SendAll = Callable[[bytes | bytearray | memoryview], Awaitable[None]]
ReceiveSome = Callable[[int], Awaitable[bytes | bytearray]]

# The errnos trio's SocketStream reports as ClosedResourceError (its socket closed under it).
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


def stream_io(stream: trio.abc.Stream) -> tuple[SendAll, ReceiveSome]:
    """(send_all, receive_some) for stream: its own methods, or its socket's for TCP.

    The TCP receive_some is the socket's recv itself (one coroutine layer less on every
    receive): it raises the socket's OSError, which the caller turns into the stream's error
    with stream_error(); send_all raises the stream's errors already.
    """
    if type(stream) is not trio.SocketStream:
        return stream.send_all, stream.receive_some
    socket = stream.socket
    send, recv = socket.send, socket.recv

    async def send_all(data: bytes | bytearray | memoryview) -> None:
        try:
            sent = await send(data)
            if sent < len(data):
                view = memoryview(data)
                while sent < len(view):
                    sent += await send(view[sent:])
        except OSError as err:
            raise stream_error(err) from err

    return send_all, recv


def stream_error(err: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """What trio's SocketStream raises for err (its _translate_socket_errors_to_stream_errors)."""
    if err.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {err}")
