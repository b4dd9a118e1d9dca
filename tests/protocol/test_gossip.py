"""Circle gossip as a state machine: what each circle.* message asks of us, its schema at the
boundary, and two circles that diverged converging through it without any I/O."""

from __future__ import annotations

from collections import deque
from typing import Any

import msgpack
import pytest

from meshd.protocol.circle import Circle
from meshd.protocol.errors import RemoteProtocolError
from meshd.protocol.gossip import (
    Answer,
    Gossip,
    GossipClosed,
    Merge,
    State,
    heads_message,
    is_gossip,
)
from meshd.protocol.messages import UnexpectedMessage
from meshd.protocol.records import MAX_CIRCLE_RECORDS, MAX_RECORD_BYTES
from meshd.protocol.schema import SchemaError

from .test_circle import make_device, seeded_rng

KNOWN, UNKNOWN = b"\x01" * 32, b"\x02" * 32


def wire(message: dict[str, Any]) -> dict[str, Any]:
    """What the peer decodes: msgpack there and back, as the channel does."""
    decoded: dict[str, Any] = msgpack.unpackb(msgpack.packb(message, use_bin_type=True),
                                              raw=False, strict_map_key=True)
    return decoded


def machine(held: list[bytes] | None = None) -> Gossip:
    records = [b"record-1", b"record-2"] if held is None else held
    return Gossip(has=lambda h: h == KNOWN, records=lambda: list(records))


def test_heads_message_is_the_first_message_of_a_session() -> None:
    assert wire(heads_message((KNOWN, UNKNOWN))) == {"t": "circle.heads", "heads": [KNOWN, UNKNOWN]}
    assert all(is_gossip(k) for k in ("circle.heads", "circle.want", "circle.records"))
    assert not is_gossip("log.hello") and not is_gossip("circle.other")


def test_heads_we_know_ask_nothing_and_a_head_we_lack_asks_for_the_records() -> None:
    gossip = machine()
    assert gossip.receive(wire(heads_message([KNOWN]))) is None
    assert gossip.receive(wire(heads_message([]))) is None
    assert gossip.receive(wire(heads_message([KNOWN, UNKNOWN]))) == Answer({"t": "circle.want"})
    assert gossip.state is State.OPEN


def test_want_is_answered_with_every_record_we_hold_at_that_moment() -> None:
    held = [b"genesis"]
    gossip = machine(held)
    assert gossip.receive({"t": "circle.want"}) == Answer({"t": "circle.records", "records": [b"genesis"]})
    held.append(b"added later")  # the circle changed during the session
    assert gossip.receive({"t": "circle.want"}) == Answer(
        {"t": "circle.records", "records": [b"genesis", b"added later"]})


def test_records_go_to_the_owners_merge() -> None:
    assert machine().receive(wire({"t": "circle.records", "records": [b"a", b"b"]})) == Merge([b"a", b"b"])


def test_unknown_fields_are_ignored() -> None:
    gossip = machine()
    assert gossip.receive({"t": "circle.want", "later": {"x": [1]}}) == Answer(
        {"t": "circle.records", "records": [b"record-1", b"record-2"]})
    assert gossip.receive({"t": "circle.heads", "heads": [UNKNOWN], "v": 2}) == Answer({"t": "circle.want"})


MALFORMED = [
    ({"t": "circle.heads"}, "$"),
    ({"t": "circle.heads", "heads": KNOWN}, "$['heads']"),
    ({"t": "circle.heads", "heads": None}, "$['heads']"),
    ({"t": "circle.heads", "heads": [KNOWN, "ab" * 16]}, "$['heads'][1]"),
    ({"t": "circle.heads", "heads": [KNOWN, KNOWN[:31]]}, "$['heads'][1]"),
    ({"t": "circle.heads", "heads": [KNOWN + b"\x00"]}, "$['heads'][0]"),
    ({"t": "circle.heads", "heads": [bytearray(KNOWN)]}, "$['heads'][0]"),
    ({"t": "circle.heads", "heads": [KNOWN] * (MAX_CIRCLE_RECORDS + 1)}, "$['heads']"),
    ({"t": "circle.records"}, "$"),
    ({"t": "circle.records", "records": b"one"}, "$['records']"),
    ({"t": "circle.records", "records": {"a": b"b"}}, "$['records']"),
    ({"t": "circle.records", "records": [b"ok", 7]}, "$['records'][1]"),
    ({"t": "circle.records", "records": [b"ok", True]}, "$['records'][1]"),
    ({"t": "circle.records", "records": [b""]}, "$['records'][0]"),
    ({"t": "circle.records", "records": [b"x" * (MAX_RECORD_BYTES + 1)]}, "$['records'][0]"),
    ({"t": "circle.records", "records": [b"r"] * (MAX_CIRCLE_RECORDS + 1)}, "$['records']"),
    ({"t": "circle.want", 5: "non-string key"}, "$"),
]


@pytest.mark.parametrize(("message", "where"), MALFORMED)
def test_malformed_gossip_is_a_schema_error_naming_the_path(message: dict[str, Any], where: str) -> None:
    asked: list[bytes] = []

    def has(record_hash: bytes) -> bool:
        asked.append(record_hash)
        return False

    gossip = Gossip(has=has, records=lambda: [b"r"])
    with pytest.raises(SchemaError) as caught:
        gossip.receive(message)
    assert caught.value.where == where
    assert caught.value.reason == "malformed" and isinstance(caught.value, RemoteProtocolError)
    assert asked == []  # nothing of a malformed message was looked up
    assert gossip.state is State.ERROR
    with pytest.raises(GossipClosed):
        gossip.receive({"t": "circle.want"})


@pytest.mark.parametrize("message", [{"t": "log.hello"}, {"t": "circle.nope"}, {"t": 3}, {}])
def test_a_message_that_is_not_gossip_is_unexpected(message: dict[str, Any]) -> None:
    gossip = machine()
    with pytest.raises(UnexpectedMessage) as caught:
        gossip.receive(message)
    assert caught.value.reason == "unexpected-message"
    assert gossip.state is State.ERROR


# ---- two replicas converging through the machine ----------------------------------------


class Replica:
    """One device's circle with the shell's part of gossip: send heads first, answer, merge,
    and send new heads whenever a merge changed the circle (protocol/peers.md)."""

    def __init__(self, circle: Circle) -> None:
        self.circle = circle
        self.outbox: deque[dict[str, Any]] = deque([heads_message(circle.heads)])
        self.gossip = Gossip(has=lambda h: self.circle.has(h), records=lambda: self.circle.records())

    def receive(self, message: dict[str, Any]) -> None:
        action = self.gossip.receive(message)
        if isinstance(action, Answer):
            self.outbox.append(action.message)
        elif isinstance(action, Merge) and self.circle.merge(action.records):
            self.outbox.append(heads_message(self.circle.heads))


def pump(a: Replica, b: Replica) -> int:
    steps = 0
    while a.outbox or b.outbox:
        for sender, receiver in ((a, b), (b, a)):
            if sender.outbox:
                receiver.receive(wire(sender.outbox.popleft()))
                steps += 1
        assert steps < 100, "gossip did not settle"
    return steps


def test_two_diverged_circles_converge_and_then_gossip_stops() -> None:
    rng = seeded_rng(11)
    founder, one, two = (make_device(name, rng) for name in ("founder", "one", "two"))
    left = Circle.create(founder.signer, founder.info, rng)
    right = Circle.from_records(left.records())
    left.add_device(founder.signer, one.info, rng)
    right.add_device(founder.signer, two.info, rng)
    assert set(left.heads) != set(right.heads)
    a, b = Replica(left), Replica(right)
    pump(a, b)
    assert set(left.heads) == set(right.heads) and sorted(left.records()) == sorted(right.records())
    assert {one.key, two.key} <= set(left.state.members)
    # A new session between replicas that agree sends the heads and nothing else.
    a, b = Replica(left), Replica(right)
    assert pump(a, b) == 2
