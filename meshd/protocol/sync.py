"""Log sync with one peer as a sans-IO state machine: version vectors, credit, stalls.

Theory of operation. Both sides run the same machine. At start each sends "log.hello" with
its version vector (author -> highest contiguous seq) and grants the peer WINDOW_BYTES of
credit ("log.credit"). After the peer's hello, the sender side streams, author by author
(in byte order of the author key), what the peer lacks: the shell asks next_send() which
(author, after_seq) to read, reads a batch from its store and reports batch_sent(). A batch
may start only while credit is positive, so at most WINDOW_BYTES plus one batch is in
flight. The receiving side hands every "log.entries" batch to the shell (BatchReceived),
which verifies and commits it in one transaction and calls batch_committed(); only then
is the batch's size granted back as credit, so a slow disk slows the sender instead of
filling our memory.

What the peer has is tracked per author (its hello, raised by everything we sent and
everything it sent us), so an entry is sent once per connection and never echoed back.
After an interruption a new connection starts from the committed vectors: nothing
committed is resent, nothing uncommitted is lost.

A peer whose hello claims entries we lack must keep sending them: if neither a hello nor a
committed batch arrived for stall_timeout_s while we are behind, handle_timeout() raises
EntryRejected("stalled").

Credit comes back in bulk: the receiver owes the sizes of the batches it committed and
returns them in one "log.credit" once they reach half its window (a refused batch's size at
once), so the sender's credit never falls below half the window once its batches are
committed and a steady stream costs no message per batch.

Forwarding once (protocol/logs.md, "log.have"): a side whose hello says `have: true` sends
"log.have" (at most every HAVE_INTERVAL_S) naming the authors it now holds beyond what it
knows its peer has; to such a peer the other authors' entries (not our own) are forwarded
only once the peer has not announced them for FORWARD_HOLD_S, so in a circle where everyone
is connected an entry crosses each link once, from its author, instead of being pushed again
by every device that received it.

Messages the machine wants sent accumulate in an outbox (messages_to_send()). Time enters
as `now` arguments only.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import LocalProtocolError
from .log import KEY_BYTES, MAX_SEQ, Batch, EntryRejected
from .schema import Bin, Int, MapOf, SchemaError

# ---- Implementation constants -------------------------------------------------------

# A catch-up batch ends at the first head at or past BATCH_BYTES: each batch costs the
# receiver one transaction, two thread hops and a GIL hand-back after each of its SQL
# statements, and the sender one read; at 1 MiB (about 3,000 entries of 200 B; was 256 KiB)
# a 1,000,000-entry catch-up costs the receiver about 11% less CPU and the sender about 18%
# less (bench/results/issue16-catchup-s8-2026-12-03.txt). The window holds eight such
# batches: the receiver holds up to three past the socket (receivepipe.py) and returns
# credit at half the window, so the sender still has credit while those commit.
WINDOW_BYTES = 8 * 1024 * 1024
BATCH_BYTES = 1024 * 1024
STALL_TIMEOUT_S = 30.0
MAX_VECTOR_AUTHORS = 65536
MAX_CREDIT_BYTES = 1 << 40
# log.have: announce at most this often; hold another author's entries for a peer that
# announces (it may be getting them from their author) for this long before forwarding.
HAVE_INTERVAL_S = 0.25
FORWARD_HOLD_S = 1.0


class State(enum.Enum):
    AWAIT_HELLO = "await hello"  # we sent ours; the peer's vector is unknown
    SYNCING = "syncing"
    ERROR = "error"  # terminal


@dataclass(frozen=True, slots=True)
class BatchReceived:
    """The shell verifies and commits this batch, then calls batch_committed()."""

    batch: Batch


# protocol/logs.md, "Sync messages": a version vector, author -> highest seq.
VECTOR_SCHEMA = MapOf(Bin(exact=KEY_BYTES), Int(0, MAX_SEQ), MAX_VECTOR_AUTHORS)


def parse_vector(value: object) -> dict[bytes, int]:
    """A wire version vector. Raises EntryRejected('malformed')."""
    try:
        VECTOR_SCHEMA.check(value)
    except SchemaError as err:
        raise EntryRejected("malformed", f"vector: {err}") from err
    return value  # type: ignore[return-value]


class SyncSession:
    """One peer's sync state. Raises EntryRejected for bad input or a stalled peer (then
    the session is in ERROR and the connection should close); LocalProtocolError on misuse."""

    def __init__(
        self,
        *,
        now: float,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        window_bytes: int = WINDOW_BYTES,
        batch_bytes: int = BATCH_BYTES,
        own: bytes | None = None,
        have_interval_s: float | None = None,
        forward_hold_s: float | None = None,
    ) -> None:
        self.state = State.AWAIT_HELLO
        self.batch_bytes = batch_bytes
        self._window = window_bytes
        self._stall_timeout_s = stall_timeout_s
        self._outbox: list[dict[str, Any]] = []
        self.started = False
        self._last_progress = now
        self.credit = 0  # bytes we may still send
        self.peer_has: dict[bytes, int] = {}  # what the peer has, to our knowledge
        self.peer_claims: dict[bytes, int] = {}  # what its hello said it has
        self.batches_received = 0
        self.batches_sent = 0
        self._owed = 0  # credit of committed batches not yet returned
        # log.have: whether the peer's hello said it announces; what the peer knows we hold
        # (our hello, what we sent it, what it sent us, what we announced); per held
        # author, (the seq the peer must announce, since when we hold it).
        self._own = own
        self._have_interval_s = HAVE_INTERVAL_S if have_interval_s is None else have_interval_s
        self._forward_hold_s = FORWARD_HOLD_S if forward_hold_s is None else forward_hold_s
        self.peer_announces = False
        self._told: dict[bytes, int] = {}
        self._next_have_at = -math.inf
        self._held: dict[bytes, tuple[int, float]] = {}

    # -- outputs --

    def messages_to_send(self) -> list[dict[str, Any]]:
        out, self._outbox = self._outbox, []
        return out

    @property
    def has_output(self) -> bool:
        """Whether messages_to_send() would return something."""
        return bool(self._outbox)

    # -- inputs --

    def start(self, local_vector: Mapping[bytes, int], now: float) -> None:
        """Queue our hello and the initial credit."""
        if self.started:
            raise LocalProtocolError("sync session already started")
        self.started = True
        self._last_progress = now
        self._outbox.append({"t": "log.hello", "vector": dict(local_vector), "have": True})
        self._told = dict(local_vector)
        self._outbox.append({"t": "log.credit", "bytes": self._window})

    def receive(self, message: dict[str, Any], now: float) -> BatchReceived | None:
        """One received 'log.*' message. Raises EntryRejected for bad input."""
        self._check_usable()
        try:
            return self._receive(message, now)
        except EntryRejected:
            self.state = State.ERROR
            raise

    def _receive(self, message: dict[str, Any], now: float) -> BatchReceived | None:
        kind = message.get("t")
        if kind == "log.entries":
            if self.state is not State.SYNCING:
                raise EntryRejected("malformed", "entries before hello")
            return BatchReceived(Batch.from_message(message))
        if kind == "log.credit":
            grant = message.get("bytes")
            if type(grant) is not int or not 0 < grant <= MAX_CREDIT_BYTES:
                raise EntryRejected("malformed", "credit is not a positive size")
            self.credit += grant
            return None
        if kind == "log.have":
            if self.state is not State.SYNCING:
                raise EntryRejected("malformed", "have before hello")
            for author, seq in parse_vector(message.get("vector")).items():
                if seq > self.peer_has.get(author, 0):
                    self.peer_has[author] = seq
            return None
        if kind == "log.hello":
            if self.state is not State.AWAIT_HELLO:
                raise EntryRejected("malformed", "a second hello")
            vector = parse_vector(message.get("vector"))
            self.peer_claims = dict(vector)
            self.peer_announces = message.get("have") is True
            for author, seq in vector.items():
                self.peer_has[author] = max(self.peer_has.get(author, 0), seq)
            self.state = State.SYNCING
            self._last_progress = now
            return None
        raise EntryRejected("malformed", f"unknown log message type {kind!r}")

    def batch_committed(self, author: bytes, last_seq: int, size: int, now: float) -> None:
        """The batch of a BatchReceived is durable: refill the peer's credit."""
        self._check_usable()
        if last_seq > self.peer_has.get(author, 0):
            self.peer_has[author] = last_seq
        self.batches_received += 1
        self._last_progress = now
        self._tell(author, last_seq)
        self._owed += size
        if self._owed > 0 and self._owed * 2 >= self._window:
            self._outbox.append({"t": "log.credit", "bytes": self._owed})
            self._owed = 0

    def batch_refused(self, author: bytes, size: int, now: float) -> None:
        """The shell refused a well-formed batch that is not the peer's fault (clock-ahead):
        refill the credit and stop expecting that author's claimed entries this session."""
        self._check_usable()
        self.peer_claims.pop(author, None)
        self._last_progress = now
        if size > 0:
            self._outbox.append({"t": "log.credit", "bytes": size})

    def next_send(self, local_vector: Mapping[bytes, int],
                  now: float = math.inf) -> tuple[bytes, int] | None:
        """(author, after_seq) of the next batch to send, or None (nothing, no credit, or
        only entries held for a peer that announces; `now` omitted: nothing is held)."""
        if self.state is not State.SYNCING or self.credit <= 0:
            return None
        for author in sorted(local_vector):
            after = self.peer_has.get(author, 0)
            if local_vector[author] > after and not self._holds(author, local_vector[author],
                                                                 after, now):
                return author, after
        return None

    def _holds(self, author: bytes, have: int, after: int, now: float) -> bool:
        """Whether another author's entries wait for the peer to announce them."""
        if not self.peer_announces or author == self._own or now == math.inf:
            return False
        held = self._held.get(author)
        if held is None or held[0] <= after:  # nothing held, or the peer announced it all
            self._held[author] = held = (have, now)
        return now < held[1] + self._forward_hold_s

    def announce(self, local_vector: Mapping[bytes, int], now: float) -> None:
        """Queue a log.have (if the peer announces too and one is due) naming the other
        authors we hold beyond what the peer knows we hold (our own entries are pushed at
        once, never held, so never announced). Whether the peer has them does not matter:
        it may hold them for us, waiting for this."""
        if self.state is not State.SYNCING or not self.peer_announces:
            return
        if now < self._next_have_at or not (news := self._news(local_vector)):
            return
        self._told.update(news)
        self._next_have_at = now + self._have_interval_s
        self._outbox.append({"t": "log.have", "vector": news})

    def _news(self, local_vector: Mapping[bytes, int]) -> dict[bytes, int]:
        return {author: seq for author, seq in local_vector.items()
                if author != self._own and seq > self._told.get(author, 0)}

    def _tell(self, author: bytes, seq: int) -> None:
        if seq > self._told.get(author, 0):
            self._told[author] = seq

    def batch_sent(self, author: bytes, last_seq: int, size: int) -> None:
        self._check_usable()
        self.credit -= size
        self.batches_sent += 1
        self._tell(author, last_seq)
        if last_seq > self.peer_has.get(author, 0):
            self.peer_has[author] = last_seq

    def behind(self, local_vector: Mapping[bytes, int]) -> int:
        """Entries the peer claimed that we still lack."""
        return sum(
            max(0, seq - local_vector.get(author, 0)) for author, seq in self.peer_claims.items()
        )

    def deadline(self, local_vector: Mapping[bytes, int]) -> float:
        """When the shell must act again: handle_timeout() while we wait for a hello or
        claimed entries; announce() and next_send() when a log.have or a hold is due."""
        due = self._stall_deadline(local_vector)
        if self.state is State.SYNCING and self.peer_announces:
            if self._news(local_vector):
                due = min(due, self._next_have_at)
            for author, (seq, since) in self._held.items() if self.credit > 0 else ():
                if local_vector.get(author, 0) > self.peer_has.get(author, 0) < seq:
                    due = min(due, since + self._forward_hold_s)
        return due

    def _stall_deadline(self, local_vector: Mapping[bytes, int]) -> float:
        if self.state is State.AWAIT_HELLO or (
            self.state is State.SYNCING and self.behind(local_vector)
        ):
            return self._last_progress + self._stall_timeout_s
        return math.inf

    def handle_timeout(self, local_vector: Mapping[bytes, int], now: float) -> None:
        """Raises EntryRejected('stalled') once the deadline has passed."""
        self._check_usable()
        if now < self._stall_deadline(local_vector):
            return
        if self.state is State.AWAIT_HELLO:
            detail = f"no hello within {self._stall_timeout_s:g} s"
        else:
            detail = (f"no entries for {self._stall_timeout_s:g} s while "
                      f"{self.behind(local_vector)} claimed entries are missing")
        self.state = State.ERROR
        raise EntryRejected("stalled", detail)

    def fail(self) -> None:
        """The shell rejected what the peer sent (a batch failed verification)."""
        self.state = State.ERROR

    def _check_usable(self) -> None:
        if self.state is State.ERROR:
            raise LocalProtocolError("sync session is in ERROR")
