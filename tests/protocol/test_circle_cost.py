"""Verification cost of offered circles: linear along chains, budgeted across merges."""

from __future__ import annotations

import os

import pytest

from meshd.protocol.circle import Circle
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair, seal
from meshd.protocol.records import EPOCH, MAX_CIRCLE_RECORDS, DeviceInfo, Record, RecordRejected


def founded() -> tuple[Circle, SigningKeyPair, bytes]:
    signer, dh = SigningKeyPair(os.urandom(32)), DHKeyPair.generate(os.urandom)
    info = DeviceInfo(bytes(signer.public), bytes(dh.public), "m").claimed(signer)
    return Circle.create(signer, info, os.urandom), signer, bytes(dh.public)


def epoch(signer: SigningKeyPair, circle: Circle, parents: list[bytes], number: int, dh: bytes) -> Record:
    return Record.sign(signer, circle.circle_id, EPOCH, parents,
                       {"boxes": [[dh, seal(dh, os.urandom(32))]], "epoch": number})


def test_a_chain_costs_nothing_beyond_its_records() -> None:
    circle, signer, dh = founded()
    records, parent = circle.records(), circle.heads[0]
    for number in range(2, 300):
        # A redundant second parent (an ancestor of the first) is still a chain.
        extra = [records and Record.decode(records[0]).hash] if number % 2 else []
        record = epoch(signer, circle, [parent, *extra], number, dh)
        records.append(record.encoded)
        parent = record.hash
    offered = Circle.from_records(records[::-1], max_cost=1)  # any order, no full evaluation
    assert offered.state.epoch_number == 299


def test_merging_branches_costs_their_ancestors_and_the_budget_refuses_a_ladder() -> None:
    circle, signer, dh = founded()
    records, left, right = circle.records(), circle.heads[0], circle.heads[0]
    for number in range(2, 120, 2):  # two branches, each record merging both
        a = epoch(signer, circle, sorted({left, right}), number, dh)
        b = epoch(signer, circle, sorted({left, right}), number + 1, dh)
        records += [a.encoded, b.encoded]
        left, right = a.hash, b.hash
    assert Circle.from_records(records).state.epoch_number > 0  # valid, and no cap by default
    with pytest.raises(RecordRejected) as caught:
        Circle.from_records(records, max_cost=2_000)
    assert caught.value.reason == "too-costly"


def test_a_circle_holds_at_most_max_circle_records() -> None:
    circle, _, _ = founded()
    with pytest.raises(RecordRejected) as caught:
        circle.merge([b"x"] * MAX_CIRCLE_RECORDS)
    assert caught.value.reason == "too-many-records"
    with pytest.raises(RecordRejected):
        Circle.from_records([b"x"] * (MAX_CIRCLE_RECORDS + 1))
