"""Every 25519_ChaChaPoly_BLAKE2b vector of cacophony's file: handshake, hash, transport."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.noise import HandshakeState
from meshd.protocol.noisepatterns import parse_pattern

SUITE = "_25519_ChaChaPoly_BLAKE2b"
EXPECTED_VECTOR_COUNT = 59


def load_vectors(shared: Path) -> list[dict]:
    data = json.loads((shared / "noise" / "cacophony.txt").read_text())
    return [v for v in data["vectors"] if v["protocol_name"].endswith(SUITE)]


def fixed_rng(key_hex: str | None):
    def rng(n: int) -> bytes:
        assert key_hex is not None, "pattern asked for an ephemeral the vector does not have"
        assert n == 32
        return bytes.fromhex(key_hex)

    return rng


def side(vector: dict, role: str) -> HandshakeState:
    pattern = vector["protocol_name"][len("Noise_") : -len(SUITE)]
    static = vector.get(f"{role}_static")
    remote = vector.get(f"{role}_remote_static")
    return HandshakeState(
        parse_pattern(pattern),
        initiator=role == "init",
        prologue=bytes.fromhex(vector[f"{role}_prologue"]),
        rng=fixed_rng(vector.get(f"{role}_ephemeral")),
        s=DHKeyPair.from_private_bytes(bytes.fromhex(static)) if static else None,
        rs=bytes.fromhex(remote) if remote else None,
        psks=[bytes.fromhex(p) for p in vector.get(f"{role}_psks", [])],
    )


def test_the_suite_has_all_59_vectors(shared_vectors: Path) -> None:
    assert len(load_vectors(shared_vectors)) == EXPECTED_VECTOR_COUNT


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "vector" in metafunc.fixturenames:
        from tests.conftest import SHARED_VECTORS

        vectors = load_vectors(SHARED_VECTORS) if SHARED_VECTORS.is_dir() else []
        metafunc.parametrize("vector", vectors, ids=[v["protocol_name"] for v in vectors])


def test_vector(vector: dict) -> None:
    initiator, responder = side(vector, "init"), side(vector, "resp")
    one_way = initiator.pattern.one_way
    messages = vector["messages"]
    handshake_len = len(initiator.pattern.messages)
    for index, message in enumerate(messages[:handshake_len]):
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        ciphertext = sender.write_message(bytes.fromhex(message["payload"]))
        assert ciphertext.hex() == message["ciphertext"], f"handshake message {index}"
        assert receiver.read_message(ciphertext).hex() == message["payload"]
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert responder.handshake_hash.hex() == vector["handshake_hash"]
    for index, message in enumerate(messages[handshake_len:], start=handshake_len):
        from_initiator = one_way or index % 2 == 0
        sender, receiver = (initiator, responder) if from_initiator else (responder, initiator)
        assert sender.send_cipher and receiver.receive_cipher
        ciphertext = sender.send_cipher.encrypt_with_ad(b"", bytes.fromhex(message["payload"]))
        assert ciphertext.hex() == message["ciphertext"], f"transport message {index}"
        assert receiver.receive_cipher.decrypt_with_ad(b"", ciphertext).hex() == message["payload"]
