"""Record.decode remembers what decoded (a bounded cache): the same bytes give the same
record without a second signature check; what failed is never remembered."""

from __future__ import annotations

import random

import pytest

from meshd.protocol import records
from meshd.protocol.circle import Circle
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair
from meshd.protocol.records import DeviceInfo, Record, RecordRejected


def genesis() -> bytes:
    rng = random.Random(5).randbytes
    signer = SigningKeyPair(rng(32))
    me = DeviceInfo(signer.public, DHKeyPair.generate(rng).public, "x").claimed(signer)
    return Circle.create(signer, me, rng).records()[0]


def test_a_decoded_record_is_served_again_without_a_signature_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(bytearray(genesis()))  # a fresh bytes object, never decoded
    records._decoded.clear()  # noqa: SLF001
    first = Record.decode(data)
    checks: list[bytes] = []
    monkeypatch.setattr(records, "signature_is_valid", lambda *args: checks.append(args[0]) or True)
    assert Record.decode(bytes(bytearray(data))) is first  # equal bytes, another object
    assert checks == []


def test_a_record_that_fails_is_not_remembered() -> None:
    forged = bytearray(genesis())
    forged[-1] ^= 1
    records._decoded.clear()  # noqa: SLF001
    for _ in range(2):
        with pytest.raises(RecordRejected):
            Record.decode(bytes(forged))
    assert not records._decoded  # noqa: SLF001


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "DECODED_CACHE_RECORDS", 1)
    records._decoded.clear()  # noqa: SLF001
    Record.decode(genesis())
    rng = random.Random(6).randbytes
    signer = SigningKeyPair(rng(32))
    other = Circle.create(signer, DeviceInfo(signer.public, DHKeyPair.generate(rng).public,
                                             "y").claimed(signer), rng).records()[0]
    records._decoded.clear()  # noqa: SLF001
    Record.decode(bytes(bytearray(other)))
    Record.decode(bytes(bytearray(genesis())))
    assert len(records._decoded) == 1  # noqa: SLF001
