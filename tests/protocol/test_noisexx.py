"""noisexx.XXState is Noise_XX_25519_ChaChaPoly_BLAKE2b: the published vector, and the same
bytes as the generic HandshakeState message by message, in either role against either."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.errors import LocalProtocolError, RemoteProtocolError
from meshd.protocol.noise import HandshakeState
from meshd.protocol.noisexx import PROTOCOL_NAME, XXState

from .harness import follow_transcript, seeded_rng


def xx_vector(shared: Path) -> dict:
    data = json.loads((shared / "noise" / "cacophony.txt").read_text())
    [vector] = [v for v in data["vectors"] if v["protocol_name"] == PROTOCOL_NAME.decode()]
    return vector


def fixed(key_hex: str):  # type: ignore[no-untyped-def]
    return lambda n: bytes.fromhex(key_hex)


def test_the_published_xx_vector(shared_vectors: Path) -> None:
    vector = xx_vector(shared_vectors)
    sides = [
        XXState(initiator=role == "init", prologue=bytes.fromhex(vector[f"{role}_prologue"]),
                rng=fixed(vector[f"{role}_ephemeral"]),
                s=DHKeyPair.from_private_bytes(bytes.fromhex(vector[f"{role}_static"])))
        for role in ("init", "resp")
    ]
    messages = vector["messages"]
    for index, message in enumerate(messages[:3]):
        sender, receiver = sides[index % 2], sides[1 - index % 2]
        ciphertext = sender.write_message(bytes.fromhex(message["payload"]))
        assert ciphertext.hex() == message["ciphertext"], f"handshake message {index}"
        assert receiver.read_message(ciphertext).hex() == message["payload"]
    initiator, responder = sides
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert responder.handshake_hash.hex() == vector["handshake_hash"]
    assert initiator.rs == responder.s.public and responder.rs == initiator.s.public
    for index, message in enumerate(messages[3:], start=3):
        sender, receiver = sides[index % 2], sides[1 - index % 2]
        assert sender.send_cipher and receiver.receive_cipher
        ciphertext = sender.send_cipher.encrypt_with_ad(b"", bytes.fromhex(message["payload"]))
        assert ciphertext.hex() == message["ciphertext"], f"transport message {index}"
        assert receiver.receive_cipher.decrypt_with_ad(b"", ciphertext).hex() == message["payload"]


def generic(initiator: bool, seed: int, static: DHKeyPair) -> HandshakeState:
    return HandshakeState("XX", initiator=initiator, prologue=b"meshd/1", rng=seeded_rng(seed), s=static)


def written_out(initiator: bool, seed: int, static: DHKeyPair) -> XXState:
    return XXState(initiator=initiator, prologue=b"meshd/1", rng=seeded_rng(seed), s=static)


@pytest.mark.parametrize("initiator_kind", [generic, written_out])
@pytest.mark.parametrize("responder_kind", [generic, written_out])
@pytest.mark.parametrize("seed", range(5))
def test_the_same_bytes_as_the_generic_state(initiator_kind, responder_kind, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = seeded_rng(100 + seed)
    alice, bob = DHKeyPair.generate(rng), DHKeyPair.generate(rng)
    payloads = [rng(seed * 7), rng(seed * 3 + 1), rng(seed)]
    # The reference run: both sides generic, with the same static keys and ephemeral rngs.
    reference = (generic(True, seed, alice), generic(False, seed + 50, bob))
    pair = (initiator_kind(True, seed, alice), responder_kind(False, seed + 50, bob))
    follow_transcript(reference, pair, payloads)
    for ours, theirs in zip(pair, reference, strict=True):
        assert ours.complete and ours.handshake_hash == theirs.handshake_hash
        assert ours.rs == theirs.rs
        assert ours.send_cipher and theirs.send_cipher
        assert ours.send_cipher.encrypt_with_ad(b"", b"m") == theirs.send_cipher.encrypt_with_ad(b"", b"m")


def handshake_pair(seed: int = 1) -> tuple[XXState, XXState]:
    rng = seeded_rng(seed)
    return (written_out(True, seed, DHKeyPair.generate(rng)),
            written_out(False, seed + 1, DHKeyPair.generate(rng)))


@pytest.mark.parametrize("flip", [0, 40, -1])  # the ephemeral, the static key, the payload tag
def test_a_tampered_second_message_fails_and_leaves_the_state_dead(flip: int) -> None:
    initiator, responder = handshake_pair()
    responder.read_message(initiator.write_message(b""))
    message = bytearray(responder.write_message(b""))
    message[flip] ^= 1
    with pytest.raises(RemoteProtocolError):
        initiator.read_message(bytes(message))
    with pytest.raises(LocalProtocolError, match="already failed"):
        initiator.write_message(b"")


def test_a_tampered_third_message_fails_and_leaves_the_state_dead() -> None:
    initiator, responder = handshake_pair()
    responder.read_message(initiator.write_message(b""))
    initiator.read_message(responder.write_message(b""))
    message = bytearray(initiator.write_message(b""))
    message[3] ^= 1
    with pytest.raises(RemoteProtocolError):
        responder.read_message(bytes(message))
    assert not responder.complete
    with pytest.raises(LocalProtocolError, match="already failed"):
        responder.read_message(b"")


@pytest.mark.parametrize(("step", "length"), [(0, 31), (1, 32 + 48 + 15), (2, 48 + 15)])
def test_a_short_message_is_the_peers_error(step: int, length: int) -> None:
    initiator, responder = handshake_pair()
    sides = (initiator, responder)
    for index in range(step):
        sides[1 - index % 2].read_message(sides[index % 2].write_message(b""))
    with pytest.raises(RemoteProtocolError, match="too short"):
        sides[1 - step % 2].read_message(bytes(length))


def test_turns_and_completion() -> None:
    initiator, responder = handshake_pair()
    assert initiator.is_my_turn and not responder.is_my_turn
    with pytest.raises(LocalProtocolError, match="turn"):
        responder.write_message(b"")
    with pytest.raises(LocalProtocolError, match="turn"):
        initiator.read_message(bytes(32))
    responder.read_message(initiator.write_message(b""))
    initiator.read_message(responder.write_message(b""))
    responder.read_message(initiator.write_message(b""))
    for side in (initiator, responder):
        assert side.complete and not side.is_my_turn
        with pytest.raises(LocalProtocolError, match="already complete"):
            side.write_message(b"")
    with pytest.raises(LocalProtocolError, match="65535"):
        handshake_pair(2)[0].write_message(bytes(65535))


def test_each_handshake_draws_a_fresh_ephemeral() -> None:
    rng = seeded_rng(9)
    static = DHKeyPair.generate(rng)
    first = XXState(initiator=True, prologue=b"", rng=rng, s=static).write_message(b"")
    second = XXState(initiator=True, prologue=b"", rng=rng, s=static).write_message(b"")
    assert first[:32] != second[:32]
