"""The device's side of one mailbox at one relay, as a state machine (no I/O).

One invariant: the relay is told to delete (`relay.ack`, which is cumulative) only envelopes
this device has durably applied. Everything else follows from it:

- **Pull, not push.** The device asks for what it can take (`relay.fetch` after its cursor,
  at most `room` items); the relay's pushes are only hints that something new is stored. No
  envelope is ever dropped for lack of room, so the cursor never jumps over one.
- **A fetch answer is a contiguous run.** A relay answers a fetch with every envelope it
  holds after `after`, in id order, so once each envelope of the run is applied the cursor
  may pass all of it. An answer to a fetch this reader no longer waits for (from before a
  reconnect, a duplicate, one overtaken by a rewind) is ignored: it may not be contiguous
  with the present cursor.
- **In hand until applied.** Fetched envelopes are handed out in id order; `applied(id)`
  says the oldest one is durably applied (its content committed, or durably judged a copy or
  garbage). `failed()` (e.g. a full disk) forgets everything in hand and rewinds the cursor
  to the last applied id, so the relay sends those again.
- **Acks.** `ack_due()` offers the highest applied id not yet acknowledged. After a
  reconnect the relay's acknowledged point is unknown (it may have lost an ack it never
  confirmed), so the last applied id is acknowledged again (acks are idempotent).

The shell (meshd/relay/links.py) persists `applied_through` (the mailbox cursor) after
applying and before acknowledging. A relay whose state was wiped starts its ids again:
`reset()` forgets the positions (every envelope it then serves is new to the cursor; the
replay tracker recognises copies).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import RemoteProtocolError

# Envelopes fetched and not yet applied, at most (the relay's fetch limit is 1,024).
DEFAULT_WINDOW = 256


class MailboxMisbehaved(RemoteProtocolError):
    """A fetch answer that no relay following protocol/relay.md sends."""

    reason = "mailbox-order"


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """Ask the relay for at most `limit` envelopes with id > `after` (`relay.fetch`)."""

    token: int
    after: int
    limit: int


class MailboxReader:
    """Cursor, envelopes in hand, what is applied, what may be acknowledged.

    Not thread-safe; one reader per (relay, mailbox). Ids are the relay's envelope ids.
    """

    def __init__(self, applied_through: int = 0, *, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.applied_through = applied_through  # every envelope the relay served up to here is applied
        self.cursor = applied_through  # the last id fetched (>= applied_through)
        self.acked = 0  # the relay confirmed deleting everything up to here (this connection)
        self._in_hand: deque[int] = deque()  # fetched, not yet applied, in id order
        self._fetch: FetchRequest | None = None  # the one fetch in flight
        self._acking: int | None = None  # the one ack in flight
        self._tokens = 0
        self._maybe_more = True  # the relay may hold envelopes after the cursor

    # -- what to ask the relay ------------------------------------------------------------

    @property
    def in_hand(self) -> int:
        return len(self._in_hand)

    @property
    def idle(self) -> bool:
        """Nothing to fetch until a hint, a reconnect or an applied envelope makes room."""
        return self._fetch is None and (not self._maybe_more or self._room() == 0)

    def next_fetch(self) -> FetchRequest | None:
        """The fetch to send now, or None (one in flight, nothing new, or no room)."""
        if self._fetch is not None or not self._maybe_more or self._room() == 0:
            return None
        self._tokens += 1
        self._maybe_more = False  # until this answer says more, or a hint comes meanwhile
        self._fetch = FetchRequest(self._tokens, self.cursor, self._room())
        return self._fetch

    def ack_due(self) -> int | None:
        """The id to acknowledge now (every envelope up to it is applied), or None."""
        if self._acking is not None or self.applied_through <= self.acked:
            return None
        self._acking = self.applied_through
        return self._acking

    # -- what happened ----------------------------------------------------------------------

    def hint(self) -> None:
        """The relay pushed something for this mailbox: there may be more to fetch."""
        self._maybe_more = True

    def fetched(self, request: FetchRequest, items: Sequence[tuple[int, bytes]],
                more: bool) -> list[tuple[int, bytes]]:
        """The answer to `request`: the envelopes to apply now, in order (possibly none).

        Raises MailboxMisbehaved for items out of order, at or before `after`, or more than
        asked for (the caller ends that connection).
        """
        if request is not self._fetch:
            return []  # stale: from before a reconnect or a rewind, or a duplicate
        self._fetch = None
        previous = request.after
        for envelope_id, _ in items:
            if envelope_id <= previous:
                raise MailboxMisbehaved(f"envelope id {envelope_id} after {previous} in a fetch answer")
            previous = envelope_id
        if len(items) > request.limit:
            raise MailboxMisbehaved(f"{len(items)} envelopes for a fetch of {request.limit}")
        if items:
            self._in_hand.extend(envelope_id for envelope_id, _ in items)
            self.cursor = items[-1][0]
            self._maybe_more = self._maybe_more or more
        return list(items)

    def fetch_failed(self, request: FetchRequest) -> None:
        """The fetch got no answer (timeout, lost connection): ask again later."""
        if request is self._fetch:
            self._fetch = None
            self._maybe_more = True

    def applied(self, envelope_id: int) -> None:
        """The oldest envelope in hand is durably applied (or durably judged a copy)."""
        if not self._in_hand or self._in_hand[0] != envelope_id:
            raise ValueError(f"envelope {envelope_id} is not the oldest in hand")
        self._in_hand.popleft()
        self.applied_through = envelope_id

    def failed(self) -> None:
        """Applying the oldest envelope in hand failed: forget what is in hand, and fetch
        again from the last applied id (later)."""
        self._in_hand.clear()
        self.cursor = self.applied_through
        self._fetch = None  # an answer in flight would not start at the new cursor
        self._maybe_more = True

    def ack_done(self, upto: int) -> None:
        if upto == self._acking:
            self._acking = None
            self.acked = max(self.acked, upto)

    def ack_failed(self, upto: int) -> None:
        if upto == self._acking:
            self._acking = None

    def disconnected(self) -> None:
        """The connection went: answers in flight will not come, and the relay's ack point
        is unknown until acknowledged again. Envelopes in hand may still be applied."""
        self._fetch = None
        self._acking = None
        self.acked = 0
        self._maybe_more = True

    def reset(self) -> None:
        """The relay's ids started again (its state was wiped): forget every position."""
        self._in_hand.clear()
        self.applied_through = self.cursor = self.acked = 0
        self._fetch = None
        self._acking = None
        self._maybe_more = True

    def _room(self) -> int:
        return max(0, self.window - len(self._in_hand))
