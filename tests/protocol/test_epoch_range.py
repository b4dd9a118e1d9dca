"""Epoch numbers fit the u32 that envelopes and backups carry (protocol/circle.md, issue 18
gap 3): a record may not start an epoch no envelope could name."""

from __future__ import annotations

import pytest

from meshd.protocol.circle import Circle, epoch_keys
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair, seal
from meshd.protocol.envelope import mailbox_id, seal_envelope
from meshd.protocol.records import DeviceInfo, Record, RecordRejected

from .harness import seeded_rng


def _founded() -> tuple[Circle, SigningKeyPair, DHKeyPair]:
    rng = seeded_rng(3)
    signer, dh = SigningKeyPair(rng(32)), DHKeyPair.generate(rng)
    info = DeviceInfo(bytes(signer.public), bytes(dh.public), "laptop").claimed(signer)
    return Circle.create(signer, info, rng), signer, dh


def _epoch_record(circle: Circle, signer: SigningKeyPair, dh: DHKeyPair, number: int) -> Record:
    body = {"boxes": [[bytes(dh.public), seal(bytes(dh.public), bytes(32))]], "epoch": number}
    return Record.sign(signer, circle.circle_id, "epoch", circle.state.heads, body)


@pytest.mark.parametrize("number", [2**32, 2**40, 2**63 - 1])
def test_an_epoch_beyond_a_u32_is_a_bad_body(number: int) -> None:
    circle, signer, dh = _founded()
    with pytest.raises(RecordRejected) as rejected:
        _epoch_record(circle, signer, dh, number)
    assert rejected.value.reason == "bad-body"


def test_the_largest_epoch_is_valid_and_seals_envelopes() -> None:
    circle, signer, dh = _founded()
    record = _epoch_record(circle, signer, dh, 2**32 - 1)
    circle.merge([record.encoded])
    assert circle.state.epoch_number == 2**32 - 1
    keys = epoch_keys(2**32 - 1, circle.epoch_key(dh))
    envelope = seal_envelope(keys=keys, mailbox=mailbox_id(keys, bytes(signer.public)),
                             signer=signer, seq=1, payload={"t": "x"}, rng=seeded_rng(4))
    assert envelope[1:5] == b"\xff\xff\xff\xff"
