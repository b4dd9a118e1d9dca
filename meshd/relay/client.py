"""The device side of a relay: one pinned, registered connection, and a client that keeps one.

RelaySession is one connection: it dials HOST:PORT, refuses any relay whose static key is
not the one pinned in the address, registers with the circle's records, and then sends
requests (pipelined by request id) while one reader task routes answers to their callers
and pushed envelopes to on_push. RelayClient keeps a session up (reconnecting with jittered
exponential backoff, re-registering with the current records, re-subscribing its watched
mailboxes for hints; the owner fetches what it can take) and exposes the same requests; a
request whose connection dies raises RelayError("unavailable") and may be retried (the relay
does not deduplicate: a retried deposit may be stored twice, and the recipient drops the
copy by its sender and seq). A session opened with rate_limit_patience_s (RelayClient's are)
answers a "rate-limited" refusal by waiting the relay's retry_after and sending the request
again: the relay refused it before carrying it out, and a reconnect would only spend the
tokens the session is waiting for.
Envelopes and backups are opaque bytes here; meshd/protocol/envelope.py seals and opens them.

Rendezvous: RelaySession.rendezvous() (and RelayClient's, for the inviter's offer) returns a
PipeStream, a trio.abc.Stream whose bytes travel as relay.pipe frames to the device at the
other end of the rendezvous; open_join_pipe() is the new device's side, on a connection of
its own that never registers (it has no circle yet). Pairing runs over either unchanged.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from ..excgroup import first_leaf
from ..net.transport import CONNECTION_ERRORS, PeerClosed, SecureConnection, connect_secure
from ..protocol.crypto import DHKeyPair, RandomSource, constant_time_equal
from ..protocol.relay import (
    MALFORMED,
    MAX_FETCH_ITEMS,
    MAX_PIPE_DATA_BYTES,
    OFFER_TTL_S,
    RATE_LIMITED,
    RENDEZVOUS_BUSY,
    ROLE_JOIN,
    ROLE_OFFER,
    UNAVAILABLE,
    Envelopes,
    RelayError,
    parse_envelopes,
    parse_error,
    parse_pipe_data,
    pipe_close_frame,
    pipe_frame,
    request_id,
)
from ..quietlog import QuietLogger
from .address import RelayAddress, RelayAddressError

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 15.0
# How long a RelayClient's request waits out "rate-limited" refusals in all before it gives
# the refusal to its caller (whose own retry pause is longer).
RATE_LIMIT_PATIENCE_S = 60.0
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 60.0
# Pipe bytes received and not yet read. A session's reader cannot wait for a slow pipe
# reader (it also routes every other answer), so past this the pipe is dropped instead.
# Pairing reads eagerly; one 16 MiB channel message arrives in 64 KiB frames as it is read.
MAX_PIPE_BUFFER_BYTES = 4 * 1024 * 1024
PIPE_RECEIVE_BYTES = 64 * 1024
# How long closing a pipe may wait to tell the relay (best effort: the relay also closes
# the pipe when the connection goes).
PIPE_CLOSE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class Registration:
    circle_id: bytes
    quota: int
    used: int
    max_envelope: int
    ttl: int
    # The relay storage's random id (protocol/relay.md "Incarnation"); None from a relay
    # too old to send one.
    incarnation: bytes | None = None


@dataclass(frozen=True, slots=True)
class StoredBackup:
    version: int
    blob: bytes


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


@dataclass(eq=False)
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    answer: dict[str, Any] | None = None
    error: RelayError | None = None


class RelaySession:
    """One registered connection to a relay. Use open_relay_session()."""

    def __init__(self, connection: SecureConnection, on_push: Callable[[Envelopes], None]) -> None:
        # Set by the owner: circle records the relay pushed (verified by the owner's merge).
        self.on_records: Callable[[list[bytes]], None] = lambda records: None
        self._connection = connection
        self._on_push = on_push
        self._waiters: dict[int, _Waiter] = {}
        self._next_rid = 1
        self.registration: Registration | None = None
        self.closed_error: RelayError | None = None  # why the session ended, once it has
        self._closed = trio.Event()
        self._pipe: PipeStream | None = None  # this connection's rendezvous (at most one)
        self.rate_limit_patience_s = 0.0  # see the module's docstring

    # -- requests --

    async def register(self, records: list[bytes]) -> Registration:
        answer = await self._request({"t": "relay.register", "records": records}, "relay.registered")
        incarnation = answer.get("incarnation")
        if incarnation is not None and (not isinstance(incarnation, bytes)
                                        or not 1 <= len(incarnation) <= 64):
            raise RelayError(MALFORMED, "relay.registered with a malformed incarnation")
        try:
            self.registration = Registration(bytes(answer["circle"]), int(answer["quota"]),
                                             int(answer["used"]), int(answer["max_envelope"]),
                                             int(answer["ttl"]), incarnation)
        except (KeyError, TypeError, ValueError) as err:
            raise RelayError(MALFORMED, "relay.registered with missing fields") from err
        return self.registration

    async def deposit(self, mailbox: bytes, envelope: bytes) -> int:
        """Store envelope in mailbox; returns its id once the relay has committed it."""
        answer = await self._request(
            {"t": "relay.deposit", "mailbox": mailbox, "envelope": envelope}, "relay.ok")
        envelope_id = answer.get("id")
        if not isinstance(envelope_id, int):
            raise RelayError(MALFORMED, "relay.ok without an envelope id")
        return envelope_id

    async def fetch(self, mailbox: bytes, after: int = 0, limit: int = MAX_FETCH_ITEMS) -> Envelopes:
        answer = await self._request(
            {"t": "relay.fetch", "mailbox": mailbox, "after": after, "limit": limit},
            "relay.envelopes")
        return parse_envelopes(answer)

    async def ack(self, mailbox: bytes, upto: int) -> None:
        """Let the relay delete the mailbox's envelopes up to and including id upto."""
        await self._request({"t": "relay.ack", "mailbox": mailbox, "upto": upto}, "relay.ok")

    async def subscribe(self, mailbox: bytes, after: int = 0, *, notify: bool = False) -> None:
        """Have the relay push the mailbox's envelopes after id `after`, now and as they come;
        with notify, only a hint (relay.envelopes without items) that some are stored."""
        request: dict[str, Any] = {"t": "relay.subscribe", "mailbox": mailbox, "after": after}
        if notify:
            request["notify"] = True
        await self._request(request, "relay.ok")

    async def records(self) -> list[bytes]:
        """The newest circle records the relay holds (unverified: Circle.from_records them)."""
        answer = await self._request({"t": "relay.records"}, "relay.records")
        records = answer.get("records")
        if not isinstance(records, list) or not all(isinstance(r, bytes) for r in records):
            raise RelayError(MALFORMED, "relay.records with fields of the wrong type")
        return records

    async def backup_get(self) -> StoredBackup | None:
        answer = await self._request({"t": "relay.backup_get"}, "relay.backup")
        version, blob = answer.get("version"), answer.get("blob")
        if not isinstance(version, int) or not (blob is None or isinstance(blob, bytes)):
            raise RelayError(MALFORMED, "relay.backup with fields of the wrong type")
        return None if blob is None or version == 0 else StoredBackup(version, blob)

    async def backup_put(self, expected_version: int, version: int, blob: bytes) -> None:
        """Compare-and-swap; raises RelayError('conflict') if the relay holds another version."""
        await self._request({"t": "relay.backup_put", "expected_version": expected_version,
                             "version": version, "blob": blob}, "relay.ok")

    async def segment_put(self, segment_id: bytes, blob: bytes) -> None:
        """Store a backup segment; RelayError('conflict') if the id is taken."""
        await self._request({"t": "relay.segment_put", "id": segment_id, "blob": blob}, "relay.ok")

    async def segment_get(self, segment_id: bytes) -> bytes | None:
        answer = await self._request({"t": "relay.segment_get", "id": segment_id}, "relay.segment")
        blob = answer.get("blob")
        if answer.get("id") != segment_id or not (blob is None or isinstance(blob, bytes)):
            raise RelayError(MALFORMED, "relay.segment with fields of the wrong type")
        return blob

    async def segment_delete(self, segment_ids: list[bytes]) -> None:
        await self._request({"t": "relay.segment_delete", "ids": segment_ids}, "relay.ok")

    async def rendezvous(self, nameplate: int, role: str = ROLE_OFFER) -> PipeStream:
        """Offer (or join) a nameplate; the pipe to the other device once both met.

        An offer waits until a device joins (at most the relay's 10 minutes, then
        RelayError "offer-expired"); cancelling the wait withdraws it. Raises RelayError
        "nameplate-in-use", "no-offer", "rendezvous-busy" (one per connection),
        "unavailable" (connection lost: the relay forgot the offer).
        """
        if role not in (ROLE_OFFER, ROLE_JOIN):
            raise ValueError(f"role must be {ROLE_OFFER!r} or {ROLE_JOIN!r}")
        if self._pipe is not None:
            raise RelayError(RENDEZVOUS_BUSY, "this session already has a rendezvous")
        pipe = PipeStream(self._connection, owns_connection=False, on_close=self._pipe_closed)
        pipe.rid = rid = self._new_rid()
        self._pipe = pipe
        # The relay answers an offer when a device joins, or with offer-expired.
        timeout = OFFER_TTL_S + REQUEST_TIMEOUT_S if role == ROLE_OFFER else REQUEST_TIMEOUT_S
        try:
            await self._request({"t": "relay.rendezvous", "nameplate": nameplate, "role": role},
                                "relay.rendezvous_ready", rid=rid, answer_within_s=timeout)
        except BaseException as err:
            if isinstance(err, RelayError) and err.code != UNAVAILABLE:
                pipe._relay_done = True  # refused: the relay keeps nothing to withdraw
            await pipe.aclose()
            raise
        return pipe

    def _pipe_closed(self, pipe: PipeStream) -> None:
        if self._pipe is pipe:
            self._pipe = None

    def _new_rid(self) -> int:
        rid = self._next_rid
        self._next_rid += 1
        return rid

    async def _request(self, frame: dict[str, Any], answer_type: str, *, rid: int | None = None,
                       answer_within_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        patience = self.rate_limit_patience_s
        while True:
            try:
                return await self._request_once(frame, answer_type, rid=rid,
                                                answer_within_s=answer_within_s)
            except RelayError as err:
                wait = err.retry_after
                if err.code != RATE_LIMITED or wait is None or wait > patience:
                    raise
            # Refused before it was carried out: the same frame again (a pinned rid too:
            # the relay kept nothing under it).
            quiet.info(("rate-limited", frame.get("t")),
                       "relay rate-limited a %s request; sending it again in %.2f s",
                       frame.get("t"), wait)
            patience -= wait
            await trio.sleep(max(wait, 0.001))

    async def _request_once(self, frame: dict[str, Any], answer_type: str, *, rid: int | None,
                            answer_within_s: float) -> dict[str, Any]:
        if self.closed_error is not None:
            raise self.closed_error
        if rid is None:
            rid = self._new_rid()
        waiter = self._waiters[rid] = _Waiter()
        try:
            try:
                await self._connection.send({**frame, "rid": rid})
            except CONNECTION_ERRORS as err:
                raise RelayError(UNAVAILABLE, f"connection lost: {err}") from err
            with trio.fail_after(answer_within_s):
                await waiter.done.wait()
        except trio.TooSlowError:
            raise RelayError(UNAVAILABLE, f"no answer within {answer_within_s:g} s") from None
        finally:
            self._waiters.pop(rid, None)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.answer is not None
        if waiter.answer["t"] != answer_type:
            raise RelayError(MALFORMED, f"expected {answer_type}, got {waiter.answer['t'][:64]!r}")
        return waiter.answer

    # -- reading --

    async def read_forever(self) -> None:
        """Route answers and pushes until the connection ends, then fail pending requests.

        Never raises for the connection's end: closed_error says why it ended.
        """
        try:
            while True:
                self._route(await self._connection.receive())
        except PeerClosed as err:
            self._end(RelayError(UNAVAILABLE, f"the relay closed the connection: {err.reason}"))
        except RelayError as err:
            self._end(err)
        except CONNECTION_ERRORS as err:
            self._end(RelayError(UNAVAILABLE, f"connection lost: {err}"))

    def _route(self, message: dict[str, Any]) -> None:
        rid = request_id(message)
        kind = message["t"]
        pipe = self._pipe
        if kind in ("relay.pipe", "relay.pipe_close"):
            # Ours only once rendezvous_ready arrived: frames of a pipe this session gave
            # up on (a withdrawn offer that a join met meanwhile) come before it and drop.
            if pipe is not None and pipe.ready:
                if kind == "relay.pipe":
                    pipe._deliver(parse_pipe_data(message))  # noqa: SLF001
                else:
                    pipe._peer_closed()  # noqa: SLF001
            return
        if kind == "relay.rendezvous_ready" and pipe is not None and rid == pipe.rid:
            pipe.ready = True  # here, in frame order, not when the waiting task runs
        if kind == "relay.error":
            error = parse_error(message)
            if rid is None:
                raise error  # unsolicited: the relay is closing us (e.g. not-a-member)
            self._answer(rid, error=error)
        elif rid is not None:
            self._answer(rid, answer=message)
        elif kind == "relay.envelopes":
            self._on_push(parse_envelopes(message))
        elif kind == "relay.records":
            records = message.get("records")
            if not isinstance(records, list) or not all(isinstance(r, bytes) for r in records):
                raise RelayError(MALFORMED, "relay.records push without a list of records")
            self.on_records(records)
        else:
            raise RelayError(MALFORMED, f"unexpected {kind[:64]!r} from the relay")

    def _answer(self, rid: int, *, answer: dict[str, Any] | None = None,
                error: RelayError | None = None) -> None:
        waiter = self._waiters.get(rid)
        if waiter is None:
            return  # its caller gave up (timeout or cancellation)
        waiter.answer, waiter.error = answer, error
        waiter.done.set()

    def _end(self, error: RelayError) -> None:
        self.closed_error = error
        self._closed.set()
        if self._pipe is not None:
            self._pipe._fail(error)  # noqa: SLF001
        for waiter in self._waiters.values():
            waiter.error = error
            waiter.done.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def aclose(self) -> None:
        await self._connection.aclose()


@asynccontextmanager
async def open_relay_session(
    address: RelayAddress | str,
    static: DHKeyPair,
    records: list[bytes],
    *,
    on_push: Callable[[Envelopes], None] = lambda envelopes: None,
    rng: RandomSource = os.urandom,
    on_records: Callable[[list[bytes]], None] | None = None,
    rate_limit_patience_s: float = 0.0,
) -> AsyncIterator[RelaySession]:
    """Connect (pinned key), register, and yield the session; closes it on exit.

    Raises UnauthorizedPeer if the relay's key is not the pinned one, RelayError if it
    refuses the registration, and trio/OS errors if it cannot be reached.
    """
    if isinstance(address, str):
        address = RelayAddress.parse(address)
    pinned = address.key
    with trio.fail_after(CONNECT_TIMEOUT_S):
        connection = await connect_secure(
            address.host, address.port, static=static, rng=rng,
            authorize=lambda key: constant_time_equal(key, pinned))
    session = RelaySession(connection, on_push)
    session.rate_limit_patience_s = rate_limit_patience_s
    if on_records is not None:  # from the start: a refusal may come with a removal notice
        session.on_records = on_records
    refused: RelayError | None = None
    async with connection:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.read_forever)
            try:
                await session.register(records)
            except RelayError as err:
                refused = err  # raised below, outside the nursery: not wrapped in a group
            else:
                yield session
            nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused


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
    if isinstance(relay_address, str):
        relay_address = RelayAddress.parse(relay_address)
    pinned = relay_address.key
    with trio.fail_after(CONNECT_TIMEOUT_S):
        connection = await connect_secure(
            relay_address.host, relay_address.port, static=static, rng=rng,
            authorize=lambda key: constant_time_equal(key, pinned))
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


# ---- the client that stays connected -------------------------------------------------


class MailboxWatch:
    """Hints that a mailbox may hold something new, across reconnects (RelayClient.watch).

    The relay's pushes are hints only: the owner fetches what it can take (pull-based flow
    control, meshd/protocol/mailbox.py), so nothing pushed is buffered or dropped here, and a
    relay cannot make a device's memory grow. Each new session subscribes again and hints.
    """

    def __init__(self, client: RelayClient, mailbox: bytes) -> None:
        self.mailbox = mailbox
        self._client = client
        self._hinted = trio.Event()

    def hint(self) -> None:
        self._hinted.set()

    async def wait(self) -> None:
        """Until a push, or a new session, since the last wait()."""
        await self._hinted.wait()
        self._hinted = trio.Event()

    def close(self) -> None:
        if self._client._watches.get(self.mailbox) is self:  # noqa: SLF001
            del self._client._watches[self.mailbox]  # noqa: SLF001


class RelayClient:
    """Keeps one registered session to a relay; its requests wait for a connection.

    A relay may have several addresses (processes on one database, same key): when the
    session at one ends or cannot be opened, the client tries the next address at once,
    and backs off only once every address has failed in a row. Watched mailboxes are
    subscribed again (for hints) wherever it reconnects; their owners fetch from their
    cursors."""

    def __init__(
        self,
        address: RelayAddress | str,
        static: DHKeyPair,
        records: Callable[[], list[bytes]],
        *,
        rng: RandomSource = os.urandom,
        min_backoff_s: float = MIN_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        on_connected: Callable[[], None] | None = None,
        on_records: Callable[[list[bytes]], None] | None = None,
        incarnation: bytes | None = None,
        on_incarnation: Callable[[bytes | None, bytes], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        alternates: Sequence[RelayAddress | str] = (),
    ) -> None:
        self.address = RelayAddress.parse(address) if isinstance(address, str) else address
        self.addresses = [self.address]  # the one in use is self.address
        for alternate in alternates:
            self.add_alternate(alternate)
        # The relay storage's id last seen (protocol/relay.md "Incarnation"). A session that
        # registers with another one calls on_incarnation(previous, new) first (previous
        # None: the first one seen), so the owner resets what it keeps per relay (its
        # cursors, from id 0) before anything is read, and hints every watched mailbox.
        self.incarnation = incarnation
        self._on_incarnation = on_incarnation
        self._static = static
        self._records = records
        self._rng = rng
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        # Called once each session is up: the records registered were read before the
        # handshake, so an owner whose circle changed meanwhile registers again.
        self._on_connected = on_connected
        self._on_records = on_records
        self._on_disconnected = on_disconnected  # called when a session that was up ends
        self._session: RelaySession | None = None
        self._connected = trio.Event()
        self._watches: dict[bytes, MailboxWatch] = {}
        self.last_error: str | None = None  # for status: why the last attempt or session ended
        self.connects = 0

    def add_alternate(self, address: RelayAddress | str) -> None:
        """Another address of the same relay (its key must be the same)."""
        parsed = RelayAddress.parse(address) if isinstance(address, str) else address
        if parsed.key != self.address.key:
            raise RelayAddressError(f"{parsed} has another key than {self.address}: "
                                    "not an address of the same relay")
        if parsed not in self.addresses:
            self.addresses.append(parsed)

    def _next_address(self) -> None:
        self.address = self.addresses[(self.addresses.index(self.address) + 1) % len(self.addresses)]

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def registration(self) -> Registration | None:
        return self._session.registration if self._session else None

    @property
    def session(self) -> RelaySession | None:
        """The live session, if connected (e.g. to register newer records at once)."""
        return self._session

    def describe(self) -> dict[str, Any]:
        return {"address": str(self.address), "connected": self.connected,
                "error": self.last_error,
                "incarnation": self.incarnation.hex() if self.incarnation else None}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        backoff = self._min_backoff_s
        jitter = random.Random(self._rng(8))
        failed_in_a_row = 0  # addresses that failed since the last session was up
        while True:
            try:
                async with open_relay_session(self.address, self._static, self._records(),
                                              on_push=self._route_push, rng=self._rng,
                                              on_records=self._on_records,
                                              rate_limit_patience_s=RATE_LIMIT_PATIENCE_S) as session:
                    self._session = session
                    if self._on_records is not None:
                        session.on_records = self._on_records
                    self._check_incarnation(session)
                    for watch in list(self._watches.values()):
                        await session.subscribe(watch.mailbox, notify=True)
                    self.connects += 1
                    self.last_error = None
                    backoff = self._min_backoff_s
                    failed_in_a_row = 0
                    self._connected.set()
                    log.info("relay %s:%d connected", self.address.host, self.address.port)
                    if self._on_connected is not None:
                        self._on_connected()
                    for watch in list(self._watches.values()):
                        watch.hint()  # a new session: fetch (and acknowledge) again
                    await session.wait_closed()
                    raise session.closed_error or RelayError(UNAVAILABLE, "session ended")
            except* CONNECTION_ERRORS as group:
                error = first_leaf(group)
                self.last_error = str(error)
                quiet.warning(("relay", self.address.host, type(error).__name__),
                              "relay %s:%d: %s", self.address.host, self.address.port, error)
            finally:
                was_up, self._session = self._session is not None, None
                if self._connected.is_set():
                    # Only a set event is replaced: tasks waiting in wait_connected() or
                    # _current() wait on the one they found, through any failed attempts
                    # (on to another address, or a backoff) until a session is up.
                    self._connected = trio.Event()
                if was_up and self._on_disconnected is not None:
                    self._on_disconnected()
            failed_in_a_row += 1
            self._next_address()
            if failed_in_a_row < len(self.addresses):
                continue  # another address of this relay may be up: try it now
            await trio.sleep(backoff * (0.5 + jitter.random()))
            backoff = min(self._max_backoff_s, backoff * 2)

    def _check_incarnation(self, session: RelaySession) -> None:
        new = session.registration.incarnation if session.registration else None
        if new is None or new == self.incarnation:
            return
        previous, self.incarnation = self.incarnation, new
        if previous is not None:
            log.warning("relay %s:%d is a new incarnation (its storage was wiped or replaced)",
                        self.address.host, self.address.port)
        if self._on_incarnation is not None:
            self._on_incarnation(previous, new)
        if previous is not None:
            for watch in self._watches.values():
                watch.hint()  # its ids start again: the owner reads from its (reset) cursor

    async def wait_connected(self) -> None:
        while self._session is None:
            await self._connected.wait()

    async def _current(self) -> RelaySession:
        while self._session is None:
            await self._connected.wait()
        return self._session

    async def watch(self, mailbox: bytes) -> MailboxWatch:
        """Hints for the mailbox (relay.subscribe with notify), now and after every reconnect.

        Raises RelayError if the relay refuses the subscription (e.g. too many)."""
        watch = MailboxWatch(self, mailbox)
        self._watches[mailbox] = watch
        if self._session is not None:
            try:
                await self._session.subscribe(mailbox, notify=True)
            except RelayError as err:
                if err.code != UNAVAILABLE:
                    watch.close()
                    raise
                # the next session subscribes it again
        watch.hint()
        return watch

    async def deposit(self, mailbox: bytes, envelope: bytes) -> int:
        return await (await self._current()).deposit(mailbox, envelope)

    async def fetch(self, mailbox: bytes, after: int = 0, limit: int = MAX_FETCH_ITEMS) -> Envelopes:
        return await (await self._current()).fetch(mailbox, after, limit)

    async def ack(self, mailbox: bytes, upto: int) -> None:
        await (await self._current()).ack(mailbox, upto)

    async def records(self) -> list[bytes]:
        return await (await self._current()).records()

    async def backup_get(self) -> StoredBackup | None:
        return await (await self._current()).backup_get()

    async def backup_put(self, expected_version: int, version: int, blob: bytes) -> None:
        await (await self._current()).backup_put(expected_version, version, blob)

    async def segment_put(self, segment_id: bytes, blob: bytes) -> None:
        await (await self._current()).segment_put(segment_id, blob)

    async def segment_get(self, segment_id: bytes) -> bytes | None:
        return await (await self._current()).segment_get(segment_id)

    async def segment_delete(self, segment_ids: list[bytes]) -> None:
        await (await self._current()).segment_delete(segment_ids)

    async def rendezvous(self, nameplate: int, role: str = ROLE_OFFER) -> PipeStream:
        """RelaySession.rendezvous on the current session (an inviter's offer). The offer
        lives as long as that session: "unavailable" means offer again once reconnected."""
        return await (await self._current()).rendezvous(nameplate, role)

    def _route_push(self, envelopes: Envelopes) -> None:
        # A hint whatever it carries: a relay that pushes envelopes themselves (one that
        # ignores notify) costs bandwidth, never memory; the owner fetches them again.
        watch = self._watches.get(envelopes.mailbox)
        log.debug("relay %s: hint for mailbox %s (%s)", self.address.host, envelopes.mailbox.hex()[:8],
                  "watched" if watch is not None else "not watched")
        if watch is not None:
            watch.hint()

