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

WINDOW_BYTES = 4 * 1024 * 1024
BATCH_BYTES = 256 * 1024
STALL_TIMEOUT_S = 30.0
MAX_VECTOR_AUTHORS = 65536
MAX_CREDIT_BYTES = 1 << 40


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

    # -- outputs --

    def messages_to_send(self) -> list[dict[str, Any]]:
        out, self._outbox = self._outbox, []
        return out

    # -- inputs --

    def start(self, local_vector: Mapping[bytes, int], now: float) -> None:
        """Queue our hello and the initial credit."""
        if self.started:
            raise LocalProtocolError("sync session already started")
        self.started = True
        self._last_progress = now
        self._outbox.append({"t": "log.hello", "vector": dict(local_vector)})
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
        if kind == "log.hello":
            if self.state is not State.AWAIT_HELLO:
                raise EntryRejected("malformed", "a second hello")
            vector = parse_vector(message.get("vector"))
            self.peer_claims = dict(vector)
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
        if size > 0:
            self._outbox.append({"t": "log.credit", "bytes": size})

    def batch_refused(self, author: bytes, size: int, now: float) -> None:
        """The shell refused a well-formed batch that is not the peer's fault (clock-ahead):
        refill the credit and stop expecting that author's claimed entries this session."""
        self._check_usable()
        self.peer_claims.pop(author, None)
        self._last_progress = now
        if size > 0:
            self._outbox.append({"t": "log.credit", "bytes": size})

    def next_send(self, local_vector: Mapping[bytes, int]) -> tuple[bytes, int] | None:
        """(author, after_seq) of the next batch to send, or None (nothing, or no credit)."""
        if self.state is not State.SYNCING or self.credit <= 0:
            return None
        for author in sorted(local_vector):
            after = self.peer_has.get(author, 0)
            if local_vector[author] > after:
                return author, after
        return None

    def batch_sent(self, author: bytes, last_seq: int, size: int) -> None:
        self._check_usable()
        self.credit -= size
        self.batches_sent += 1
        if last_seq > self.peer_has.get(author, 0):
            self.peer_has[author] = last_seq

    def behind(self, local_vector: Mapping[bytes, int]) -> int:
        """Entries the peer claimed that we still lack."""
        return sum(
            max(0, seq - local_vector.get(author, 0)) for author, seq in self.peer_claims.items()
        )

    def deadline(self, local_vector: Mapping[bytes, int]) -> float:
        """When handle_timeout() must run: while we wait for a hello or claimed entries."""
        if self.state is State.AWAIT_HELLO or (
            self.state is State.SYNCING and self.behind(local_vector)
        ):
            return self._last_progress + self._stall_timeout_s
        return math.inf

    def handle_timeout(self, local_vector: Mapping[bytes, int], now: float) -> None:
        """Raises EntryRejected('stalled') once the deadline has passed."""
        self._check_usable()
        if now < self.deadline(local_vector):
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
