"""The relay's rules for its connections, sans-IO (protocol/relay.md).

What a relay decides about a connection, given the requests it parsed and the time (passed
in): who may register for which circle, who is still a member, which request a connection
may make (rate limits, the unregistered joiner's one pipe), which connections hear of a
mailbox, and the rendezvous table (an offer per nameplate, the join that consumes it, the
pipe between the two, its byte cap and deadline). The trio server (meshd/relay/server.py)
does the reading, sending, storage and timers around it, and carries out what these rules
return. Nothing here waits: every method returns at once or raises a RelayError.

Connections are the caller's objects (a subclass of Connection), so what the rules return
(the sides of a pipe, the members to tell) are the caller's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .admission import Admission
from .circle import Circle
from .crypto import blake2b_256
from .relay import (
    BAD_RECORDS,
    MAX_PIPE_TOTAL_BYTES,
    MAX_SUBSCRIPTIONS,
    NAMEPLATE_IN_USE,
    NO_OFFER,
    NOT_A_MEMBER,
    NOT_REGISTERED,
    OFFER_EXPIRED,
    OFFER_TTL_S,
    PIPE_LIFETIME_S,
    RATE_LIMITED,
    RENDEZVOUS_BUSY,
    ROLE_JOIN,
    TOO_MANY_SUBSCRIPTIONS,
    Limits,
    PipeClose,
    PipeData,
    Register,
    RelayError,
    Rendezvous,
    Request,
    TokenBucket,
    error_frame,
    parse_request,
    pipe_close_frame,
    pipe_frame,
    rendezvous_ready_frame,
    request_cost,
)
from .removal import removal_notice

PIPE_FRAME_TYPES = frozenset({"relay.pipe", "relay.pipe_close"})
JOINER_ONLY = "a connection that joined a rendezvous without registering may only use its pipe"


class Usage(dict[bytes, int]):
    """Stored bytes per circle, keeping their sum (the relay-wide cap checks it per deposit)."""

    def __init__(self, initial: dict[bytes, int]) -> None:
        super().__init__(initial)
        self.total = sum(initial.values())

    def __setitem__(self, circle_id: bytes, used: int) -> None:
        self.total += used - self.get(circle_id, 0)
        super().__setitem__(circle_id, used)


@dataclass(eq=False, kw_only=True)
class Connection:
    """What the relay knows about one connection."""

    key: bytes  # the device's X25519 static key, from the handshake
    source: str = "unknown"  # its IP address (joins and connections are limited per address)
    circle_id: bytes | None = None
    subscriptions: dict[bytes, int] = field(default_factory=dict)  # mailbox -> last id sent
    notify_only: set[bytes] = field(default_factory=set)  # subscriptions that get hints only
    # Joined a rendezvous without registering: it may use only that pipe, and is closed
    # when the pipe ends.
    joiner_only: bool = False
    rendezvous: Meeting[Any] | None = None  # its offer or pipe


C = TypeVar("C", bound=Connection)


@dataclass(eq=False)
class Meeting(Generic[C]):
    """One offer on a nameplate and, once a join consumed it, the pipe between the two."""

    nameplate: int
    offer: C
    offer_rid: int
    deadline: float  # the offer's expiry while it waits, then the pipe's end
    claimed: bool = False  # recorded in a shared storage (released once consumed or ended)
    join: C | None = None
    piped_bytes: int = 0
    closed: bool = False

    def other(self, side: C) -> C | None:
        return self.join if side is self.offer else self.offer


@dataclass
class Ended(Generic[C]):
    """What ending a rendezvous asks of the caller."""

    meeting: Meeting[C]
    sends: list[tuple[C, dict[str, Any]]]  # frames to queue, in order
    finish: list[C]  # joiner-only connections to close once their queue is sent
    release: bool  # the nameplate's claim in the shared storage is to be released


@dataclass
class Forward(Generic[C]):
    """A relay.pipe frame to queue for the other side."""

    to: C
    frame: dict[str, Any]


class RelayRules(Generic[C]):
    def __init__(self, limits: Limits, admission: Admission) -> None:
        self.limits = limits
        self.admission = admission
        self.circles: dict[bytes, Circle] = {}
        self._known_records: dict[bytes, bytes] = {}  # encoded record -> its circle id
        self.members: dict[bytes, set[C]] = {}  # circle id -> its registered connections
        self._subscribers: dict[tuple[bytes, bytes], set[C]] = {}
        self._buckets: dict[bytes, TokenBucket] = {}  # device key -> its requests
        self._join_buckets: dict[str, TokenBucket] = {}  # source address -> its joins
        # Requests per key not yet told to sibling processes (counted when share_rates).
        self.share_rates = False
        self.rate_taken: dict[bytes, int] = {}
        self.offers: dict[int, Meeting[C]] = {}  # nameplate -> the offer waiting on it
        self.live: set[Meeting[C]] = set()  # offers and open pipes

    # -- circles and membership --

    def remember(self, circle: Circle) -> None:
        self.circles[circle.circle_id] = circle
        for record in circle.records():
            self._known_records[record] = circle.circle_id

    def circle_of_member(self, key: bytes) -> Circle:
        """The one circle held whose active members include this X25519 key (recovery)."""
        found = [c for c in self.circles.values() if c.state.member_by_dh(key) is not None]
        if len(found) != 1:
            raise RelayError(NOT_A_MEMBER, "no circle here has this key as a member"
                             if not found else "this key is in several circles: send records")
        return found[0]

    def circle_for(self, records: tuple[bytes, ...]) -> Circle | None:
        """The circle already held when it contains every record given (the common case)."""
        circle_id = self._known_records.get(records[0])
        if circle_id is None or any(self._known_records.get(r) != circle_id for r in records):
            return None
        return self.circles[circle_id]

    def admit(self, records: tuple[bytes, ...], token: bytes | None = None) -> None:
        """Before verifying: a new circle (no offered record is the genesis of one held)
        must be admitted (with the enrolment token the registration carried, if any). The
        circle id is the genesis record's hash, so this costs hashes."""
        if any(blake2b_256(r) in self.circles for r in records):
            return
        allowed = self.admission.allowed_circles
        offered = next((h for r in records if (h := blake2b_256(r)) in allowed), b"")
        self.admission.check_new_circle(offered, len(self.circles), token)

    def bind(self, conn: C, circle: Circle) -> list[bytes]:
        """A registration's circle: the connection serves it from now on. Returns the
        removal notice to send first when the key is a removed member (else [])."""
        if conn.circle_id is not None and conn.circle_id != circle.circle_id:
            raise RelayError(BAD_RECORDS, "a connection serves one circle")
        conn.circle_id = circle.circle_id
        if circle.state.member_by_dh(conn.key) is None:
            return removal_notice(circle, conn.key)
        return []

    def enrol(self, conn: C) -> None:
        """After bind() and the notice: a member's connection joins its circle's list."""
        self.check_member(conn)
        assert conn.circle_id is not None
        self.members.setdefault(conn.circle_id, set()).add(conn)

    def check_member(self, conn: C) -> None:
        if conn.circle_id is None:
            raise RelayError(NOT_REGISTERED, "register first")
        if self.circles[conn.circle_id].state.member_by_dh(conn.key) is None:
            raise RelayError(NOT_A_MEMBER, "this key is not an active member of the circle")

    def removed(self, circle_id: bytes) -> list[tuple[C, list[bytes], Ended[C] | None]]:
        """Connections of the circle whose key is no longer a member, each with its removal
        notice; they are forgotten here, ending their rendezvous (the caller tells them,
        carries out the end and closes them)."""
        circle = self.circles[circle_id]
        return [(conn, removal_notice(circle, conn.key), self.forget(conn))
                for conn in list(self.members.get(circle_id, ()))
                if circle.state.member_by_dh(conn.key) is None]

    def others(self, circle_id: bytes, registrant: C | None) -> list[C]:
        """The circle's connections to tell that its record set changed: not the registrant,
        which sent the change and asks relay.records for the merged set."""
        return [conn for conn in self.members.get(circle_id, ()) if conn is not registrant]

    # -- requests --

    def accept(self, conn: C, message: dict[str, Any], now: float) -> Request:
        """A request frame (not a pipe frame) the connection may make, parsed; or a
        RelayError to answer it with. Every request is charged to the key's bucket."""
        wait = self._bucket(conn.key, now).take(now, cost := request_cost(message))
        if wait:
            raise RelayError(RATE_LIMITED, "too many requests", retry_after=round(wait, 3))
        if self.share_rates:  # the siblings debit what it cost here
            self.rate_taken[conn.key] = self.rate_taken.get(conn.key, 0) + int(cost)
        request = parse_request(message)
        if conn.joiner_only:
            raise RelayError(NOT_REGISTERED, JOINER_ONLY)
        if isinstance(request, Rendezvous) and request.role == ROLE_JOIN and conn.circle_id is None:
            conn.joiner_only = True  # a new device has no circle to register with: it may join
        elif not isinstance(request, Register):
            self.check_member(conn)
        return request

    @staticmethod
    def ends_connection(conn: Connection, err: RelayError) -> bool:
        """Whether a refusal ends the connection: a fatal one, or any for a joiner-only
        connection (after no-offer, rate-limited, ... there is nothing left for it to do)."""
        return err.fatal or conn.joiner_only

    def charge_rate(self, key: bytes, now: float, taken: int) -> None:
        """Requests this key made at a sibling process of the same relay."""
        self._bucket(key, now).debit(now, taken)

    def _bucket(self, key: bytes, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.limits.rate_per_s, self.limits.burst, now)
        return bucket

    def sweep(self, now: float) -> None:
        """Forget full buckets (a key or address idle long enough is as good as new)."""
        for key in [k for k, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[key]
        for source in [s for s, bucket in self._join_buckets.items() if bucket.full(now)]:
            del self._join_buckets[source]

    # -- subscriptions --

    def subscribe(self, conn: C, mailbox: bytes, after: int, notify: bool) -> None:
        assert conn.circle_id is not None
        if mailbox not in conn.subscriptions and len(conn.subscriptions) >= MAX_SUBSCRIPTIONS:
            raise RelayError(TOO_MANY_SUBSCRIPTIONS, f"at most {MAX_SUBSCRIPTIONS} per connection")
        conn.subscriptions[mailbox] = after
        if notify:
            conn.notify_only.add(mailbox)
        else:
            conn.notify_only.discard(mailbox)
        self._subscribers.setdefault((conn.circle_id, mailbox), set()).add(conn)

    def subscribers(self, circle_id: bytes, mailbox: bytes) -> set[C]:
        return self._subscribers.get((circle_id, mailbox), set())

    def all_subscribers(self) -> set[C]:
        return {conn for conns in self._subscribers.values() for conn in conns}

    def forget(self, conn: C) -> Ended[C] | None:
        """The connection is gone (or removed): drop it everywhere; its rendezvous ends."""
        ended = self.end(conn.rendezvous, closer=conn) if conn.rendezvous is not None else None
        if conn.circle_id is not None:
            self.members.get(conn.circle_id, set()).discard(conn)
            for mailbox in conn.subscriptions:
                subscribers = self._subscribers.get((conn.circle_id, mailbox))
                if subscribers is not None:
                    subscribers.discard(conn)
                    if not subscribers:
                        del self._subscribers[(conn.circle_id, mailbox)]
        return ended

    # -- rendezvous --

    @staticmethod
    def check_free(conn: Connection) -> None:
        """A connection has one rendezvous at most (an offer, or a pipe)."""
        if conn.rendezvous is not None:
            raise RelayError(RENDEZVOUS_BUSY, "this connection already has a rendezvous")

    def check_offer(self, conn: C, nameplate: int) -> None:
        """Raises unless the connection may offer on the nameplate (checked again after a
        shared storage's claim, which may have let another offer in)."""
        self.check_free(conn)
        if nameplate in self.offers:
            raise RelayError(NAMEPLATE_IN_USE, f"nameplate {nameplate} has an offer")

    def offer(self, conn: C, request: Rendezvous, now: float, *, claimed: bool = False) -> Meeting[C]:
        """Hold the offer until a join consumes it (no answer until then) or it expires."""
        self.check_offer(conn, request.nameplate)
        meeting = Meeting(request.nameplate, conn, request.rid, now + OFFER_TTL_S, claimed)
        self.offers[request.nameplate] = conn.rendezvous = meeting
        self.live.add(meeting)
        return meeting

    def take_offer(self, nameplate: int) -> Meeting[C] | None:
        """Popped at once: the first join consumes the offer; the inviter offers it again
        when the pipe ends before an attempt (protocol/pairing.md)."""
        return self.offers.pop(nameplate, None)

    def join(self, conn: C, meeting: Meeting[C] | None, request: Rendezvous, now: float, *,
             sibling: bool = False) -> list[tuple[C, dict[str, Any]]]:
        """The join of the offer taken (None: none waits). Only a join that finds nothing
        (probing nameplates) costs its address a token: one that finds an offer is paced by
        that offer, so a stranger probing from an address never blocks a joiner there from
        the offer it was told about. A sibling relay process passing a join on was limited
        where the joiner connected. Returns the relay.rendezvous answers to queue, both
        sides' (through the send queues, like the pipe frames that follow them)."""
        if meeting is None:
            wait = 0.0 if sibling else self._join_bucket(conn.source, now).take(now)
            if wait:
                raise RelayError(RATE_LIMITED, "too many joins", retry_after=round(wait, 3))
            raise RelayError(NO_OFFER, f"no offer waits on nameplate {request.nameplate}")
        meeting.join = conn
        conn.rendezvous = meeting
        meeting.deadline = now + PIPE_LIFETIME_S
        return [(meeting.offer, rendezvous_ready_frame(meeting.offer_rid)),
                (conn, rendezvous_ready_frame(request.rid))]

    def _join_bucket(self, source: str, now: float) -> TokenBucket:
        bucket = self._join_buckets.get(source)
        if bucket is None:
            bucket = self._join_buckets[source] = TokenBucket(
                self.limits.join_rate_per_s, self.limits.join_burst, now)
        return bucket

    def pipe(self, conn: C, request: Request) -> Forward[C] | Ended[C] | None:
        """A pipe frame (not charged to the bucket: it has no rid for a rate-limited answer;
        the pipe is paced by the bounded queue and capped in bytes and lifetime). Returns the
        frame to forward, the rendezvous ended, or None: nothing to do (a frame crossing the
        other side's close, or sent on an offer nobody joined yet)."""
        meeting = conn.rendezvous
        if meeting is None:
            if conn.circle_id is None and not conn.joiner_only:
                raise RelayError(NOT_REGISTERED, "register or join first")
            return None
        if isinstance(request, PipeClose):
            return self.end(meeting, closer=conn)
        assert isinstance(request, PipeData)
        other = meeting.other(conn)
        if other is None:
            return None
        meeting.piped_bytes += len(request.data)
        if meeting.piped_bytes > MAX_PIPE_TOTAL_BYTES:
            return self.end(meeting, closer=None)
        return Forward(other, pipe_frame(request.data))

    def expire(self, meeting: Meeting[C]) -> Ended[C]:
        """Its deadline passed: an offer nobody joined is refused, a pipe is closed."""
        ended = self.end(meeting, closer=None)
        if meeting.join is None:
            ended.sends.insert(0, (meeting.offer, error_frame(meeting.offer_rid, RelayError(
                OFFER_EXPIRED, f"nobody joined within {OFFER_TTL_S:g} s"))))
        return ended

    def end(self, meeting: Meeting[C], *, closer: C | None) -> Ended[C]:
        """Withdraw the offer or close the pipe. The side that did not close it (closer:
        the side that sent pipe_close or went away; None: the relay) gets relay.pipe_close."""
        ended = Ended(meeting, [], [], release=False)
        if meeting.closed:
            return ended
        meeting.closed = True
        ended.release, meeting.claimed = meeting.claimed, False
        self.live.discard(meeting)
        if self.offers.get(meeting.nameplate) is meeting:
            del self.offers[meeting.nameplate]
        for side in (meeting.offer, meeting.join):
            if side is None:
                continue
            if side.rendezvous is meeting:
                side.rendezvous = None
            if side is not closer and meeting.join is not None:
                ended.sends.append((side, pipe_close_frame()))
            if side.joiner_only:
                ended.finish.append(side)  # its one rendezvous is over
        return ended

    def consumed(self, meeting: Meeting[C]) -> bool:
        """A join took the offer: whether its shared-storage claim is to be released now."""
        release, meeting.claimed = meeting.claimed, False
        return release

    @property
    def rendezvous_status(self) -> dict[str, int]:
        """Offers waiting and pipes open."""
        pipes = sum(1 for m in self.live if m.join is not None)
        return {"offers": len(self.live) - pipes, "pipes": pipes}


def is_pipe_frame(message: dict[str, Any]) -> bool:
    return message.get("t") in PIPE_FRAME_TYPES
