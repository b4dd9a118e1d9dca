"""Deterministic inputs and helpers shared by the vector generators (see generate.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
from nacl import bindings as sodium

from meshd.protocol import circle as circle_module
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair
from meshd.protocol.records import DeviceInfo

# ---- deterministic inputs ------------------------------------------------------------


class Draws:
    """rng(n) for the code under test: a BLAKE2b-512 counter stream keyed by a label."""

    def __init__(self, label: str) -> None:
        self._label = label.encode()
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += hashlib.blake2b(self._counter.to_bytes(8, "big"), key=self._label).digest()
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


class Queue:
    """rng(n) that hands out planned values in order (each of the size asked)."""

    def __init__(self, *values: bytes) -> None:
        self._values = list(values)

    def __call__(self, n: int) -> bytes:
        value = self._values.pop(0)
        assert len(value) == n, (len(value), n)
        return value

    def empty(self) -> bool:
        return not self._values


def hx(data: bytes) -> str:
    return bytes(data).hex()


def pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


@contextmanager
def deterministic_sealed_boxes(rng: Callable[[int], bytes]) -> Iterator[None]:
    """circle.py's seal() with the ephemeral key drawn from rng (libsodium's sealed box:
    nonce = BLAKE2b-192(epk || pk), box = epk || crypto_box(m, nonce, pk, esk))."""

    def seal(recipient: bytes, plaintext: bytes) -> bytes:
        esk = rng(32)
        epk = sodium.crypto_scalarmult_base(esk)
        nonce = hashlib.blake2b(epk + recipient, digest_size=24).digest()
        return epk + sodium.crypto_box(plaintext, nonce, recipient, esk)

    original = circle_module.seal
    circle_module.seal = seal
    try:
        yield
    finally:
        circle_module.seal = original


class Device:
    """A test device with keys from a label (its secrets are published: test keys only)."""

    def __init__(self, name: str, rng: Callable[[int], bytes]) -> None:
        self.name = name
        self.signer = SigningKeyPair(rng(32))
        self.dh = DHKeyPair.from_private_bytes(rng(32))
        self.info = DeviceInfo(bytes(self.signer.public), bytes(self.dh.public), name).claimed(self.signer)

    @property
    def key(self) -> bytes:
        return bytes(self.signer.public)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ed25519_seed": hx(bytes(self.signer.seed)),
            "sign_key": hx(self.key),
            "x25519_private": hx(bytes(self.dh.private)),
            "dh_key": hx(bytes(self.dh.public)),
            "claim": hx(self.info.proof),
        }


GENERATOR = "protocol/vectors/generate.py"


def document(construction: str, spec: list[str], notes: str, **body: Any) -> dict[str, Any]:
    return {"construction": construction, "spec": spec, "generated_by": GENERATOR,
            "notes": notes, **body}
