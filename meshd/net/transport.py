"""Noise channels over trio streams: the thin shell around protocol.channel.Channel.

SecureConnection owns one trio.abc.Stream and one Channel. It decides nothing: it moves
received bytes into the channel, sends whatever the channel queues, and runs the channel's
timers (keepalives, dead-peer detection, rekey by time, the handshake deadline) while a reader
waits. Exactly one task reads (whoever calls receive()); any task may send(), and every write
goes through _flush(), one writer at a time, so two writers never interleave frames.

Timers without a cancel scope per receive: a trio cancel scope with a deadline costs about as
much as the rest of a small message's handling, so the reader blocks in receive_some() bare and
a watchdog task (one per connection, started by the first reader, ended by aclose()) sleeps
until the channel's deadline and runs the channel's timers there, whether or not anyone is
reading or writing at that moment: timers are independent of either direction. What they queue
(a keepalive, a rekey) is sent by a task the watchdog starts when no write is in progress, and
otherwise by the writer in progress when it next flushes. The watchdog never waits on a write. When the
connection is dead is protocol/liveness.py's rule (its timers are named there): nothing
received for TIMERS.silence_s, timed exactly from the last bytes received, or a write that
made no progress for TIMERS.write_stall_s (the peer stopped reading; both send buffers may be
full). A failure (a stalled handshake, a silent or non-reading peer) is handed to the reader
and the stream closed, without a goodbye, which wakes the reader and any blocked writer.

Reads are paced by a ReadBudget (byterate.py): a peer may make us read at most
PEER_BYTE_RATE; past it the reader waits, and TCP pushes back on the sender.

Failure contract: receive() and send() raise RemoteProtocolError when the peer misbehaved or
timed out, PeerClosed when it closed cleanly, and trio.BrokenResourceError / OSError when the
network failed. The caller's per-connection boundary catches those; anything else is a bug.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from ..protocol.channel import (
    NEED_DATA,
    Channel,
    ConnectionClosed,
    HandshakePhase,
    State,
    XXHandshake,
)
from ..protocol.crypto import DHKeyPair, PublicKey, RandomSource
from ..protocol.errors import RemoteProtocolError
from ..protocol.liveness import TIMERS, ConnectionTimers, Liveness
from ..quietlog import QuietLogger
from .byterate import PEER_BYTE_RATE, ByteRate, ReadBudget
from .streamio import stream_error, stream_io

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

# Room for about two maximum-size frames per receive, yet below glibc's mmap threshold
# (128 KiB) for the buffer receive_some() allocates: at 256 KiB every receive paid an
# mmap/munmap pair and fresh-page faults, ~17 us, more than decrypting a small message.
RECEIVE_BYTES = 120 * 1024
# A write makes progress when a piece this big is accepted by the stream (see _flush).
WRITE_PIECE_BYTES = 64 * 1024
# Hot-path globals (an Enum member costs ~4x a global to look up).
_HANDSHAKE, _OPEN = State.HANDSHAKE, State.OPEN
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

    def __init__(self, stream: trio.abc.Stream, channel: Channel,
                 byte_rate: ByteRate | None = PEER_BYTE_RATE, *,
                 timers: ConnectionTimers = TIMERS) -> None:
        self._stream = stream
        # The stream's send_all/receive_some, or its TCP socket's (streamio.py: one layer less).
        self._send_all, self._receive_some = stream_io(stream)
        self._channel = channel
        # trio.current_time() without its two wrappers (the run's clock is fixed for its life).
        self._now: Callable[[], float] = trio.lowlevel.current_clock().current_time
        # What the peer may make us read (byterate.py); None: unlimited.
        self.read_budget = ReadBudget(byte_rate, trio.current_time()) if byte_rate else None
        # One writer at a time (see _flush). A flag and a parking lot rather than trio.Lock,
        # whose ownership bookkeeping costs several microseconds per uncontended send.
        self._writing = False
        self._waiting_writers = trio.lowlevel.ParkingLot()
        self._parked_writers = 0  # len(_waiting_writers), without its method call per send
        self._received: deque[dict[str, Any]] = deque()
        self._closed_reason: str | None = None
        self._peer_closed = False
        # Timers (see the module docstring): the running watchdog's cancel scope, and an
        # error the watchdog hands to the reader.
        self._watchdog: trio.CancelScope | None = None
        self._failure: Exception | None = None
        # trio clock: bytes last arrived (keepalives too), and the write piece in progress.
        self._liveness = Liveness(trio.current_time(), timers)
        self._closed = False  # aclose() was called: no new watchdog
        self._write_broken = False  # a write was cut short: the stream takes no more frames

    @property
    def remote_static(self) -> PublicKey:
        assert self._channel.remote_static is not None, "handshake not complete"
        return self._channel.remote_static

    @property
    def handshake_hash(self) -> bytes:
        return self._channel.handshake_hash

    @property
    def received_at(self) -> float:
        """trio clock: when bytes (keepalives too) last arrived."""
        return self._liveness.received_at

    @property
    def timers(self) -> ConnectionTimers:
        return self._liveness.timers

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
        # receive() without its frame: one coroutine layer less per message.
        while not self._received:
            if self._peer_closed:
                raise StopAsyncIteration
            await self._receive_once()
        return self._received.popleft()

    async def send(self, message: dict[str, Any]) -> None:
        if self._channel.state is not _OPEN:  # _check_open() inline: once per message sent
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
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        try:
            if self._channel.state is State.OPEN and self._failure is None and not self._write_broken:
                self._channel.close(reason)
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, RemoteProtocolError):
            pass  # the peer is already gone (or declared dead); closing is all that is left
        finally:
            await self._stream.aclose()

    async def __aenter__(self) -> SecureConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _flush(self) -> None:
        channel = self._channel
        if self._writing or self._write_broken:  # else (the common case) straight to the write
            if not channel.has_data_to_send:
                return
            # Contended, wait our turn: the writer before us may already have sent our frames,
            # which is why the outbox is read only once it is our turn.
            while self._writing:
                self._parked_writers += 1
                try:
                    await self._waiting_writers.park()
                finally:
                    self._parked_writers -= 1
            if self._write_broken:
                raise trio.BrokenResourceError("an earlier write on this connection was cut short")
        take = channel.take_data_to_send
        data = take()
        if not data:
            return
        self._writing = True
        liveness, send_all = self._liveness, self._send_all
        try:
            # Frames queued while this write waited (a keepalive from the watchdog) go too.
            while data:
                # In pieces, so "no progress" means a piece, not a whole 16 MiB message on
                # a slow link, took write_stall_s. Most writes are one piece: sent as is.
                if len(data) <= WRITE_PIECE_BYTES:
                    liveness.write_started(self._now())
                    await send_all(data)
                else:
                    for piece in _pieces(memoryview(data), WRITE_PIECE_BYTES):
                        liveness.write_started(self._now())
                        await send_all(piece)
                data = take()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if self._failure is not None:
                raise self._failure from None  # the watchdog closed the stream
            raise
        finally:
            if data:  # taken from the channel (nonces spent) but not all written: cancelled,
                # or the socket failed. Anything written after it would reach the peer as a
                # bad MAC: nothing more is (no goodbye either).
                self._write_broken = True
            liveness.write_finished()
            self._writing = False
            if self._parked_writers:
                self._waiting_writers.unpark_all()

    async def _receive_once(self) -> None:
        channel = self._channel
        if self._watchdog is None and not self._closed:
            self._watchdog = trio.CancelScope()
            trio.lowlevel.spawn_system_task(self._watch, self._watchdog, name="meshd connection timers")
        budget = self.read_budget
        if budget is not None and budget.in_debt:  # else no wait, whatever the clock says
            await budget.before_read()
        try:
            data = await self._receive_some(RECEIVE_BYTES)
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError) as err:
            if self._failure is not None:
                raise self._failure from None  # the watchdog closed the stream: say why
            if isinstance(err, OSError):  # from a TCP socket's recv (streamio.py)
                raise stream_error(err) from err
            raise
        if self._failure is not None:
            raise self._failure
        now = self._now()  # one clock read for the liveness and the budget
        if data:
            self._liveness.received(now)
        handshaking = channel.state is _HANDSHAKE
        frames = channel.messages_received
        channel.receive_data(data)
        # Messages go straight into _received; the loop sees only the rarer events.
        while (event := channel.drain_messages(self._received)) is not NEED_DATA:
            if isinstance(event, ConnectionClosed):
                self._peer_closed = True
                self._closed_reason = event.reason
            # HandshakeCompleted: remote_static and handshake_hash are read from the channel
        if budget is not None:
            budget.spend(now, len(data), channel.messages_received - frames)
        if handshaking and channel.has_data_to_send:
            # The handshake's answer. Once open, the reader never writes: what receiving
            # queues goes with the next write or the watchdog's, so reading never waits on
            # a peer that does not read.
            await self._flush()

    async def _watch(self, scope: trio.CancelScope) -> None:
        """The watchdog: run the channel's timers at their deadline, and end the connection
        when protocol/liveness.py says it is dead (see the module docstring).

        A system task (it needs no nursery from the caller), so it must never raise: the
        timers' errors, and the network's while sending what they queue, are handed to the
        reader, whose caller handles them as before. It never writes itself: what the timers
        queue goes out from a task of its own, so a write that blocks never stops the clock.
        """
        channel = self._channel
        liveness = self._liveness
        try:
            with scope:
                while channel.deadline != math.inf:  # else closed: nothing left to time
                    # A write that starts while this sleeps is timed from the next wake:
                    # channel ticks come at least every keepalive_s, well inside write_stall_s.
                    await trio.sleep_until(min(channel.deadline, liveness.deadline))
                    now = trio.current_time()
                    try:
                        liveness.check(now)
                        if now >= channel.deadline:
                            channel.handle_timeout(now)
                            if not self._writing and channel.has_data_to_send:
                                # else the writer in progress sends it when it next flushes
                                trio.lowlevel.spawn_system_task(
                                    self._flush_for_timers, name="meshd connection timer write")
                    except Exception as err:  # noqa: BLE001 - handed to the reader, see above
                        await self._fail(err)
                        return
        finally:
            if self._watchdog is scope:
                self._watchdog = None

    async def _flush_for_timers(self) -> None:
        """Send what the timers queued (a keepalive, a rekey); a system task, never raises."""
        try:
            await self._flush()
        except Exception as err:  # noqa: BLE001 - handed to the reader, like the watchdog's
            await self._fail(err)

    async def _fail(self, err: Exception) -> None:
        """The connection is dead: hand the reason to the reader, close without a goodbye."""
        if self._failure is None and not self._closed:
            self._failure = err
        await trio.aclose_forcefully(self._stream)


def _pieces(view: memoryview, size: int) -> list[memoryview]:
    return [view[start:start + size] for start in range(0, len(view), size)]


async def open_secure_connection(
    stream: trio.abc.Stream,
    *,
    initiator: bool,
    static: DHKeyPair,
    authorize: Callable[[PublicKey], bool],
    rng: RandomSource = os.urandom,
    handshake: HandshakePhase | None = None,
    byte_rate: ByteRate | None = PEER_BYTE_RATE,
) -> SecureConnection:
    """Run a handshake over stream and return the open connection.

    Uses meshd's XX handshake unless another HandshakePhase (pairing) is given. On failure
    the stream is closed and the error propagates (RemoteProtocolError for a bad or
    unauthorised peer or a handshake past its deadline).
    """
    phase = handshake or XXHandshake(
        initiator=initiator, static=static, rng=rng, authorize=authorize
    )
    connection = SecureConnection(stream, Channel(phase, now=trio.current_time()), byte_rate)
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
