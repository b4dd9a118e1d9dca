"""Pairing, sans-IO: codes, invitations, the XXpsk3+CPace handshake and its messages."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.protocol import pairing
from meshd.protocol.channel import (
    Channel,
    ConnectionClosed,
    HandshakeCompleted,
    MessageReceived,
    State,
)
from meshd.protocol.cpace import CPaceAbort, CPaceInitiator
from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.errors import LocalProtocolError, RemoteProtocolError
from meshd.protocol.noise import HandshakeState
from meshd.protocol.noisepatterns import parse_pattern
from meshd.protocol.pairing import (
    InvalidCode,
    Invitation,
    InvitationExpired,
    InvitationUsed,
    MalformedPairingMessage,
    PairingHandshake,
    PairingRefused,
    WrongCode,
    WrongNameplate,
    make_code,
    make_invitation,
    parse_code,
    sas_words,
)

from .harness import drain, seeded_rng

CODE = "17-puppy-sausage"


# ---- codes ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32))
def test_made_codes_parse_back_to_themselves(seed: int) -> None:
    code = make_code(seeded_rng(seed))
    nameplate, canonical = parse_code(code)
    assert canonical == code
    assert 1 <= nameplate <= 999
    assert code.split("-")[0] == str(nameplate)
    assert all(word in pairing.wordlist() for word in code.split("-")[1:])


def test_codes_use_the_whole_range() -> None:
    rng = seeded_rng(1)
    codes = [make_code(rng) for _ in range(3000)]
    nameplates = {parse_code(code)[0] for code in codes}
    first_words = {code.split("-")[1] for code in codes}
    assert min(nameplates) < 20 and max(nameplates) > 980
    assert len(first_words) > 1500  # 2048 words, 3000 draws


def test_wordlist_is_bip39_english(shared_vectors) -> None:
    expected = (shared_vectors / "bip39-english.txt").read_text().split()
    assert list(pairing.wordlist()) == expected


@pytest.mark.parametrize(
    "typed",
    ["17-puppy-sausage", "  17 Puppy  SAUSAGE ", "17-PUPPY-sausage\n", "017-pupp-sausa",
     "17 - puppy - sausage"],
)
def test_parse_code_forgives_case_space_and_prefixes(typed: str) -> None:
    assert parse_code(typed) == (17, "17-puppy-sausage")


@pytest.mark.parametrize(
    ("typed", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("puppy-sausage", "number and 2 words"),
        ("17-puppy-sausage-extra", "4 parts"),
        ("0-puppy-sausage", "1 to 999"),
        ("1000-puppy-sausage", "1 to 999"),
        ("x7-puppy-sausage", "1 to 999"),
        ("١٧-puppy-sausage", "1 to 999"),  # non-ASCII digits
        ("17-puppi-sausage", "word 1"),
        ("17-puppy-sau", "word 2"),  # a 3-letter prefix is ambiguous
    ],
)
def test_parse_code_errors_are_clear_and_never_echo_words(typed: str, fragment: str) -> None:
    with pytest.raises(InvalidCode) as caught:
        parse_code(typed)
    message = str(caught.value)
    assert fragment in message
    for word in ("puppy", "puppi", "sausage", "sau"):
        assert word not in message
    assert caught.value.reason == "invalid-code"
    assert isinstance(caught.value, LocalProtocolError)


def test_sas_is_four_words_and_depends_on_the_hash() -> None:
    words = sas_words(bytes(64))
    assert len(words) == 4 and all(word in pairing.wordlist() for word in words)
    assert sas_words(bytes(64)) == words
    assert sas_words(bytes(63) + b"\x01") != words


# ---- invitations ---------------------------------------------------------------------


def test_invitation_one_attempt_and_expiry() -> None:
    invitation = make_invitation(seeded_rng(0), now=100.0)
    assert invitation.expires_at == 700.0
    assert parse_code(invitation.code)[0] == invitation.nameplate
    assert invitation.code not in repr(invitation)
    invitation.claim_attempt(699.9)
    assert invitation.used
    with pytest.raises(InvitationUsed):
        invitation.claim_attempt(200.0)
    fresh = make_invitation(seeded_rng(1), now=0.0, ttl=10)
    with pytest.raises(InvitationExpired):
        fresh.check(10.0)
    with pytest.raises(InvitationExpired):
        fresh.claim_attempt(10.0)
    assert not fresh.used


# ---- the handshake -------------------------------------------------------------------


class Link:
    """A joiner and an inviter channel, and every byte that crossed between them."""

    def __init__(self, joiner_code: str, inviter_code: str = CODE, seed: int = 0,
                 on_attempt=None) -> None:
        rng = seeded_rng(seed)
        self.joiner_static = DHKeyPair.generate(rng)
        self.inviter_static = DHKeyPair.generate(rng)
        self.invitation = Invitation(inviter_code, parse_code(inviter_code)[0], expires_at=600.0)
        self.attempts = 0

        def count_attempt() -> None:
            self.attempts += 1
            self.invitation.claim_attempt(0.0)

        self.joiner = Channel(
            PairingHandshake.joiner(joiner_code, static=self.joiner_static, rng=rng), now=0.0
        )
        self.inviter = Channel(
            PairingHandshake.inviter(self.invitation, static=self.inviter_static, rng=rng,
                                     on_attempt=on_attempt or count_attempt,
                                     check_open=lambda: self.invitation.check(0.0)),
            now=0.0,
        )
        self.wire = bytearray()

    def deliver(self, sender: Channel, receiver: Channel) -> list:
        data = sender.data_to_send()
        self.wire += data
        receiver.receive_data(data)
        return drain(receiver)

    def handshake(self) -> None:
        self.deliver(self.joiner, self.inviter)  # message 1
        self.deliver(self.inviter, self.joiner)  # message 2
        self.deliver(self.joiner, self.inviter)  # message 3


def test_right_code_opens_the_same_channel_on_both_sides() -> None:
    link = Link("17 puppy sausage")  # typed differently, same canonical code
    link.deliver(link.joiner, link.inviter)
    assert link.attempts == 0  # message 1 tests nothing: it spends nothing
    joiner_events = link.deliver(link.inviter, link.joiner)
    inviter_events = link.deliver(link.joiner, link.inviter)
    assert link.attempts == 1
    assert isinstance(joiner_events[0], HandshakeCompleted)
    assert isinstance(inviter_events[0], HandshakeCompleted)
    assert joiner_events[0].remote_static == link.inviter_static.public
    assert inviter_events[0].remote_static == link.joiner_static.public
    assert link.joiner.handshake_hash == link.inviter.handshake_hash
    assert sas_words(link.joiner.handshake_hash) == sas_words(link.inviter.handshake_hash)
    # Same keys: messages decrypt in both directions.
    link.joiner.send(pairing.device_message(b"claim"))
    [received] = link.deliver(link.joiner, link.inviter)
    assert isinstance(received, MessageReceived)
    assert pairing.parse_device_message(received.message) == b"claim"
    link.inviter.send({"t": "pair.welcome", "records": [b"r1"]})
    [reply] = link.deliver(link.inviter, link.joiner)
    assert pairing.parse_reply(reply.message)["records"] == [b"r1"]


def test_handshake_frames_fit_the_handshake_limit() -> None:
    link = Link(CODE)
    sizes = []
    for sender, receiver in ((link.joiner, link.inviter), (link.inviter, link.joiner),
                             (link.joiner, link.inviter)):
        before = len(link.wire)
        link.deliver(sender, receiver)
        sizes.append(len(link.wire) - before)
    # 2-byte prefix + e + msgpack [nameplate, Ya] + tag; e + s + tags + [Yb]; s + 2 tags.
    assert sizes == [2 + 32 + 36 + 16, 2 + 32 + 48 + 35 + 16, 2 + 48 + 16]


def test_wrong_code_fails_at_message_3_and_the_wire_has_no_code() -> None:
    link = Link("17-puppy-salad")
    link.deliver(link.joiner, link.inviter)
    link.deliver(link.inviter, link.joiner)
    # The joiner gets no signal from message 2: it cannot test its guess before message 3.
    assert link.joiner.state is State.OPEN
    with pytest.raises(WrongCode) as caught:
        link.deliver(link.joiner, link.inviter)
    assert caught.value.reason == "wrong-code"
    assert isinstance(caught.value, RemoteProtocolError)
    assert link.inviter.state is State.ERROR
    assert link.invitation.used
    # What the joiner sees: the inviter hangs up without a word.
    link.joiner.receive_data(b"")
    assert drain(link.joiner) == [ConnectionClosed(None)]
    wire = bytes(link.wire)
    for secret in (CODE, "17-puppy-salad", "puppy", "sausage", "salad"):
        assert secret.encode() not in wire


def test_a_failed_attempt_burns_the_invitation_for_the_right_code() -> None:
    first = Link("17-puppy-salad")
    with pytest.raises(WrongCode):
        first.handshake()
    second = Link(CODE)
    second.invitation = first.invitation
    second.inviter = Channel(
        PairingHandshake.inviter(first.invitation, static=second.inviter_static,
                                 rng=seeded_rng(5),
                                 on_attempt=lambda: first.invitation.claim_attempt(0.0),
                                 check_open=lambda: first.invitation.check(0.0)),
        now=0.0,
    )
    with pytest.raises(InvitationUsed):
        second.deliver(second.joiner, second.inviter)
    assert second.inviter.data_to_send() == b""  # no message 2: no second guess


def test_wrong_nameplate_is_refused_before_message_2() -> None:
    link = Link("18-puppy-sausage")
    with pytest.raises(WrongNameplate):
        link.deliver(link.joiner, link.inviter)
    assert not link.invitation.used  # no code was tested: a stranger spoils nothing
    assert link.inviter.data_to_send() == b""


def test_only_message_3_spends_the_invitation() -> None:
    """A stranger without the code who sends message 1 and leaves spoils nothing; the owner
    of the code then pairs with the same invitation."""
    stranger = Link("17-puppy-salad")
    stranger.deliver(stranger.joiner, stranger.inviter)  # message 1
    stranger.deliver(stranger.inviter, stranger.joiner)  # message 2, then it goes away
    assert not stranger.invitation.used
    owner = Link(CODE, seed=1)
    owner.invitation = stranger.invitation
    owner.inviter = Channel(
        PairingHandshake.inviter(owner.invitation, static=owner.inviter_static, rng=seeded_rng(6),
                                 on_attempt=lambda: owner.invitation.claim_attempt(0.0),
                                 check_open=lambda: owner.invitation.check(0.0)),
        now=0.0,
    )
    owner.handshake()
    assert owner.invitation.used and owner.inviter.state is State.OPEN


def _first_message(payload: bytes, rng_seed: int = 9) -> bytes:
    state = HandshakeState(parse_pattern("XXpsk3"), initiator=True,
                           prologue=pairing.PAIRING_PROLOGUE, rng=seeded_rng(rng_seed),
                           s=DHKeyPair.generate(seeded_rng(rng_seed + 1)))
    message = state.write_message(payload)
    return len(message).to_bytes(2, "big") + message


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb([17]),
        msgpack.packb({"nameplate": 17}),
        msgpack.packb(["17", bytes(32)]),
        msgpack.packb([True, bytes(32)]),
        msgpack.packb([17, bytes(31)]),
        msgpack.packb([17, "x" * 32]),
        msgpack.packb([17, bytes(32)]) + b"\x00",
    ],
)
def test_malformed_first_payload_is_refused_and_spends_nothing(payload: bytes) -> None:
    link = Link(CODE)
    link.inviter.receive_data(_first_message(payload))
    with pytest.raises(MalformedPairingMessage) as caught:
        drain(link.inviter)
    assert caught.value.reason == "malformed"
    assert not link.invitation.used
    assert link.inviter.data_to_send() == b""


def test_low_order_ya_aborts() -> None:
    link = Link(CODE)
    link.inviter.receive_data(_first_message(msgpack.packb([17, bytes(32)], use_bin_type=True)))
    with pytest.raises(CPaceAbort):
        drain(link.inviter)


def test_first_message_with_another_prologue_fails() -> None:
    """A first message from another protocol version: the inviter cannot read message 1."""
    state = HandshakeState(parse_pattern("XXpsk3"), initiator=True, prologue=b"meshd/2/pair",
                           rng=seeded_rng(3), s=DHKeyPair.generate(seeded_rng(4)))
    message = state.write_message(msgpack.packb([17, bytes(range(32))], use_bin_type=True))
    link = Link(CODE)
    link.inviter.receive_data(len(message).to_bytes(2, "big") + message)
    with pytest.raises(RemoteProtocolError):
        drain(link.inviter)
    assert not link.invitation.used


def test_malformed_second_payload_at_the_joiner() -> None:
    link = Link(CODE)
    first = link.joiner.data_to_send()[2:]
    fake_inviter = HandshakeState(parse_pattern("XXpsk3"), initiator=False,
                                  prologue=pairing.PAIRING_PROLOGUE, rng=seeded_rng(7),
                                  s=DHKeyPair.generate(seeded_rng(8)))
    fake_inviter.read_message(first)
    second = fake_inviter.write_message(msgpack.packb(["not a point"]))
    link.joiner.receive_data(len(second).to_bytes(2, "big") + second)
    with pytest.raises(MalformedPairingMessage):
        drain(link.joiner)


def test_joiner_rejects_low_order_yb() -> None:
    link = Link(CODE)
    first = link.joiner.data_to_send()[2:]
    fake_inviter = HandshakeState(parse_pattern("XXpsk3"), initiator=False,
                                  prologue=pairing.PAIRING_PROLOGUE, rng=seeded_rng(7),
                                  s=DHKeyPair.generate(seeded_rng(8)))
    fake_inviter.read_message(first)
    second = fake_inviter.write_message(msgpack.packb([bytes(32)], use_bin_type=True))
    link.joiner.receive_data(len(second).to_bytes(2, "big") + second)
    with pytest.raises(CPaceAbort):
        drain(link.joiner)


def test_cpace_is_bound_to_the_joiners_ephemeral_key() -> None:
    """Ya replayed under another Noise ephemeral yields a different ISK: the attempt fails."""
    link = Link(CODE)
    first = link.joiner.data_to_send()[2:]
    # Re-send the honest Ya under a fresh ephemeral (the sid would differ).
    replay = HandshakeState(parse_pattern("XXpsk3"), initiator=True,
                            prologue=pairing.PAIRING_PROLOGUE, rng=seeded_rng(11),
                            s=DHKeyPair.generate(seeded_rng(12)))
    attacker = CPaceInitiator(prs=CODE.encode(), ci=pairing.channel_identifier(17),
                              sid=first[:32], rng=seeded_rng(13))
    replay.e = DHKeyPair.generate(seeded_rng(14))
    message1 = replay.write_message(pairing.encode_first_payload(17, attacker.message))
    link.inviter.receive_data(len(message1).to_bytes(2, "big") + message1)
    drain(link.inviter)
    message2 = link.inviter.data_to_send()[2:]
    yb = pairing.decode_second_payload(replay.read_message(message2))
    replay.set_psk(pairing.psk_from_isk(attacker.finish(yb)))
    message3 = replay.write_message(b"")
    link.inviter.receive_data(len(message3).to_bytes(2, "big") + message3)
    with pytest.raises(WrongCode):
        drain(link.inviter)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_first_frames_raise_only_remote_errors(data: bytes) -> None:
    link = Link(CODE)
    link.inviter.receive_data(len(data).to_bytes(2, "big") + data)
    try:
        drain(link.inviter)
    except RemoteProtocolError:
        pass


# ---- messages inside the channel -----------------------------------------------------


def test_device_message_checks() -> None:
    assert pairing.parse_device_message(pairing.device_message(b"c")) == b"c"
    for bad in ({"t": "pair.welcome", "claim": b"c"}, {"t": "pair.device"},
                {"t": "pair.device", "claim": "text"}, {"t": "pair.device", "claim": b""},
                {"t": "pair.device", "claim": bytes(pairing.MAX_CLAIM_BYTES + 1)}):
        with pytest.raises(MalformedPairingMessage):
            pairing.parse_device_message(bad)


def test_reply_checks() -> None:
    welcome = {"t": "pair.welcome", "records": [], "extra": 1}
    assert pairing.parse_reply(welcome) is welcome
    with pytest.raises(PairingRefused) as caught:
        pairing.parse_reply(pairing.refused_message("bad-signature"))
    assert caught.value.detail == "bad-signature"
    with pytest.raises(PairingRefused):
        pairing.parse_reply({"t": "pair.refused", "reason": 3})
    with pytest.raises(MalformedPairingMessage):
        pairing.parse_reply({"t": "log.entries"})
    assert pairing.check_reply_to_send(welcome) is welcome
    with pytest.raises(LocalProtocolError):
        pairing.check_reply_to_send({"t": "log.entries"})
    with pytest.raises(LocalProtocolError):
        pairing.check_reply_to_send(None)


def test_spec_constants_match_protocol_pairing_md() -> None:
    assert pairing.PAIRING_PROLOGUE == b"meshd/1/pair"
    assert pairing.channel_identifier(17).hex() == "0c6d657368642f312f7061697202" + "3137"
    assert pairing.encode_first_payload(17, bytes(32)) == b"\x92\x11\xc4\x20" + bytes(32)
    assert pairing.encode_second_payload(bytes(32)) == b"\x91\xc4\x20" + bytes(32)
