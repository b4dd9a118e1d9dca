"""HandshakeState's turn rules: each side writes and reads in pattern order, a failure leaves
the state dead for good, and a complete handshake takes no more messages."""

from __future__ import annotations

import pytest

from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.errors import LocalProtocolError, RemoteProtocolError
from meshd.protocol.noise import HandshakeState

from .harness import seeded_rng


def pair(pattern: str = "XX") -> tuple[HandshakeState, HandshakeState]:
    rng = seeded_rng(7)
    sides = [
        HandshakeState(pattern, initiator=initiator, prologue=b"p", rng=rng,
                       s=DHKeyPair.generate(rng))
        for initiator in (True, False)
    ]
    return sides[0], sides[1]


def test_each_side_may_only_write_on_its_turn() -> None:
    initiator, responder = pair()
    assert initiator.is_my_turn and not responder.is_my_turn
    with pytest.raises(LocalProtocolError, match="turn"):
        responder.write_message(b"")
    with pytest.raises(LocalProtocolError, match="turn"):
        initiator.read_message(b"x" * 32)
    responder.read_message(initiator.write_message(b""))
    assert responder.is_my_turn and not initiator.is_my_turn
    with pytest.raises(LocalProtocolError, match="turn"):
        initiator.write_message(b"")
    # Calling out of turn is the caller's mistake; it does not kill the state.
    initiator.read_message(responder.write_message(b""))
    responder.read_message(initiator.write_message(b""))
    assert initiator.complete and responder.complete


def test_a_complete_handshake_takes_no_more_messages() -> None:
    initiator, responder = pair("NN")
    responder.read_message(initiator.write_message(b"a"))
    assert initiator.read_message(responder.write_message(b"b")) == b"b"
    assert initiator.complete and responder.complete
    assert initiator.send_cipher is not None and responder.receive_cipher is not None
    for side in (initiator, responder):
        with pytest.raises(LocalProtocolError, match="already complete"):
            side.write_message(b"")
        with pytest.raises(LocalProtocolError, match="already complete"):
            side.read_message(b"x" * 48)


def test_a_bad_message_leaves_the_state_dead() -> None:
    initiator, responder = pair()
    responder.read_message(initiator.write_message(b""))
    message = bytearray(responder.write_message(b""))
    message[-1] ^= 1  # the payload's tag no longer authenticates
    with pytest.raises(RemoteProtocolError):
        initiator.read_message(bytes(message))
    assert not initiator.complete
    for call in (lambda: initiator.write_message(b""), lambda: initiator.read_message(b"")):
        with pytest.raises(LocalProtocolError, match="already failed"):
            call()


def test_an_oversized_write_leaves_the_state_dead() -> None:
    initiator, _ = pair()
    with pytest.raises(LocalProtocolError, match="65535"):
        initiator.write_message(bytes(65535))
    with pytest.raises(LocalProtocolError, match="already failed"):
        initiator.write_message(b"")


def test_a_short_message_is_the_peers_error_and_kills_the_state() -> None:
    _, responder = pair()
    with pytest.raises(RemoteProtocolError, match="too short"):
        responder.read_message(b"\x01" * 31)
    with pytest.raises(LocalProtocolError, match="already failed"):
        responder.read_message(b"\x01" * 32)
