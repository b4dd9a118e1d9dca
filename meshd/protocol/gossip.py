"""Circle gossip over one peer connection as a sans-IO state machine (protocol/peers.md,
"Circle gossip").

Each side opens a session with `heads_message(heads)`: the hashes of its circle records that
no other record names as a parent. For every received "circle.*" message the shell calls
`Gossip.receive(message)`, which checks the message against its schema (SchemaError names
the path that is wrong) and says what to do:

- circle.heads naming a hash we lack  -> Answer(circle.want)
- circle.heads we know all of         -> None (nothing to do)
- circle.want                         -> Answer(circle.records with every record we hold)
- circle.records                      -> Merge(records): the shell hands them to its merge,
                                         which verifies each (RecordRejected ends the session)

The circle can change during a session (a merge, a local operation), so what we hold is read
through the `has` / `records` callables at each message, never copied. Any error leaves the
machine in ERROR: the shell ends the session, and receive() refuses further messages.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import LocalProtocolError
from .messages import MAX_TYPE_BYTES, UnexpectedMessage
from .records import MAX_CIRCLE_RECORDS, MAX_RECORD_BYTES
from .schema import Array, Bin, Map, Schema, Text

HEADS = "circle.heads"
WANT = "circle.want"
RECORDS = "circle.records"
KINDS = frozenset({HEADS, WANT, RECORDS})
HASH_BYTES = 32

_TYPE = Text(1, MAX_TYPE_BYTES)
# Open maps: a later version may add fields, which this one ignores (depth-bounded).
SCHEMAS: dict[str, Schema] = {
    HEADS: Map({"t": _TYPE, "heads": Array(Bin(exact=HASH_BYTES), max_len=MAX_CIRCLE_RECORDS)}, open_=True),
    WANT: Map({"t": _TYPE}, open_=True),
    RECORDS: Map({"t": _TYPE, "records": Array(Bin(1, MAX_RECORD_BYTES), max_len=MAX_CIRCLE_RECORDS)},
                 open_=True),
}


class GossipClosed(LocalProtocolError):
    """receive() after the machine failed: the shell should have ended the session."""


class State(enum.Enum):
    OPEN = "open"
    ERROR = "error"  # terminal


@dataclass(frozen=True, slots=True)
class Answer:
    """Send this message to the peer (through the session's bounded answer queue)."""

    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Merge:
    """Hand these encoded records to the owner's merge (which verifies every one)."""

    records: list[bytes]


Action = Answer | Merge | None


def heads_message(heads: tuple[bytes, ...] | list[bytes]) -> dict[str, Any]:
    """The circle.heads message: sent first in a session, and again whenever our circle changes."""
    return {"t": HEADS, "heads": list(heads)}


def is_gossip(kind: str) -> bool:
    return kind in KINDS


class Gossip:
    """One connection's circle gossip. `has(hash)` says whether we hold a record; `records()`
    is every record we hold, encoded, parents before children."""

    def __init__(self, has: Callable[[bytes], bool], records: Callable[[], list[bytes]]) -> None:
        self._has = has
        self._records = records
        self.state = State.OPEN

    def receive(self, message: dict[str, Any]) -> Action:
        """What to do about one received circle.* message; raises SchemaError (malformed),
        UnexpectedMessage (not a gossip type) or GossipClosed (after an earlier error)."""
        if self.state is State.ERROR:
            raise GossipClosed("circle gossip already failed on this connection")
        try:
            kind = message.get("t") if type(message) is dict else None
            schema = SCHEMAS.get(kind) if type(kind) is str else None
            if schema is None:
                raise UnexpectedMessage(f"not a circle gossip message: {str(kind)[:40]!r}")
            schema.check(message)
            if kind == HEADS:
                return self.on_heads(message["heads"])
            if kind == WANT:
                return Answer({"t": RECORDS, "records": self._records()})
            return Merge(message["records"])
        except BaseException:
            self.state = State.ERROR
            raise

    def on_heads(self, heads: list[bytes]) -> Action:
        """The peer's heads (checked): ask for its records if we lack any of them."""
        if any(not self._has(head) for head in heads):
            return Answer({"t": WANT})
        return None
