"""The relay's connection rules (protocol/relaysession.py), without trio: time is passed in."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.protocol.admission import Admission
from meshd.protocol.circle import Circle
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair
from meshd.protocol.records import DeviceInfo
from meshd.protocol.relay import (
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
    SEGMENT_LIST_COST,
    TOO_MANY_SUBSCRIPTIONS,
    Limits,
    PipeClose,
    PipeData,
    Register,
    RelayError,
    Rendezvous,
)
from meshd.protocol.relaysession import Connection, Ended, Forward, RelayRules

from .harness import seeded_rng

FETCH = {"t": "relay.fetch", "rid": 7, "mailbox": bytes(32), "after": 0}


class Member:
    def __init__(self, name: str, rng: Any) -> None:
        self.signer = SigningKeyPair(rng(32))
        self.dh = DHKeyPair.generate(rng)
        self.info = DeviceInfo(bytes(self.signer.public), bytes(self.dh.public), name).claimed(self.signer)


def circle_of(*names: str, seed: int = 1) -> tuple[Circle, dict[str, Member], Any]:
    rng = seeded_rng(seed)
    members = {name: Member(name, rng) for name in names}
    founder = members[names[0]]
    circle = Circle.create(founder.signer, founder.info, rng)
    for name in names[1:]:
        circle.add_device(founder.signer, members[name].info, rng)
    return circle, members, rng


def rules_with(circle: Circle, limits: Limits | None = None) -> RelayRules[Connection]:
    rules: RelayRules[Connection] = RelayRules(limits or Limits(), Admission())
    rules.remember(circle)
    return rules


def registered(rules: RelayRules[Connection], circle: Circle, member: Member) -> Connection:
    conn = Connection(key=bytes(member.dh.public))
    request = rules.accept(conn, {"t": "relay.register", "rid": 1, "records": circle.records()}, 0.0)
    assert isinstance(request, Register)
    found = rules.circle_for(request.records)
    assert found is not None
    assert rules.bind(conn, found) == []
    rules.enrol(conn)
    return conn


def refused(code: str, call: Any, *args: Any, **kwargs: Any) -> RelayError:
    with pytest.raises(RelayError) as caught:
        call(*args, **kwargs)
    assert caught.value.code == code
    return caught.value


def test_a_connection_registers_before_anything_else_and_serves_one_circle() -> None:
    circle, m, _ = circle_of("alice", "bob")
    other, _, _ = circle_of("carol", seed=2)
    rules = rules_with(circle)
    rules.remember(other)
    conn = Connection(key=bytes(m["alice"].dh.public))
    refused(NOT_REGISTERED, rules.accept, conn, FETCH, 0.0)
    alice = registered(rules, circle, m["alice"])
    assert rules.accept(alice, FETCH, 0.0) is not None
    assert rules.members[circle.circle_id] == {alice}
    refused(BAD_RECORDS, rules.bind, alice, other)


def test_a_stranger_and_a_removed_member_are_refused_and_the_removed_one_gets_its_notice() -> None:
    circle, m, rng = circle_of("alice", "bob")
    stranger = Connection(key=bytes(DHKeyPair.generate(rng).public))
    rules = rules_with(circle)
    assert rules.bind(stranger, circle) == []  # not a member, never was: no notice
    refused(NOT_A_MEMBER, rules.enrol, stranger)
    bob = registered(rules, circle, m["bob"])
    alice = registered(rules, circle, m["alice"])
    circle.remove_device(m["alice"].signer, m["bob"].signer.public, rng)
    rules.remember(circle)
    bob.rendezvous = rules.offer(bob, Rendezvous(2, 11, "offer"), 0.0)
    [(gone, notice, ended)] = rules.removed(circle.circle_id)
    assert gone is bob and notice  # told, then forgotten: no longer a member's connection
    assert ended is not None and ended.meeting.closed and rules.offers == {}
    assert rules.members[circle.circle_id] == {alice}
    refused(NOT_A_MEMBER, rules.accept, bob, FETCH, 0.0)
    again = Connection(key=bytes(m["bob"].dh.public))
    assert rules.bind(again, circle) == notice  # registering again: the notice first
    refused(NOT_A_MEMBER, rules.enrol, again)
    assert rules.others(circle.circle_id, alice) == []


def test_requests_are_rate_limited_per_key_and_refill_with_the_time_passed_in() -> None:
    circle, m, _ = circle_of("alice")
    rules = rules_with(circle, Limits(rate_per_s=2.0, burst=3.0))
    alice = registered(rules, circle, m["alice"])  # the registration took a token
    rules.accept(alice, FETCH, 0.0)
    rules.accept(alice, FETCH, 0.0)
    err = refused(RATE_LIMITED, rules.accept, alice, FETCH, 0.0)
    assert err.retry_after == 0.5 and not rules.ends_connection(alice, err)
    rules.accept(alice, FETCH, 0.5)
    assert rules.rate_taken == {}  # counted only for a relay sharing its storage


def test_a_relay_sharing_its_storage_tells_its_siblings_what_each_request_cost() -> None:
    # A page of relay.segment_list costs SEGMENT_LIST_COST here: the sibling processes that
    # share this relay's storage must debit as much, or a key spreading its listing over N
    # processes is charged 1/SEGMENT_LIST_COST of it at each of the others.
    circle, m, _ = circle_of("alice")
    rules = rules_with(circle)
    alice = registered(rules, circle, m["alice"])
    rules.share_rates = True
    rules.accept(alice, FETCH, 0.0)
    rules.accept(alice, {"t": "relay.segment_list", "rid": 2}, 0.0)
    assert rules.rate_taken == {alice.key: 1 + SEGMENT_LIST_COST}


def test_a_joiner_without_a_circle_may_use_only_its_pipe_and_any_refusal_ends_it() -> None:
    circle, m, rng = circle_of("alice")
    rules = rules_with(circle)
    joiner = Connection(key=bytes(DHKeyPair.generate(rng).public), source="192.0.2.1")
    join = rules.accept(joiner, {"t": "relay.rendezvous", "rid": 1, "nameplate": 4, "role": "join"}, 0.0)
    assert isinstance(join, Rendezvous) and joiner.joiner_only
    err = refused(NO_OFFER, rules.join, joiner, rules.take_offer(4), join, 0.0)
    assert rules.ends_connection(joiner, err)
    refused(NOT_REGISTERED, rules.accept, joiner, FETCH, 0.0)
    stranger = Connection(key=bytes(DHKeyPair.generate(rng).public))
    refused(NOT_REGISTERED, rules.pipe, stranger, PipeData(b"x"))


def test_probing_joins_cost_their_address_a_token_and_a_sibling_process_none() -> None:
    circle, _, rng = circle_of("alice")
    rules = rules_with(circle, Limits(join_rate_per_s=1.0, join_burst=2.0))
    probe = Rendezvous(1, 99, "join")
    for _ in range(2):
        refused(NO_OFFER, rules.join, Connection(key=b"k", source="a"), None, probe, 0.0)
    refused(RATE_LIMITED, rules.join, Connection(key=b"k", source="a"), None, probe, 0.0)
    refused(NO_OFFER, rules.join, Connection(key=b"k", source="b"), None, probe, 0.0)
    refused(NO_OFFER, rules.join, Connection(key=b"k", source="a"), None, probe, 0.0, sibling=True)


def test_subscriptions_are_capped_and_forgotten_with_the_connection() -> None:
    circle, m, _ = circle_of("alice")
    rules = rules_with(circle)
    alice = registered(rules, circle, m["alice"])
    for n in range(MAX_SUBSCRIPTIONS):
        rules.subscribe(alice, bytes([n]) * 32, 0, notify=n % 2 == 0)
    rules.subscribe(alice, bytes(32), 5, notify=False)  # again: moves it, no new slot
    assert alice.subscriptions[bytes(32)] == 5 and bytes(32) not in alice.notify_only
    refused(TOO_MANY_SUBSCRIPTIONS, rules.subscribe, alice, b"\xff" * 32, 0, False)
    assert rules.subscribers(circle.circle_id, bytes(32)) == {alice}
    rules.forget(alice)
    assert rules.subscribers(circle.circle_id, bytes(32)) == set()
    assert rules.all_subscribers() == set() and rules.members[circle.circle_id] == set()


def _offered(rules: RelayRules[Connection], circle: Circle, member: Member,
             now: float = 0.0) -> Connection:
    offerer = registered(rules, circle, member)
    meeting = rules.offer(offerer, Rendezvous(2, 11, "offer"), now)
    assert meeting.deadline == now + OFFER_TTL_S and rules.rendezvous_status == {"offers": 1, "pipes": 0}
    return offerer


def test_one_offer_per_nameplate_and_the_first_join_consumes_it() -> None:
    circle, m, _ = circle_of("alice", "bob")
    rules = rules_with(circle)
    alice = _offered(rules, circle, m["alice"])
    refused(RENDEZVOUS_BUSY, rules.offer, alice, Rendezvous(3, 12, "offer"), 0.0)
    bob = registered(rules, circle, m["bob"])
    refused(NAMEPLATE_IN_USE, rules.offer, bob, Rendezvous(3, 11, "offer"), 0.0)
    joiner = Connection(key=b"j", joiner_only=True)
    meeting = rules.take_offer(11)
    ready = rules.join(joiner, meeting, Rendezvous(5, 11, "join"), 10.0)
    assert [(side, frame["rid"]) for side, frame in ready] == [(alice, 2), (joiner, 5)]
    assert meeting is not None and meeting.deadline == 10.0 + PIPE_LIFETIME_S
    assert rules.take_offer(11) is None  # consumed: a second join finds nothing
    assert rules.rendezvous_status == {"offers": 0, "pipes": 1}
    forward = rules.pipe(alice, PipeData(b"hello"))
    assert isinstance(forward, Forward) and forward.to is joiner and forward.frame["data"] == b"hello"
    ended = rules.pipe(joiner, PipeClose())
    assert isinstance(ended, Ended)
    assert [(side, frame["t"]) for side, frame in ended.sends] == [(alice, "relay.pipe_close")]
    assert ended.finish == [joiner]  # its one rendezvous is over
    assert alice.rendezvous is None and rules.rendezvous_status == {"offers": 0, "pipes": 0}
    assert rules.pipe(alice, PipeData(b"late")) is None  # crossed the close: dropped


def test_a_pipe_past_its_byte_cap_is_closed_on_both_sides() -> None:
    circle, m, _ = circle_of("alice")
    rules = rules_with(circle)
    alice = _offered(rules, circle, m["alice"])
    joiner = Connection(key=b"j", joiner_only=True)
    rules.join(joiner, rules.take_offer(11), Rendezvous(5, 11, "join"), 0.0)
    chunk = bytes(65536)
    for _ in range(MAX_PIPE_TOTAL_BYTES // len(chunk)):
        assert isinstance(rules.pipe(alice, PipeData(chunk)), Forward)
    ended = rules.pipe(alice, PipeData(b"!"))
    assert isinstance(ended, Ended)
    assert {side for side, frame in ended.sends if frame["t"] == "relay.pipe_close"} == {alice, joiner}


def test_an_offer_nobody_joined_expires_with_an_error_and_a_claim_is_released_once() -> None:
    circle, m, _ = circle_of("alice")
    rules = rules_with(circle)
    alice = registered(rules, circle, m["alice"])
    meeting = rules.offer(alice, Rendezvous(2, 11, "offer"), 0.0, claimed=True)
    ended = rules.expire(meeting)
    [(side, frame)] = ended.sends
    assert side is alice and frame["code"] == OFFER_EXPIRED and frame["rid"] == 2
    assert ended.release and rules.offers == {} and alice.rendezvous is None
    assert rules.end(meeting, closer=None).release is False  # ended once
    claimed = rules.offer(alice, Rendezvous(3, 11, "offer"), 0.0, claimed=True)
    assert rules.consumed(claimed) and not rules.consumed(claimed)


def test_a_connection_going_away_ends_its_rendezvous_and_tells_the_other_side() -> None:
    circle, m, _ = circle_of("alice")
    rules = rules_with(circle)
    alice = _offered(rules, circle, m["alice"])
    joiner = Connection(key=b"j", joiner_only=True)
    rules.join(joiner, rules.take_offer(11), Rendezvous(5, 11, "join"), 0.0)
    ended = rules.forget(alice)
    assert ended is not None
    assert [(side, frame["t"]) for side, frame in ended.sends] == [(joiner, "relay.pipe_close")]
    assert ended.finish == [joiner] and joiner.rendezvous is None
