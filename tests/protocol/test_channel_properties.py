"""Property tests: a stateful model of two peers, and decode fuzzing of hostile bytes."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from meshd.protocol.channel import Channel, MessageReceived, XXHandshake
from meshd.protocol.constants import KEEPALIVE_S
from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.errors import RemoteProtocolError

from .harness import ChannelPair, drain, seeded_rng

scalars = st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.text(max_size=20), st.binary(max_size=200),
    st.booleans(), st.none(),
)
messages = st.fixed_dictionaries(
    {"t": st.sampled_from(["test.a", "test.b", "log.entries"])},
    optional={
        "body": st.binary(max_size=150_000),
        "n": st.integers(0, 2**64 - 1),
        "list": st.lists(scalars, max_size=5),
        "map": st.dictionaries(st.text(max_size=8), scalars, max_size=4),
    },
)


class TwoPeers(RuleBasedStateMachine):
    """Whatever alice sends, in whatever chunks the link delivers it and whenever time
    passes, bob receives exactly those messages in order, and vice versa."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.pair = ChannelPair.handshaken(seeded_rng(0), rekey_after_messages=3)
        self.sent: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": []}
        self.got: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": []}

    @rule(sender=st.sampled_from(["alice", "bob"]), message=messages)
    def send(self, sender: str, message: dict[str, Any]) -> None:
        self.pair.side(sender).send(message)
        self.sent[sender].append(message)

    @rule(sender=st.sampled_from(["alice", "bob"]), max_bytes=st.integers(1, 70_000))
    def link_delivers(self, sender: str, max_bytes: int) -> None:
        receiver = "bob" if sender == "alice" else "alice"
        for event in self.pair.deliver(sender, receiver, max_bytes=max_bytes):
            if isinstance(event, MessageReceived):
                self.got[receiver].append(event.message)

    @rule(ticks=st.integers(1, 2))
    def time_passes(self, ticks: int) -> None:
        # A live link: what is in flight arrives before the timers run, and keepalives
        # after. (A link that stops delivering is test_a_silent_peer_is_declared_dead.)
        self.now += ticks * KEEPALIVE_S
        self.link_delivers("alice", 10**9)
        self.link_delivers("bob", 10**9)
        for name in ("alice", "bob"):
            self.pair.side(name).handle_timeout(self.now)
        self.link_delivers("alice", 10**9)
        self.link_delivers("bob", 10**9)

    @invariant()
    def in_order_without_loss(self) -> None:
        for receiver, sender in (("bob", "alice"), ("alice", "bob")):
            assert self.got[receiver] == self.sent[sender][: len(self.got[receiver])]


TwoPeers.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestTwoPeers = TwoPeers.TestCase


def _fresh_responder() -> Channel:
    rng = seeded_rng(7)
    return Channel(
        XXHandshake(initiator=False, static=DHKeyPair.generate(rng), rng=rng,
                    authorize=lambda key: True),
        now=0.0,
    )


def _feed(channel: Channel, data: bytes, *, byte_by_byte: bool) -> None:
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    for chunk in chunks + [b""]:
        channel.receive_data(chunk)
        drain(channel)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), byte_by_byte=st.booleans())
def test_random_bytes_to_a_responder_raise_only_remote_protocol_errors(
    data: bytes, byte_by_byte: bool
) -> None:
    channel = _fresh_responder()
    try:
        _feed(channel, data, byte_by_byte=byte_by_byte)
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), byte_by_byte=st.booleans())
def test_random_bytes_after_the_handshake_raise_only_remote_protocol_errors(
    data: bytes, byte_by_byte: bool
) -> None:
    pair = ChannelPair.handshaken()
    try:
        _feed(pair.bob, data, byte_by_byte=byte_by_byte)
    except RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(plaintext=st.binary(max_size=300))
def test_any_authenticated_plaintext_raises_only_remote_protocol_errors(plaintext: bytes) -> None:
    """A peer that passes the handshake but then sends arbitrary encrypted content."""
    pair = ChannelPair.handshaken()
    if not plaintext:
        return
    pair.alice._send_frame(plaintext[0], plaintext[1:])  # type: ignore[arg-type]
    try:
        pair.deliver("alice", "bob")
    except RemoteProtocolError:
        pass
