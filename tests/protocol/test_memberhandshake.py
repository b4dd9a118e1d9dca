"""The device port's handshake (protocol/channel.md, "The device port"), sans-IO."""

from __future__ import annotations

import pytest

from meshd.protocol.channel import Channel, HandshakeCompleted, UnauthorizedPeer
from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.errors import LocalProtocolError
from meshd.protocol.memberhandshake import MemberHandshake, NotACircleMember

from .harness import drain, seeded_rng

RNG = seeded_rng(31)
OLD, NEW, OTHER = RNG(32), RNG(32), RNG(32)


def _pair(initiator_psk: bytes, responder_psks: list[bytes], authorize=lambda key: True):  # noqa: ANN001, ANN202
    rng = seeded_rng(32)
    left, right = DHKeyPair.generate(rng), DHKeyPair.generate(rng)
    responder_phase = MemberHandshake(initiator=False, static=right, rng=rng, authorize=authorize,
                                      psks=responder_psks)
    initiator = Channel(MemberHandshake(initiator=True, static=left, rng=rng, authorize=lambda key: True,
                                        psks=[initiator_psk]), now=0.0)
    responder = Channel(responder_phase, now=0.0)
    return initiator, responder, responder_phase, left, right


def _deliver(sender: Channel, receiver: Channel) -> list:
    receiver.receive_data(sender.data_to_send())
    return drain(receiver)


@pytest.mark.parametrize(("offered", "index"), [(NEW, 0), (OLD, 1)])
def test_members_across_an_epoch_change_complete_it(offered: bytes, index: int) -> None:
    initiator, responder, phase, left, right = _pair(offered, [NEW, OLD])
    _deliver(initiator, responder)
    [done_initiator] = _deliver(responder, initiator)
    [done_responder] = _deliver(initiator, responder)
    assert isinstance(done_initiator, HandshakeCompleted) and isinstance(done_responder, HandshakeCompleted)
    assert done_responder.remote_static == left.public and done_initiator.remote_static == right.public
    assert phase.psk_index == index and initiator.handshake_hash == responder.handshake_hash


def test_a_stranger_gets_nothing_back() -> None:
    initiator, responder, phase, _, _ = _pair(OTHER, [NEW, OLD])
    responder.receive_data(initiator.data_to_send())
    with pytest.raises(NotACircleMember):
        drain(responder)
    assert responder.data_to_send() == b"" and phase.psk_index is None


def test_the_responder_still_authorises_the_static_key() -> None:
    initiator, responder, _, _, _ = _pair(NEW, [NEW], authorize=lambda key: False)
    _deliver(initiator, responder)
    _deliver(responder, initiator)
    responder.receive_data(initiator.data_to_send())
    with pytest.raises(UnauthorizedPeer):
        drain(responder)


def test_psk_counts_are_checked() -> None:
    static = DHKeyPair.generate(seeded_rng(33))
    for initiator, psks in ((True, []), (True, [NEW, OLD]), (False, [])):
        with pytest.raises(LocalProtocolError):
            MemberHandshake(initiator=initiator, static=static, rng=seeded_rng(34),
                            authorize=lambda key: True, psks=psks)
