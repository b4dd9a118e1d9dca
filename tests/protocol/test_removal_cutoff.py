"""A removal point: the remove record names the last entry of the removed device's log that
still counts, and entries past it are refused (protocol/circle.md "Bodies",
protocol/logs.md "A removed member's entries")."""

from __future__ import annotations

import msgpack
import pytest

from meshd.protocol.circle import Circle
from meshd.protocol.cutoff import NOTHING_COUNTS, cut_batch, cutoff_wire
from meshd.protocol.entry import Head, entry_hash, sign_head
from meshd.protocol.log import (
    CLEAR,
    PUT,
    ZERO_HASH,
    EntryRejected,
    Write,
    compose_batch,
    verify_batch,
)
from meshd.protocol.records import CircleOperationError, Record, RecordRejected

from .test_circle import epoch_body, forge, make_device, seeded_rng
from .test_log import WALL_MS, allow_all, as_batch


@pytest.fixture
def rng():
    return seeded_rng(12)


def _writes(n: int) -> list[Write]:
    return [Write("chat", f"m{i}", PUT, b"x") for i in range(n)]


def _log(signer, n: int):
    """n entries of signer's log, with a signed head after every entry."""
    return compose_batch(signer, 0, ZERO_HASH, 0, WALL_MS, _writes(n), head_every_bytes=1)


def test_a_remove_record_carries_a_signed_cutoff(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    log = _log(phone.signer, 5)
    cutoff = log.heads[2]  # entry 3
    [encoded] = circle.remove_device(laptop.signer, phone.key, rng, cutoff=cutoff)
    record = Record.decode(encoded)
    assert record.body["cutoff"] == [3, cutoff.hash, cutoff.sig]
    assert record.cutoff == cutoff
    assert circle.state.cutoffs == {phone.key: cutoff}
    # Every replica computes the same cutoff from the records alone.
    assert Circle.from_records(circle.records()).state.cutoffs == {phone.key: cutoff}


def test_a_remove_without_cutoff_keeps_its_old_meaning(trio_of, rng) -> None:
    circle, laptop, _desktop, phone = trio_of
    [encoded] = circle.remove_device(laptop.signer, phone.key, rng)
    assert "cutoff" not in Record.decode(encoded).body
    assert phone.key in circle.state.removed
    assert circle.state.cutoffs == {}  # everything it wrote still counts


def test_nothing_of_the_device_counts_with_a_zero_cutoff(trio_of, rng) -> None:
    circle, laptop, _desktop, phone = trio_of
    circle.remove_device(laptop.signer, phone.key, rng, cutoff=NOTHING_COUNTS)
    assert circle.state.cutoffs == {phone.key: NOTHING_COUNTS}


def _remove_body(circle, laptop, desktop, phone, cutoff) -> dict:
    body = epoch_body(circle, [laptop.info.dh_key, desktop.info.dh_key])
    return {"boxes": body["boxes"], "cutoff": cutoff, "epoch": body["epoch"],
            "removed": phone.key}


@pytest.mark.parametrize("cutoff, why", [
    ("sig-of-another", "signed by another key"),
    ("wrong-hash", "hash does not match the signature"),
    ([0, b"\x01" * 32, bytes(64)], "seq 0 names no entry"),
    ([-1, bytes(32), bytes(64)], "negative seq"),
    ([2**40, bytes(32), bytes(64)], "seq past the largest"),
    ([3, bytes(31), bytes(64)], "short hash"),
    ([3, bytes(32)], "no signature"),
    ({"seq": 3}, "not an array"),
])
def test_a_bad_cutoff_is_a_bad_body(trio_of, cutoff, why) -> None:
    circle, laptop, desktop, phone = trio_of
    head = _log(phone.signer, 3).heads[-1]
    if cutoff == "sig-of-another":
        other = sign_head(desktop.signer, 3, head.hash)
        cutoff = [3, other.hash, other.sig]
    elif cutoff == "wrong-hash":
        cutoff = [3, b"\x07" * 32, head.sig]
    body = _remove_body(circle, laptop, desktop, phone, cutoff)
    with pytest.raises(RecordRejected) as err:
        Record.decode(forge(laptop.signer, circle, "remove", body))
    assert err.value.reason in ("bad-body", "malformed"), why


def test_a_local_remove_refuses_a_cutoff_not_signed_by_the_device(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    forged = _log(desktop.signer, 2).heads[-1]
    with pytest.raises(CircleOperationError):
        circle.remove_device(laptop.signer, phone.key, rng, cutoff=forged)


def test_several_counting_removes_keep_the_smallest_cutoff(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    log = _log(phone.signer, 6)
    other = Circle.from_records(circle.records())
    circle.remove_device(laptop.signer, phone.key, rng, cutoff=log.heads[4])
    other.remove_device(desktop.signer, phone.key, rng, cutoff=log.heads[1])
    circle.merge(other.records())
    assert circle.state.cutoffs == {phone.key: log.heads[1]}
    # A concurrent remove without a cutoff (everything counts) does not lift it.
    third = Circle.from_records(other.records())
    assert third.state.cutoffs == {phone.key: log.heads[1]}


def test_a_cutoff_of_a_remove_that_does_not_count_is_ignored(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    thief = Circle.from_records(circle.records())
    other = Circle.from_records(circle.records())
    # The phone (removed by the laptop and by the desktop) concurrently removes the laptop,
    # naming a cutoff of the laptop's log: its remove does not count, nor does its cutoff.
    thief.remove_device(phone.signer, laptop.key, rng, cutoff=NOTHING_COUNTS)
    circle.remove_device(laptop.signer, phone.key, rng, cutoff=NOTHING_COUNTS)
    other.remove_device(desktop.signer, phone.key, rng)
    circle.merge(other.records())
    circle.merge(thief.records())
    assert circle.state.removed == {phone.key}
    assert circle.state.cutoffs == {phone.key: NOTHING_COUNTS}


def test_the_recovery_words_settle_with_a_cutoff(rng) -> None:
    from meshd.protocol.recovery import recovery_member
    owner, thief = make_device("laptop", rng), make_device("stolen phone", rng)
    circle = Circle.create(owner.signer, owner.info, rng)
    circle.add_device(owner.signer, thief.info, rng)
    words_signer, _dh, words_info = recovery_member(rng(32))
    circle.enrol_recovery(owner.signer, words_info, rng)
    owners, thiefs = Circle.from_records(circle.records()), Circle.from_records(circle.records())
    owners.remove_device(owner.signer, thief.key, rng, cutoff=NOTHING_COUNTS)
    # The thief removes the owner naming nothing of the owner's log as counting.
    thiefs.remove_device(thief.signer, owner.key, rng, cutoff=NOTHING_COUNTS)
    owners.merge(thiefs.records())
    assert owners.state.cutoffs.keys() == {owner.key, thief.key}  # both removed, for now
    good = _log(thief.signer, 4).heads[1]
    owners.settle_with_recovery(words_signer, thief.key, rng, cutoff=good)
    # The thief's remove no longer counts: its cutoff of the owner's log goes with it.
    assert owners.state.cutoffs == {thief.key: NOTHING_COUNTS}
    with pytest.raises(CircleOperationError):
        owners.settle_with_recovery(words_signer, thief.key, rng, cutoff=_log(owner.signer, 2).heads[0])


# ---- The log rule -------------------------------------------------------------------


def test_a_batch_past_the_cutoff_is_refused_as_past_removal(trio_of) -> None:
    _circle, _laptop, _desktop, phone = trio_of
    log = _log(phone.signer, 5)
    batch = as_batch(log, 3, 5)  # entries 4..5
    with pytest.raises(EntryRejected) as err:
        cut_batch(batch, log.heads[2])
    assert err.value.reason == "past-removal"
    with pytest.raises(EntryRejected) as err:
        cut_batch(as_batch(log), NOTHING_COUNTS)
    assert err.value.reason == "past-removal"


def test_a_batch_across_the_cutoff_keeps_what_counts_and_ends_at_the_cutoff(trio_of) -> None:
    _circle, _laptop, _desktop, phone = trio_of
    log = compose_batch(phone.signer, 0, ZERO_HASH, 0, WALL_MS, _writes(5))  # one head, at 5
    assert [h.seq for h in log.heads] == [5]
    cutoff = sign_head(phone.signer, 3, _hash_of(log, 3))
    cut = cut_batch(as_batch(log), cutoff)
    assert cut.head == cutoff and len(cut.headers) == 3
    verified = verify_batch(cut, 0, ZERO_HASH, allow_all)
    assert verified.last_seq == 3 and verified.heads == [cutoff]


def test_a_batch_within_the_cutoff_is_unchanged(trio_of) -> None:
    _circle, _laptop, _desktop, phone = trio_of
    log = _log(phone.signer, 5)
    batch = as_batch(log)
    assert cut_batch(batch, log.heads[4]) is batch
    assert cut_batch(batch, None) is batch


def test_a_fork_at_the_cutoff_is_refused(trio_of) -> None:
    _circle, _laptop, _desktop, phone = trio_of
    log = _log(phone.signer, 5)
    fork = compose_batch(phone.signer, 0, ZERO_HASH, 0, WALL_MS + 9, [Write("chat", "", CLEAR)] * 5,
                         head_every_bytes=1)
    with pytest.raises(EntryRejected) as err:
        cut_batch(as_batch(fork), log.heads[2])
    assert err.value.reason == "past-removal"


def _hash_of(log, seq: int) -> bytes:
    return entry_hash(log.headers[seq - log.first_seq])


def test_the_cutoff_travels_as_three_fields() -> None:
    head = Head(3, b"\x01" * 32, b"\x02" * 64)
    assert msgpack.unpackb(msgpack.packb(cutoff_wire(head))) == [3, b"\x01" * 32, b"\x02" * 64]
