"""noisexx.XXState with a PSK is Noise_XXpsk0_25519_ChaChaPoly_BLAKE2b, the daemons' device
handshake (memberhandshake.py).

No published XXpsk0 vector is stored (cacophony has XXpsk3 and the psk0 modifier on NN, NK,
KK, N, K, whose vectors pin the generic HandshakeState's psk0 handling in
test_noise_vectors.py). So: the same bytes as the generic HandshakeState message by message,
in every role combination; and the same bytes as the noiseprotocol package, an independent
implementation, with the same keys.
"""

from __future__ import annotations

import pytest

from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.errors import LocalProtocolError, RemoteProtocolError
from meshd.protocol.noise import HandshakeState
from meshd.protocol.noisexx import PSK0_PROTOCOL_NAME, XXState

from .harness import follow_transcript, seeded_rng

PROLOGUE = b"meshd/1"


def generic(initiator: bool, seed: int, static: DHKeyPair, psk: bytes) -> HandshakeState:
    return HandshakeState("XXpsk0", initiator=initiator, prologue=PROLOGUE, rng=seeded_rng(seed),
                          s=static, psks=[psk])


def written_out(initiator: bool, seed: int, static: DHKeyPair, psk: bytes) -> XXState:
    return XXState(initiator=initiator, prologue=PROLOGUE, rng=seeded_rng(seed), s=static, psk=psk)


@pytest.mark.parametrize("initiator_kind", [generic, written_out])
@pytest.mark.parametrize("responder_kind", [generic, written_out])
@pytest.mark.parametrize("seed", range(5))
def test_the_same_bytes_as_the_generic_state(initiator_kind, responder_kind, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = seeded_rng(200 + seed)
    alice, bob, psk = DHKeyPair.generate(rng), DHKeyPair.generate(rng), rng(32)
    payloads = [rng(seed * 7), rng(seed * 3 + 1), rng(seed)]
    reference = (generic(True, seed, alice, psk), generic(False, seed + 50, bob, psk))
    pair = (initiator_kind(True, seed, alice, psk), responder_kind(False, seed + 50, bob, psk))
    follow_transcript(reference, pair, payloads)
    # Each side's send key is the other's receive key.
    initiator, responder = pair
    assert initiator.send_cipher and responder.receive_cipher
    assert responder.receive_cipher.decrypt_with_ad(b"", initiator.send_cipher.encrypt_with_ad(b"", b"x")) == b"x"
    for ours, theirs in zip(pair, reference, strict=True):
        assert ours.complete and ours.handshake_hash == theirs.handshake_hash
        assert ours.rs == theirs.rs
        assert ours.send_cipher and theirs.send_cipher and ours.receive_cipher
        theirs.send_cipher.set_nonce(ours.send_cipher.n)
        assert ours.send_cipher.encrypt_with_ad(b"", b"m") == theirs.send_cipher.encrypt_with_ad(b"", b"m")


def test_message_one_is_sealed_under_the_psk() -> None:
    """Unlike XX, message 1 of XXpsk0 carries a tag: a payload is not readable in clear."""
    rng = seeded_rng(7)
    state = written_out(True, 1, DHKeyPair.generate(rng), rng(32))
    message = state.write_message(b"visible?")
    assert len(message) == 32 + 8 + 16 and b"visible?" not in message


@pytest.mark.parametrize("initiator_is_ours", [True, False])
def test_the_same_bytes_as_noiseprotocol(initiator_is_ours: bool) -> None:
    noise_connection = pytest.importorskip("noise.connection")
    Keypair, NoiseConnection = noise_connection.Keypair, noise_connection.NoiseConnection
    rng = seeded_rng(300)
    keys = {"init": (rng(32), rng(32)), "resp": (rng(32), rng(32))}  # (static, ephemeral)
    psk = rng(32)

    def theirs(role: str):  # type: ignore[no-untyped-def]
        connection = NoiseConnection.from_name(PSK0_PROTOCOL_NAME)
        connection.set_prologue(PROLOGUE)
        connection.set_psks(psk=psk)
        connection.set_keypair_from_private_bytes(Keypair.STATIC, keys[role][0])
        connection.set_keypair_from_private_bytes(Keypair.EPHEMERAL, keys[role][1])
        connection.set_as_initiator() if role == "init" else connection.set_as_responder()
        with pytest.warns(UserWarning, match="ephemeral"):  # fixed ephemerals: fine for a test
            connection.start_handshake()
        return connection

    def ours(role: str) -> XXState:
        ephemeral = keys[role][1]
        return XXState(initiator=role == "init", prologue=PROLOGUE, rng=lambda n: ephemeral,
                       s=DHKeyPair.from_private_bytes(keys[role][0]), psk=psk)

    initiator = ours("init") if initiator_is_ours else theirs("init")
    responder = theirs("resp") if initiator_is_ours else ours("resp")
    payloads = [b"one", b"", b"three"]
    for index, payload in enumerate(payloads):
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        assert receiver.read_message(sender.write_message(payload)) == payload, f"message {index}"
    ours_side, theirs_side = (initiator, responder) if initiator_is_ours else (responder, initiator)
    assert ours_side.complete and theirs_side.handshake_finished
    assert ours_side.handshake_hash == theirs_side.get_handshake_hash()
    assert ours_side.send_cipher is not None
    assert theirs_side.decrypt(ours_side.send_cipher.encrypt_with_ad(b"", b"after")) == b"after"


def member_pair(initiator_psk: bytes, responder_psk: bytes) -> tuple[XXState, XXState]:
    rng = seeded_rng(11)
    return (written_out(True, 12, DHKeyPair.generate(rng), initiator_psk),
            written_out(False, 13, DHKeyPair.generate(rng), responder_psk))


def test_another_psk_fails_message_one_and_kills_the_state() -> None:
    rng = seeded_rng(14)
    initiator, responder = member_pair(rng(32), rng(32))
    with pytest.raises(RemoteProtocolError):
        responder.read_message(initiator.write_message(b""))
    assert not responder.is_my_turn and responder.rs is None
    with pytest.raises(LocalProtocolError, match="already failed"):
        responder.write_message(b"")


@pytest.mark.parametrize(("step", "length"), [(0, 32 + 15), (1, 32 + 48 + 15), (2, 48 + 15)])
def test_a_short_message_is_the_peers_error(step: int, length: int) -> None:
    psk = seeded_rng(15)(32)
    sides = member_pair(psk, psk)
    for index in range(step):
        sides[1 - index % 2].read_message(sides[index % 2].write_message(b""))
    with pytest.raises(RemoteProtocolError, match="too short"):
        sides[1 - step % 2].read_message(bytes(length))


@pytest.mark.parametrize(("step", "flip"), [(0, 0), (0, 40), (1, 0), (1, 40), (1, -1), (2, 3), (2, -1)])
def test_a_tampered_message_fails(step: int, flip: int) -> None:
    psk = seeded_rng(16)(32)
    sides = member_pair(psk, psk)
    for index in range(step):
        sides[1 - index % 2].read_message(sides[index % 2].write_message(b""))
    message = bytearray(sides[step % 2].write_message(b""))
    message[flip] ^= 1
    with pytest.raises(RemoteProtocolError):
        sides[1 - step % 2].read_message(bytes(message))
    assert not sides[1 - step % 2].complete


def test_a_psk_must_be_32_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        written_out(True, 1, DHKeyPair.generate(seeded_rng(17)), bytes(31))
