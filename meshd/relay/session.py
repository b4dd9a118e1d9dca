"""One registered connection to a relay: pipelined requests by id, one reader routing answers.

RelaySession dials HOST:PORT, refuses any relay whose static key is not the one pinned in the
address, registers with the circle's records, and then sends requests while one reader task
routes answers to their callers and pushed envelopes to on_push. A request whose connection
dies raises RelayError("unavailable") and may be retried (the relay does not deduplicate: a
retried deposit may be stored twice, and the recipient drops the copy by its sender and seq).
A session opened with rate_limit_patience_s (RelayClient's are) answers a "rate-limited"
refusal by waiting the relay's retry_after and sending the request again: the relay refused
it before carrying it out, and a reconnect would only spend the tokens it is waiting for.
Envelopes and backups are opaque bytes here; meshd/protocol/envelope.py seals and opens them.

Rendezvous: RelaySession.rendezvous() returns a PipeStream to the device at the other end;
open_join_pipe() is the new device's side, on a connection of its own that never registers
(it has no circle yet).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ..net.transport import CONNECTION_ERRORS, PeerClosed, SecureConnection
from ..protocol.crypto import DHKeyPair, RandomSource
from ..protocol.relay import (
    MALFORMED,
    MAX_FETCH_ITEMS,
    OFFER_TTL_S,
    RATE_LIMITED,
    RENDEZVOUS_BUSY,
    ROLE_JOIN,
    ROLE_OFFER,
    UNAVAILABLE,
    Envelopes,
    RelayError,
    check_answer,
    parse_envelopes,
    parse_error,
    parse_pipe_data,
    request_id,
)
from ..quietlog import QuietLogger
from .address import RelayAddress
from .pipe import PipeStream, connect_pinned
from .timers import REQUEST_TIMEOUT_S

log = logging.getLogger(__name__)
quiet = QuietLogger(log)



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
    # The relay answers relay.segment_list (an older one closes the connection on it).
    segment_list: bool = False
    # It lists a removed device's blobs (segment_list's `device`; an older one ignores it).
    removed_segments: bool = False


@dataclass(frozen=True, slots=True)
class StoredBackup:
    version: int
    blob: bytes


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

    async def register(self, records: list[bytes], token: bytes | None = None) -> Registration:
        """Register this device's circle (with the relay's enrolment token, if the owner gave
        one: a relay in token mode needs it to take a circle it does not hold yet)."""
        request: dict[str, Any] = {"t": "relay.register", "records": records}
        if token is not None:
            request["token"] = token
        answer = await self._request(request, "relay.registered")
        incarnation = answer.get("incarnation")
        if incarnation is not None and (not isinstance(incarnation, bytes)
                                        or not 1 <= len(incarnation) <= 64):
            raise RelayError(MALFORMED, "relay.registered with a malformed incarnation")
        try:
            self.registration = Registration(bytes(answer["circle"]), int(answer["quota"]),
                                             int(answer["used"]), int(answer["max_envelope"]),
                                             int(answer["ttl"]), incarnation,
                                             answer.get("segment_list") is True,
                                             answer.get("removed_segments") is True)
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

    async def segment_list(self, after: bytes = b"", limit: int | None = None,
                           device: bytes = b"") -> tuple[list[tuple[bytes, int]], bool]:
        """One page of the blobs this device (or `device`, the X25519 key of a device the
        circle removed) stored at the relay: ([(id, size)] in id order after `after`, whether
        more follow). Checked for shape and order only: the relay may still list ids it does
        not hold or leave some out (meshd/backupsweep.py)."""
        request: dict[str, Any] = {"t": "relay.segment_list"}
        if device:
            request["device"] = device
        if after:
            request["after"] = after
        if limit is not None:
            request["limit"] = limit
        answer = await self._request(request, "relay.segments")
        items = [(bytes(i), int(size)) for i, size in answer["items"]]
        ids = [after, *(i for i, _ in items)]
        if any(a >= b for a, b in zip(ids, ids[1:], strict=False)):
            raise RelayError(MALFORMED, "relay.segments not in increasing id order after the one asked")
        if answer["more"] and not items:
            raise RelayError(MALFORMED, "relay.segments with more but no items")
        return items, bool(answer["more"])

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
        check_answer(message)  # every relay.* frame fits its schema before it is routed
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
    token: bytes | None = None,
) -> AsyncIterator[RelaySession]:
    """Connect (pinned key), register, and yield the session; closes it on exit.

    Raises UnauthorizedPeer if the relay's key is not the pinned one, RelayError if it
    refuses the registration, and trio/OS errors if it cannot be reached.
    """
    connection = await connect_pinned(address, static, rng)
    session = RelaySession(connection, on_push)
    session.rate_limit_patience_s = rate_limit_patience_s
    if on_records is not None:  # from the start: a refusal may come with a removal notice
        session.on_records = on_records
    refused: RelayError | None = None
    async with connection:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.read_forever)
            try:
                await session.register(records, token)
            except RelayError as err:
                refused = err  # raised below, outside the nursery: not wrapped in a group
            else:
                yield session
            nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused
