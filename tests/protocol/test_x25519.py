"""X25519 as the handshake uses it (DHKeyPair.dh) agrees with dh() and libsodium's base point
multiple, and a low-order point from the peer is the peer's error, in a handshake too."""

from __future__ import annotations

import pytest

from meshd.protocol.channel import Channel, XXHandshake
from meshd.protocol.crypto import DHKeyPair, PrivateKey, dh
from meshd.protocol.errors import RemoteProtocolError

from .harness import seeded_rng

# Low-order points of Curve25519 (u-coordinates): X25519 with any of them is all zeros.
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
]


def test_a_key_pair_agrees_with_libsodium() -> None:
    rng = seeded_rng(1)
    for _ in range(20):
        ours, theirs = DHKeyPair.generate(rng), DHKeyPair.generate(rng)
        assert ours.dh(theirs.public) == theirs.dh(ours.public)
        assert ours.dh(theirs.public) == dh(PrivateKey(bytes(ours.private)), theirs.public)


def test_the_public_key_is_libsodiums_base_point_multiple() -> None:
    from nacl.bindings import crypto_scalarmult_base

    rng = seeded_rng(2)
    for _ in range(20):
        pair = DHKeyPair.generate(rng)
        assert pair.public == crypto_scalarmult_base(bytes(pair.private))


@pytest.mark.parametrize("point", LOW_ORDER)
def test_a_low_order_point_is_a_remote_protocol_error(point: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        DHKeyPair.generate(seeded_rng(3)).dh(point)
    with pytest.raises(RemoteProtocolError):
        dh(PrivateKey(bytes(32)), point)


@pytest.mark.parametrize("point", LOW_ORDER)
def test_a_low_order_ephemeral_fails_the_handshake(point: bytes) -> None:
    rng = seeded_rng(4)
    responder = Channel(XXHandshake(initiator=False, static=DHKeyPair.generate(rng), rng=rng,
                                    authorize=lambda key: True), now=0.0)
    responder.receive_data(len(point).to_bytes(2, "big") + point)
    with pytest.raises(RemoteProtocolError):
        # Message 1 is only e: the responder's first DH (ee) is in its own message 2.
        responder.next_event()
