"""Noise channels over trio streams: the thin shell around protocol.channel.Channel.

SecureConnection owns one trio.abc.Stream and one Channel. It decides nothing: it moves
received bytes into the channel, sends whatever the channel queues, and runs the channel's
timers (keepalives, dead-peer detection, rekey by time, the handshake deadline) while a reader
waits. Exactly one task reads (whoever calls receive()); any task may send(), and every write
goes through _flush(), one writer at a time, so two writers never interleave frames.

Timers without a cancel scope per receive: a trio cancel scope with a deadline costs about as
much as the rest of a small message's handling, so the reader blocks in receive_some() bare and
a watchdog task (one per connection, started by the reader, gone when nobody reads) sleeps until
the channel's deadline. At the deadline, if the reader is still waiting, the watchdog runs the
channel's timers and sends what they queue; if a timer fails (a stalled handshake, a silent
peer), it hands the error to the reader and closes the stream, which wakes the reader. A reader
that arrives after a deadline runs the timers itself before it waits, so, as before, timers run
only on behalf of a reader.

Failure contract: receive() and send() raise RemoteProtocolError when the peer misbehaved or
timed out, PeerClosed when it closed cleanly, and trio.BrokenResourceError / OSError when the
network failed. The caller's per-connection boundary catches those; anything else is a bug.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import trio

from ..containment import report_bug
from ..protocol.channel import (
    NEED_DATA,
    Channel,
    ConnectionClosed,
    HandshakeCompleted,
    HandshakePhase,
    MessageReceived,
    State,
    XXHandshake,
)
from ..protocol.crypto import DHKeyPair, PublicKey, RandomSource
from ..protocol.errors import RemoteProtocolError
from ..quietlog import QuietLogger
from .tally import RefusalTally, cause_of, host_of

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

# Room for about two maximum-size frames per receive, yet below glibc's mmap threshold
# (128 KiB) for the buffer receive_some() allocates: at 256 KiB every receive paid an
# mmap/munmap pair and fresh-page faults, ~17 us, more than decrypting a small message.
RECEIVE_BYTES = 120 * 1024
# Errors that end one connection and never the process.
CONNECTION_ERRORS = (
    RemoteProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    OSError,
)


class PeerClosed(trio.EndOfChannel):
    """The peer closed the connection cleanly, with an optional reason."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason or "peer closed the connection")
        self.reason = reason


class SecureConnection:
    """One authenticated, encrypted, message-oriented connection."""

    def __init__(self, stream: trio.abc.Stream, channel: Channel) -> None:
        self._stream = stream
        self._channel = channel
        # One writer at a time (see _flush). A flag and a parking lot rather than trio.Lock,
        # whose ownership bookkeeping costs several microseconds per uncontended send.
        self._writing = False
        self._waiting_writers = trio.lowlevel.ParkingLot()
        self._received: deque[dict[str, Any]] = deque()
        self._closed_reason: str | None = None
        self._peer_closed = False
        # Timers (see the module docstring): is the reader blocked in receive_some(), the
        # running watchdog's cancel scope, and an error the watchdog hands to the reader.
        self._reading = False
        self._watchdog: trio.CancelScope | None = None
        self._failure: Exception | None = None

    @property
    def remote_static(self) -> PublicKey:
        assert self._channel.remote_static is not None, "handshake not complete"
        return self._channel.remote_static

    @property
    def handshake_hash(self) -> bytes:
        return self._channel.handshake_hash

    @property
    def stream(self) -> trio.abc.Stream:
        return self._stream

    async def handshake(self) -> None:
        """Run the handshake to completion (or raise)."""
        await self._flush()
        while self._channel.state is State.HANDSHAKE:
            await self._receive_once()

    async def receive(self) -> dict[str, Any]:
        """The next application message. Raises PeerClosed when the peer closed cleanly."""
        while not self._received:
            if self._peer_closed:
                raise PeerClosed(self._closed_reason)
            await self._receive_once()
        return self._received.popleft()

    def __aiter__(self) -> SecureConnection:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self.receive()
        except PeerClosed:
            raise StopAsyncIteration from None

    async def send(self, message: dict[str, Any]) -> None:
        self._check_open()
        self._channel.send(message)  # sync: atomic between checkpoints
        await self._flush()

    async def send_packed(self, packed: bytes) -> None:
        self._check_open()
        self._channel.send_packed(packed)
        await self._flush()

    def _check_open(self) -> None:
        # A connection the peer (or another task) closed is a network condition for the
        # sender, not a bug: raise what every connection boundary already handles.
        if self._channel.state is not State.OPEN:
            raise trio.ClosedResourceError(f"connection is {self._channel.state.name.lower()}")

    async def aclose(self, reason: str = "") -> None:
        """Say goodbye (best effort) and close the stream."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        try:
            if self._channel.state is State.OPEN:
                self._channel.close(reason)
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer is already gone; closing is all that is left to do
        finally:
            await self._stream.aclose()

    async def __aenter__(self) -> SecureConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _flush(self) -> None:
        if not self._channel.has_data_to_send:
            return
        # Contended, wait our turn: the writer before us may already have sent our frames,
        # which is why the outbox is read only once it is our turn.
        while self._writing:
            await self._waiting_writers.park()
        self._writing = True
        try:
            data = self._channel.take_data_to_send()
            if data:
                await self._stream.send_all(data)
        finally:
            self._writing = False
            if self._waiting_writers:
                self._waiting_writers.unpark_all()

    async def _receive_once(self) -> None:
        channel = self._channel
        now = trio.current_time()
        if now >= channel.deadline:
            # Past a deadline nobody was waiting at (the watchdog leaves those to the reader).
            channel.handle_timeout(now)
            await self._flush()
            return
        if self._watchdog is None:
            self._watchdog = trio.CancelScope()
            trio.lowlevel.spawn_system_task(self._watch, self._watchdog, name="meshd connection timers")
        self._reading = True
        try:
            data = await self._stream.receive_some(RECEIVE_BYTES)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if self._failure is not None:
                raise self._failure from None  # the watchdog closed the stream: say why
            raise
        finally:
            self._reading = False
        if self._failure is not None:
            raise self._failure
        channel.receive_data(data)
        while (event := channel.next_event()) is not NEED_DATA:
            if isinstance(event, MessageReceived):
                self._received.append(event.message)
            elif isinstance(event, ConnectionClosed):
                self._peer_closed = True
                self._closed_reason = event.reason
            elif isinstance(event, HandshakeCompleted):
                pass  # remote_static and handshake_hash are read from the channel
        if channel.has_data_to_send:
            await self._flush()

    async def _watch(self, scope: trio.CancelScope) -> None:
        """The watchdog: run the channel's timers at their deadline while the reader waits.

        A system task (it outlives no run, and needs no nursery from the caller), so it must
        never raise: the timers' errors, and the network's while sending what they queue, are
        handed to the reader, whose caller handles them as before.
        """
        channel = self._channel
        try:
            with scope:
                while (deadline := channel.deadline) != math.inf:
                    await trio.sleep_until(deadline)
                    now = trio.current_time()
                    if now < channel.deadline:
                        continue  # the deadline moved on (the handshake completed)
                    if not self._reading:
                        return  # nobody waits: the next reader runs the timers itself
                    try:
                        channel.handle_timeout(now)
                        await self._flush()
                    except Exception as err:  # noqa: BLE001 - handed to the reader, see above
                        self._failure = err
                        await trio.aclose_forcefully(self._stream)
                        return
        finally:
            if self._watchdog is scope:
                self._watchdog = None


async def open_secure_connection(
    stream: trio.abc.Stream,
    *,
    initiator: bool,
    static: DHKeyPair,
    authorize: Callable[[PublicKey], bool],
    rng: RandomSource = os.urandom,
    handshake: HandshakePhase | None = None,
) -> SecureConnection:
    """Run a handshake over stream and return the open connection.

    Uses meshd's XX handshake unless another HandshakePhase (pairing) is given. On failure
    the stream is closed and the error propagates (RemoteProtocolError for a bad or
    unauthorised peer or a handshake past its deadline).
    """
    phase = handshake or XXHandshake(
        initiator=initiator, static=static, rng=rng, authorize=authorize
    )
    connection = SecureConnection(stream, Channel(phase, now=trio.current_time()))
    try:
        await connection.handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return connection


async def connect_secure(
    host: str,
    port: int,
    *,
    static: DHKeyPair,
    authorize: Callable[[PublicKey], bool],
    rng: RandomSource = os.urandom,
) -> SecureConnection:
    """Dial host:port over TCP and run meshd's handshake as the initiator."""
    stream = await trio.open_tcp_stream(host, port)
    return await open_secure_connection(
        stream, initiator=True, static=static, authorize=authorize, rng=rng
    )


async def serve_secure(
    handler: Callable[[SecureConnection], Awaitable[None]],
    listeners: list[trio.SocketListener],
    *,
    static: DHKeyPair,
    authorize: Callable[[PublicKey], bool],
    rng: RandomSource = os.urandom,
    handler_nursery: trio.Nursery | None = None,
) -> NoReturn:
    """Accept connections forever; each gets a handshake, then handler(connection).

    One connection's failure (bad input, timeout, network) is logged once and ends only that
    connection. `handler_nursery` is where per-connection tasks run (trio's serve_listeners
    convention); by default, a nursery of this call.
    """

    refusals = RefusalTally(log, "handshakes")

    async def run_one(stream: trio.abc.Stream) -> None:
        peer = _describe_stream(stream)
        try:
            connection = await open_secure_connection(
                stream, initiator=False, static=static, authorize=authorize, rng=rng
            )
        except CONNECTION_ERRORS as err:
            refusals.note(cause_of(err), host_of(peer), trio.current_time())
            return
        except Exception as bug:  # a bug in the handshake ends this connection only
            report_bug("connection", bug)
            return
        async with connection:
            try:
                await handler(connection)
            except PeerClosed:
                pass
            except CONNECTION_ERRORS as err:
                quiet.warning(("conn", cause_of(err)), "%r at %s dropped: %s", connection.remote_static, peer, err)
            except Exception as bug:  # a bug in the handler ends this connection, not the server
                report_bug("connection", bug)

    await trio.serve_listeners(run_one, listeners, handler_nursery=handler_nursery)
    raise AssertionError("serve_listeners returned")  # pragma: no cover


def _describe_stream(stream: trio.abc.Stream) -> str:
    socket = getattr(stream, "socket", None)
    if socket is None:
        return "a stream"
    try:
        host, port = socket.getpeername()[:2]
    except OSError:
        return "a closed socket"
    return f"{host}:{port}"
