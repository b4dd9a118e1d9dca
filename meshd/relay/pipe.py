"""The bytes of one relay rendezvous as a trio stream: relay.pipe frames, buffered and bounded.

PipeStream is what RelaySession.rendezvous() and open_join_pipe() return; pairing runs over
it unchanged, as over a direct connection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from ..net.transport import CONNECTION_ERRORS, PeerClosed, SecureConnection, connect_secure
from ..protocol.crypto import DHKeyPair, RandomSource, constant_time_equal
from ..protocol.relay import (
    MALFORMED,
    MAX_PIPE_DATA_BYTES,
    ROLE_JOIN,
    UNAVAILABLE,
    RelayError,
    parse_error,
    parse_pipe_data,
    pipe_close_frame,
    pipe_frame,
    request_id,
)
from ..quietlog import QuietLogger
from .address import RelayAddress
from .timers import CONNECT_TIMEOUT_S, PIPE_CLOSE_TIMEOUT_S, REQUEST_TIMEOUT_S

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

# Pipe bytes received and not yet read. A session's reader cannot wait for a slow pipe
# reader (it also routes every other answer), so past this the pipe is dropped instead.
# Pairing reads eagerly; one 16 MiB channel message arrives in 64 KiB frames as it is read.
MAX_PIPE_BUFFER_BYTES = 4 * 1024 * 1024
PIPE_RECEIVE_BYTES = 64 * 1024


class PipeStream(trio.abc.Stream):
    """The bytes of one rendezvous, carried as relay.pipe frames (a trio.abc.Stream).

    End of stream (receive_some() returning b"") is the other side's relay.pipe_close (or
    its disconnect, which the relay reports the same way). A failed relay connection, or a
    reader that fell MAX_PIPE_BUFFER_BYTES behind, is trio.BrokenResourceError. aclose()
    sends relay.pipe_close (best effort) and, for open_join_pipe()'s pipe, closes the
    connection it owns. Made by RelaySession.rendezvous() and open_join_pipe().
    """

    def __init__(self, connection: SecureConnection, *, owns_connection: bool,
                 on_close: Callable[[PipeStream], None] = lambda pipe: None) -> None:
        self._connection = connection
        # Owned (a joiner's connection that carries nothing else): receive_some() reads the
        # connection itself. Shared (a session): the session's reader feeds _deliver().
        self._owns_connection = owns_connection
        self._on_close = on_close
        self.rid: int | None = None  # of the relay.rendezvous request, while it waits
        self.ready = False  # relay.rendezvous_ready arrived: frames from now on are ours
        self._buffer = bytearray()
        self._eof = False  # the other side closed the pipe
        self._error: RelayError | None = None  # the pipe broke on our side of the relay
        self._relay_done = False  # the relay holds nothing for this pipe any more
        self._closed = False  # aclose() was called
        self._readable = trio.Event()
        self._receiving = False
        self._sending = False

    # -- fed by the owner's reader --

    def _deliver(self, data: bytes) -> None:
        if self._closed or self._eof or self._error is not None:
            return  # a frame that crossed our close or the failure
        if len(self._buffer) + len(data) > MAX_PIPE_BUFFER_BYTES:
            # aclose() (which the reader's error leads to) tells the relay.
            self._fail(RelayError(UNAVAILABLE, "pipe dropped: its reader fell "
                                  f"{MAX_PIPE_BUFFER_BYTES} bytes behind"), relay_done=False)
            return
        self._buffer += data
        self._readable.set()

    def _peer_closed(self) -> None:
        self._eof = True
        self._relay_done = True
        self._readable.set()

    def _fail(self, error: RelayError, *, relay_done: bool = True) -> None:
        if self._error is None:
            self._error = error
        self._relay_done = self._relay_done or relay_done
        self._readable.set()

    def _route(self, message: dict[str, Any]) -> None:
        """A frame on an owned connection (nothing but this pipe travels on it)."""
        kind = message.get("t")
        if kind == "relay.pipe":
            self._deliver(parse_pipe_data(message))
        elif kind == "relay.pipe_close":
            self._peer_closed()
        elif kind == "relay.error":
            self._fail(parse_error(message))
        else:
            raise RelayError(MALFORMED, f"unexpected {str(kind)[:64]!r} on a pipe connection")

    async def _pump(self) -> None:
        try:
            self._route(await self._connection.receive())
        except PeerClosed:
            # The relay says relay.pipe_close before it closes a joiner's connection; a
            # close without it means the pipe did not end cleanly.
            self._fail(RelayError(UNAVAILABLE, "the relay closed the connection"))
        except CONNECTION_ERRORS as err:
            self._fail(RelayError(UNAVAILABLE, f"connection lost: {err}"))

    # -- trio.abc.Stream --

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving from this pipe")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            while not self._buffer:
                if self._closed:
                    raise trio.ClosedResourceError("the pipe was closed")
                if self._error is not None:
                    raise trio.BrokenResourceError(str(self._error)) from self._error
                if self._eof:
                    return b""
                if self._owns_connection:
                    await self._pump()
                else:
                    self._readable = trio.Event()
                    await self._readable.wait()
            if self._closed:
                raise trio.ClosedResourceError("the pipe was closed")
            size = min(len(self._buffer), max_bytes or PIPE_RECEIVE_BYTES)
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this pipe")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the pipe was closed")
            if self._error is not None or self._eof:
                raise trio.BrokenResourceError("the pipe is closed at the other side")
            view = memoryview(data)
            if not view:
                await trio.lowlevel.checkpoint()
            for start in range(0, len(view), MAX_PIPE_DATA_BYTES):
                try:
                    await self._connection.send(
                        pipe_frame(bytes(view[start:start + MAX_PIPE_DATA_BYTES])))
                except CONNECTION_ERRORS as err:
                    self._fail(RelayError(UNAVAILABLE, f"connection lost: {err}"))
                    raise trio.BrokenResourceError(f"relay connection lost: {err}") from err
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the pipe was closed")
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._readable.set()
        try:
            if not self._relay_done:
                # Withdraws a waiting offer, or ends the pipe for the other side. Shielded:
                # closing happens on the way out of a cancelled pairing too.
                with trio.CancelScope(shield=True), trio.move_on_after(PIPE_CLOSE_TIMEOUT_S):
                    try:
                        await self._connection.send(pipe_close_frame())
                    except CONNECTION_ERRORS:
                        pass  # the connection is gone: the relay closes the pipe itself
        finally:
            self._on_close(self)
            if self._owns_connection:
                await self._connection.aclose()



async def connect_pinned(address: RelayAddress | str, static: DHKeyPair,
                         rng: RandomSource) -> SecureConnection:
    """A Noise channel to the relay, refused unless its static key is the one address pins."""
    if isinstance(address, str):
        address = RelayAddress.parse(address)
    pinned = address.key
    with trio.fail_after(CONNECT_TIMEOUT_S):
        return await connect_secure(address.host, address.port, static=static, rng=rng,
                                    authorize=lambda key: constant_time_equal(key, pinned))


async def open_join_pipe(
    relay_address: RelayAddress | str,
    static: DHKeyPair,
    nameplate: int,
    *,
    rng: RandomSource = os.urandom,
) -> PipeStream:
    """A new device's side of a rendezvous: connect (pinned key) WITHOUT registering, join
    the nameplate, and return the pipe, which owns the connection (aclose() closes both).

    Raises RelayError ("no-offer", "rate-limited", "unavailable", ...), UnauthorizedPeer
    when the relay's key is not the pinned one, and OSError / trio errors when the relay
    cannot be reached. The relay closes this connection when the pipe ends.
    """
    connection = await connect_pinned(relay_address, static, rng)
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            await connection.send({"t": "relay.rendezvous", "rid": 1, "nameplate": nameplate,
                                   "role": ROLE_JOIN})
            answer = await connection.receive()
        if answer.get("t") == "relay.error":
            raise parse_error(answer)
        if answer.get("t") != "relay.rendezvous_ready" or request_id(answer) != 1:
            raise RelayError(MALFORMED, f"expected relay.rendezvous_ready, got "
                             f"{str(answer.get('t'))[:64]!r}")
    except BaseException as err:
        await trio.aclose_forcefully(connection.stream)
        if isinstance(err, PeerClosed | trio.TooSlowError | trio.BrokenResourceError):
            raise RelayError(UNAVAILABLE, f"the relay did not answer the join: {err}") from err
        raise
    pipe = PipeStream(connection, owns_connection=True)
    pipe.ready = True
    return pipe
