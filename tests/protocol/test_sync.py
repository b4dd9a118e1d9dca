"""The sync state machine: hello, credit, what to send next, stalls, and a pump harness
that syncs two replicas through it (with interruptions) without any I/O."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import msgpack
import pytest

from meshd.protocol.errors import LocalProtocolError
from meshd.protocol.log import (
    HEAD_EVERY_BYTES,
    Batch,
    EntryRejected,
    VerifiedBatch,
    compose_batch,
    verify_batch,
)
from meshd.protocol.sync import BatchReceived, State, SyncSession

from .test_log import WALL_MS, MemoryLog, allow_all, puts, signer

A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32


class Replica(Protocol):
    def tip(self, author: bytes) -> tuple[int, bytes]: ...
    def vector(self) -> dict[bytes, int]: ...
    def commit(self, verified: VerifiedBatch) -> None: ...
    def batch_since(self, author: bytes, after: int, max_bytes: int) -> Batch | None: ...


def wire(message: dict[str, Any]) -> dict[str, Any]:
    """What the peer decodes: msgpack there and back, as the channel does."""
    decoded: dict[str, Any] = msgpack.unpackb(msgpack.packb(message, use_bin_type=True),
                                              raw=False, strict_map_key=True)
    return decoded


class Side:
    def __init__(self, replica: Replica, now: float, **options: Any) -> None:
        self.replica = replica
        self.session = SyncSession(now=now, **options)
        self.session.start(replica.vector(), now)

    def pump_sends(self) -> list[dict[str, Any]]:
        out = self.session.messages_to_send()
        while (request := self.session.next_send(self.replica.vector())) is not None:
            batch = self.replica.batch_since(*request, self.session.batch_bytes)
            assert batch is not None
            self.session.batch_sent(batch.author, batch.head.seq, batch.size)
            out.append(batch.to_message())
        return out

    def deliver(self, message: dict[str, Any], now: float,
                allowed: Callable[[bytes], bool] = allow_all) -> None:
        event = self.session.receive(wire(message), now)
        if isinstance(event, BatchReceived):
            batch = event.batch
            self.replica.commit(verify_batch(batch, *self.replica.tip(batch.author), allowed))
            self.session.batch_committed(batch.author, batch.head.seq, batch.size, now)


def sync(a: Replica, b: Replica, *, cut_after: float = math.inf, **options: Any) -> int:
    """Run one connection between a and b until quiet, or drop it after cut_after delivered
    messages (whatever is in flight is lost). Returns the number of messages delivered."""
    left, right = Side(a, 0.0, **options), Side(b, 0.0, **options)
    links: dict[int, deque[dict[str, Any]]] = {0: deque(), 1: deque()}
    delivered = 0
    while True:
        links[1].extend(left.pump_sends())
        links[0].extend(right.pump_sends())
        if not links[0] and not links[1]:
            return delivered
        for target, queue in ((right, links[1]), (left, links[0])):
            if queue:
                if delivered >= cut_after:
                    return delivered
                target.deliver(queue.popleft(), 0.0)
                delivered += 1


def written(seed: int, count: int, *, head_every_bytes: int = 300, **kwargs: Any) -> MemoryLog:
    """A replica holding one author's log of count puts, signed every head_every_bytes."""
    replica = MemoryLog()
    replica.commit(compose_batch(signer(seed), 0, b"\0" * 32, 0, WALL_MS, puts(count, **kwargs),
                                 head_every_bytes=head_every_bytes))
    return replica


# ---- the session's rules ---------------------------------------------------------------


def test_start_sends_hello_with_our_vector_and_grants_the_window() -> None:
    session = SyncSession(now=0.0, window_bytes=1000)
    session.start({A: 3}, 0.0)
    assert session.messages_to_send() == [
        {"t": "log.hello", "vector": {A: 3}, "have": True},  # we announce (log.have)
        {"t": "log.credit", "bytes": 1000},
    ]
    with pytest.raises(LocalProtocolError):
        session.start({}, 0.0)


def test_nothing_is_sent_before_the_peers_hello_or_without_credit() -> None:
    session = SyncSession(now=0.0)
    session.start({A: 3}, 0.0)
    assert session.next_send({A: 3}) is None
    session.receive({"t": "log.hello", "vector": {}}, 0.0)
    assert session.next_send({A: 3}) is None  # no credit yet
    session.receive({"t": "log.credit", "bytes": 100}, 0.0)
    assert session.next_send({A: 3}) == (A, 0)


def test_authors_are_streamed_in_key_order_from_what_the_peer_has() -> None:
    session = SyncSession(now=0.0)
    session.receive({"t": "log.hello", "vector": {A: 5, B: 1}}, 0.0)
    session.receive({"t": "log.credit", "bytes": 100}, 0.0)
    local = {C: 2, B: 4, A: 5}
    assert session.next_send(local) == (B, 1)
    session.batch_sent(B, 4, 40)
    assert session.next_send(local) == (C, 0)
    session.batch_sent(C, 2, 40)
    assert session.next_send(local) is None
    assert session.credit == 20


def test_a_batch_may_start_only_while_credit_is_positive() -> None:
    session = SyncSession(now=0.0)
    session.receive({"t": "log.hello", "vector": {}}, 0.0)
    session.receive({"t": "log.credit", "bytes": 100}, 0.0)
    session.batch_sent(A, 1, 150)  # one batch may overshoot
    assert session.next_send({A: 2}) is None
    session.receive({"t": "log.credit", "bytes": 150}, 0.0)
    assert session.next_send({A: 2}) == (A, 1)


def test_committed_batches_refill_their_sizes_in_bulk_at_half_the_window() -> None:
    """One log.credit per half window of committed batches, not one per batch: the sender's
    credit stays above half the window once its batches are committed, so it never waits."""
    session = SyncSession(now=0.0, window_bytes=1000)
    session.receive({"t": "log.hello", "vector": {}}, 0.0)
    session.receive({"t": "log.credit", "bytes": 100}, 0.0)
    for seq in range(1, 5):
        session.batch_committed(A, seq, 120, 1.0)
        assert session.messages_to_send() == []  # 480 owed: under half the window
    session.batch_committed(A, 5, 30, 1.0)
    assert session.messages_to_send() == [{"t": "log.credit", "bytes": 510}]
    session.batch_committed(A, 6, 1234, 1.0)  # a batch over half the window: at once
    assert session.messages_to_send() == [{"t": "log.credit", "bytes": 1234}]
    assert session.next_send({A: 6}) is None  # the peer sent us these: never echoed


def test_a_refused_batch_refills_its_size_at_once() -> None:
    session = SyncSession(now=0.0, window_bytes=1000)
    session.receive({"t": "log.hello", "vector": {A: 3}}, 0.0)
    session.batch_refused(A, 40, 1.0)
    assert session.messages_to_send() == [{"t": "log.credit", "bytes": 40}]


OWN = b"\x0e" * 32


def announcing(**options: Any) -> SyncSession:
    """A session whose peer's hello said it announces (log.have), with credit."""
    session = SyncSession(now=0.0, own=OWN, have_interval_s=0.25, forward_hold_s=1.0, **options)
    session.start({}, 0.0)
    session.messages_to_send()
    session.receive({"t": "log.hello", "vector": {}, "have": True}, 0.0)
    session.receive({"t": "log.credit", "bytes": 1 << 20}, 0.0)
    return session


def test_another_authors_entries_wait_for_a_peer_that_announces_them() -> None:
    session = announcing()
    assert session.next_send({OWN: 2, A: 5}, 10.0) == (OWN, 0)  # our own: at once
    session.batch_sent(OWN, 2, 100)
    assert session.next_send({OWN: 2, A: 5}, 10.0) is None  # A's: held
    session.announce({OWN: 2, A: 5}, 10.0)
    assert session.messages_to_send() == [{"t": "log.have", "vector": {A: 5}}]
    assert session.deadline({OWN: 2, A: 5}) == 11.0
    session.receive({"t": "log.have", "vector": {A: 5}}, 10.5)  # it got them from A
    assert session.next_send({OWN: 2, A: 5}, 20.0) is None
    assert session.deadline({OWN: 2, A: 5}) == math.inf


def test_held_entries_go_once_the_peer_has_not_announced_them_in_time() -> None:
    session = announcing()
    assert session.next_send({A: 5}, 10.0) is None
    session.receive({"t": "log.have", "vector": {A: 3}}, 10.5)  # only part of them
    assert session.next_send({A: 6}, 10.9) is None
    assert session.next_send({A: 6}, 11.0) == (A, 3)  # entries 4, 5 waited their second


def test_a_peer_that_does_not_announce_gets_every_author_at_once() -> None:
    session = SyncSession(now=0.0, own=OWN)
    session.receive({"t": "log.hello", "vector": {}}, 0.0)  # an older peer: no "have"
    session.receive({"t": "log.credit", "bytes": 1000}, 0.0)
    assert session.next_send({A: 5}, 10.0) == (A, 0)
    session.announce({A: 5}, 10.0)
    assert session.messages_to_send() == []  # and is never sent a log.have


def test_announcements_name_what_the_peer_may_lack_at_most_every_interval() -> None:
    session = announcing()
    session.batch_committed(B, 4, 10, 0.0)  # B's entries came from the peer: it has them
    session.announce({A: 5, B: 4}, 10.0)
    assert session.messages_to_send() == [{"t": "log.have", "vector": {A: 5}}]
    session.announce({A: 7, B: 4}, 10.1)
    assert session.messages_to_send() == []  # within the interval
    assert session.deadline({A: 7, B: 4}) == 10.25
    session.announce({A: 7, B: 4}, 10.25)
    assert session.messages_to_send() == [{"t": "log.have", "vector": {A: 7}}]
    session.announce({A: 7, B: 4}, 20.0)
    assert session.messages_to_send() == []  # nothing new


def test_what_the_peer_announced_is_still_announced_to_it() -> None:
    """The peer having A's entries says nothing about whether it knows we have them: it may
    be holding them for us. Only what it knows we hold (our hello, batches either way, our
    announcements) is left out."""
    session = announcing()
    session.receive({"t": "log.have", "vector": {A: 5}}, 10.0)
    session.announce({A: 5}, 10.0)
    assert session.messages_to_send() == [{"t": "log.have", "vector": {A: 5}}]
    session.batch_sent(B, 3, 10)
    session.announce({A: 5, B: 3}, 20.0)
    assert session.messages_to_send() == []  # it knows: we sent it B's entries


def test_no_hold_deadline_without_credit() -> None:
    session = announcing()
    session.batch_sent(OWN, 1, 1 << 20)  # the credit is spent
    assert session.next_send({A: 5}, 10.0) is None
    session.announce({A: 5}, 10.0)
    assert session.deadline({A: 5}) == math.inf  # a credit arriving wakes the sender


def test_behind_counts_claimed_entries_we_lack() -> None:
    session = SyncSession(now=0.0)
    session.receive({"t": "log.hello", "vector": {A: 10, B: 2}}, 0.0)
    assert session.behind({A: 4, B: 5}) == 6


def test_a_peer_that_claims_entries_and_goes_silent_is_stalled() -> None:
    session = SyncSession(now=0.0, stall_timeout_s=5.0)
    session.start({}, 0.0)
    session.receive({"t": "log.hello", "vector": {A: 10}}, 1.0)
    assert session.deadline({}) == 6.0
    session.handle_timeout({}, 5.9)  # not yet
    session.batch_committed(A, 4, 100, 4.0)
    assert session.deadline({A: 4}) == 9.0  # progress moves the deadline
    with pytest.raises(EntryRejected) as caught:
        session.handle_timeout({A: 4}, 9.0)
    assert caught.value.reason == "stalled"
    assert session.state is State.ERROR


def test_a_peer_that_never_says_hello_is_stalled() -> None:
    session = SyncSession(now=0.0, stall_timeout_s=5.0)
    session.start({}, 0.0)
    with pytest.raises(EntryRejected, match="no hello"):
        session.handle_timeout({}, 5.0)


def test_no_deadline_once_we_have_everything_claimed() -> None:
    session = SyncSession(now=0.0, stall_timeout_s=5.0)
    session.receive({"t": "log.hello", "vector": {A: 3}}, 0.0)
    assert session.deadline({A: 3}) == math.inf
    session.handle_timeout({A: 3}, 1000.0)


@pytest.mark.parametrize(
    "message",
    [
        {"t": "log.hello", "vector": [1, 2]},
        {"t": "log.hello", "vector": {"alice": 1}},
        {"t": "log.hello", "vector": {A: -1}},
        {"t": "log.hello", "vector": {A: "3"}},
        {"t": "log.hello"},
        {"t": "log.credit", "bytes": 0},
        {"t": "log.credit", "bytes": "lots"},
        {"t": "log.credit", "bytes": 1.5},
        {"t": "log.entries", "author": A},  # before hello
        {"t": "log.have", "vector": {A: 1}},  # before hello
        {"t": "log.gossip"},
    ],
)
def test_bad_messages_are_rejected_as_malformed(message: dict[str, Any]) -> None:
    session = SyncSession(now=0.0)
    with pytest.raises(EntryRejected) as caught:
        session.receive(message, 0.0)
    assert caught.value.reason == "malformed"
    assert session.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        session.receive({"t": "log.credit", "bytes": 1}, 0.0)


@pytest.mark.parametrize("vector", [{"alice": 1}, {A: -1}, None, {A: 1 << 41}])
def test_a_bad_have_is_malformed(vector: Any) -> None:
    session = SyncSession(now=0.0)
    session.receive({"t": "log.hello", "vector": {}, "have": True}, 0.0)
    with pytest.raises(EntryRejected) as caught:
        session.receive({"t": "log.have", "vector": vector}, 0.0)
    assert caught.value.reason == "malformed"


def test_a_second_hello_is_malformed() -> None:
    session = SyncSession(now=0.0)
    session.receive({"t": "log.hello", "vector": {}}, 0.0)
    with pytest.raises(EntryRejected):
        session.receive({"t": "log.hello", "vector": {}}, 0.0)


# ---- whole syncs through the pump ------------------------------------------------------


def test_two_replicas_exchange_what_each_lacks() -> None:
    a, b = written(1, 50), written(2, 30)
    sync(a, b, batch_bytes=500)
    assert a.vector() == b.vector() and len(a.vector()) == 2
    assert sorted(a.headers(), key=lambda h: h.order) == sorted(b.headers(), key=lambda h: h.order)


def test_batches_stay_within_the_window_plus_one_batch() -> None:
    a, b = written(1, 400, body=bytes(100)), MemoryLog()
    left, right = Side(a, 0.0, batch_bytes=500), Side(b, 0.0, window_bytes=2000)
    for message in right.pump_sends():
        left.deliver(message, 0.0)
    sent = [m for m in left.pump_sends() if m["t"] == "log.entries"]
    in_flight = sum(Batch.from_message(m).size for m in sent)
    assert sent and 2000 <= in_flight < 2000 + 2 * 500 + 200


def test_a_catch_up_comes_in_batches_of_a_mebibyte_with_credit_to_spare() -> None:
    """The default batch: the first head at or past 1 MiB, though a writer signs one every
    256 KiB (each batch is one transaction, two thread hops and a few SQL statements on the
    receiver: fewer, larger ones cost it less CPU per entry); the default window holds
    several, so a sender is not waiting for the receiver's commits to return credit."""
    a, b = written(1, 5000, head_every_bytes=HEAD_EVERY_BYTES, body=bytes(1000)), MemoryLog()
    left, right = Side(a, 0.0), Side(b, 0.0)
    for message in right.pump_sends():
        left.deliver(message, 0.0)
    # About 5 MiB of entries: sent at once on the first grant, in 1 MiB batches (the last
    # one what is left); a head every 256 KiB means a batch ends within one head past 1 MiB.
    sent = left.pump_sends()  # (its hello and credit first)
    sizes = [Batch.from_message(m).size for m in sent if m["t"] == "log.entries"]
    assert len(sizes) == 6 and 0 < sizes[-1] < 1 << 20
    assert all(1 << 20 <= size < (1 << 20) + HEAD_EVERY_BYTES + 2000 for size in sizes[:-1])
    for message in sent:
        right.deliver(message, 0.0)
    assert b.vector() == a.vector() == {signer(1).public: 5000}


def test_an_interrupted_sync_resumes_from_what_was_committed() -> None:
    a, b = written(1, 300), MemoryLog()
    cuts = 0
    while b.vector() != a.vector():
        before = b.vector().get(a.vector().popitem()[0], 0)
        sync(a, b, cut_after=5, batch_bytes=400)
        after = b.vector().get(next(iter(a.vector())), 0)
        assert after > before  # every connection makes progress, nothing is re-fetched
        cuts += 1
    assert cuts > 3
    assert [h.seq for h in b.headers()] == list(range(1, 301))


def test_entries_are_forwarded_through_a_third_replica() -> None:
    a, b, c = written(1, 20), MemoryLog(), MemoryLog()
    sync(a, b)
    sync(b, c)
    assert c.vector() == a.vector()


def test_entries_of_an_author_outside_the_circle_are_rejected_in_sync() -> None:
    a, b = written(1, 5), MemoryLog()
    outsider = next(iter(a.vector()))
    left, right = Side(a, 0.0), Side(b, 0.0)
    for message in right.pump_sends():
        left.deliver(message, 0.0)
    sent = left.pump_sends()
    right.deliver(sent[0], 0.0)  # hello
    batch = next(m for m in sent if m["t"] == "log.entries")
    with pytest.raises(EntryRejected) as caught:
        right.deliver(batch, 0.0, allowed=lambda author: author != outsider)
    assert caught.value.reason == "unknown-author"
    assert b.vector() == {}


def test_an_own_entry_committed_right_after_a_push_is_sent_at_once() -> None:
    """Live writes one after another (2 ms apart) are each sent when they commit: the sync
    session never holds our own entries for a timer (round 9 paced them to one batch per
    0.2 s, and a live write's latency went from p50 1.5 ms to 200 ms)."""
    session = announcing()
    for seq in range(1, 51):
        now = 10.0 + seq * 0.002
        assert session.next_send({OWN: seq}, now) == (OWN, seq - 1)
        session.batch_sent(OWN, seq, 100)
        assert session.deadline({OWN: seq}) == math.inf or session.deadline({OWN: seq}) > now
