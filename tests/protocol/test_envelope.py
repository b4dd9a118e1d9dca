"""Envelopes and backups: sealed, signed, bound to their place, and checked for order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.protocol.circle import EpochKeys, epoch_keys
from meshd.protocol.crypto import SigningKeyPair
from meshd.protocol.envelope import (
    MAX_AHEAD_PER_SENDER,
    Arrival,
    EnvelopeRejected,
    EnvelopeReplayed,
    RollbackDetected,
    RollbackGuard,
    SequenceTracker,
    mailbox_id,
    open_backup,
    open_envelope,
    seal_backup,
    seal_envelope,
)

from .harness import seeded_rng

RNG = seeded_rng(11)
ALICE = SigningKeyPair(RNG(32))
BOB = SigningKeyPair(RNG(32))
MALLORY = SigningKeyPair(RNG(32))
EPOCH1 = epoch_keys(1, RNG(32))
EPOCH2 = epoch_keys(2, RNG(32))
KEYS = {1: EPOCH1, 2: EPOCH2}
CIRCLE = bytes(range(32))
MEMBERS = {bytes(ALICE.public), bytes(BOB.public)}


def is_member(key: bytes) -> bool:
    return key in MEMBERS


def seal(seq: int, payload: dict | None = None, *, keys: EpochKeys = EPOCH1,
         signer: SigningKeyPair = ALICE, to: SigningKeyPair = BOB) -> bytes:
    return seal_envelope(keys=keys, mailbox=mailbox_id(keys, to.public), signer=signer, seq=seq,
                         payload=payload or {"t": "log.entries", "n": seq}, rng=RNG)


def open_for_bob(envelope: bytes, keys: EpochKeys = EPOCH1):
    return open_envelope(envelope, mailbox=mailbox_id(keys, BOB.public),
                         keys_for_epoch=KEYS.get, is_sender_allowed=is_member)


def test_mailbox_ids_are_per_recipient_and_rotate_with_the_epoch() -> None:
    ids = {mailbox_id(EPOCH1, BOB.public), mailbox_id(EPOCH1, ALICE.public),
           mailbox_id(EPOCH2, BOB.public)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    assert bytes(BOB.public) not in b"".join(ids)


def test_seal_and_open() -> None:
    payload = {"t": "log.entries", "entries": [b"\x00" * 10], "text": "hello"}
    envelope = seal(1, payload)
    assert b"hello" not in envelope
    letter = open_for_bob(envelope)
    assert (letter.sender, letter.seq, letter.epoch, letter.payload) == (
        bytes(ALICE.public), 1, 1, payload)
    later = seal(2, keys=EPOCH2)
    assert open_for_bob(later, EPOCH2).epoch == 2


def test_every_single_bit_flip_is_detected() -> None:
    envelope = seal(1, {"t": "x"})
    for index in range(len(envelope)):
        tampered = bytearray(envelope)
        tampered[index] ^= 0x01
        with pytest.raises(EnvelopeRejected) as rejected:
            open_for_bob(bytes(tampered))
        assert rejected.value.reason in ("bad-mac", "malformed", "unknown-epoch")


def test_an_envelope_moved_to_another_mailbox_does_not_open() -> None:
    envelope = seal(1, to=ALICE)  # relay puts alice's envelope into bob's mailbox
    with pytest.raises(EnvelopeRejected, match="bad-mac"):
        open_for_bob(envelope)


def test_unknown_epoch_truncated_and_foreign_sender_are_rejected() -> None:
    with pytest.raises(EnvelopeRejected, match="unknown-epoch"):
        open_envelope(seal(1), mailbox=mailbox_id(EPOCH1, BOB.public),
                      keys_for_epoch=lambda n: None, is_sender_allowed=is_member)
    with pytest.raises(EnvelopeRejected, match="malformed"):
        open_for_bob(seal(1)[:20])
    # A removed member still knows the old epoch key: its envelope is refused by sender.
    with pytest.raises(EnvelopeRejected, match="unknown-sender"):
        open_for_bob(seal(1, signer=MALLORY))


def test_a_forged_signature_is_rejected() -> None:
    # Mallory knows the epoch key (e.g. removed later) and claims to be alice.
    from meshd.protocol import envelope as module

    mailbox = mailbox_id(EPOCH1, BOB.public)
    body = module._pack({"t": "x"})
    signature = MALLORY.sign(module._envelope_signed_bytes(mailbox, 1, 1, body))
    plaintext = module._pack([bytes(ALICE.public), 1, body, signature])
    forged = module._seal(EPOCH1.mailbox, 1, module._envelope_ad(mailbox, 1), plaintext, RNG)
    with pytest.raises(EnvelopeRejected, match="bad-signature"):
        open_for_bob(forged)


def test_sequence_tracker_reports_order_gaps_and_replays() -> None:
    tracker = SequenceTracker()
    alice = bytes(ALICE.public)
    assert tracker.accept(alice, 1) is Arrival.IN_ORDER
    assert tracker.accept(alice, 2) is Arrival.IN_ORDER
    with pytest.raises(EnvelopeReplayed):
        tracker.accept(alice, 2)
    assert tracker.accept(alice, 5) is Arrival.AHEAD  # 3 and 4 are missing (dropped or late)
    assert tracker.missing(alice) == [(3, 4)]
    assert tracker.accept(alice, 4) is Arrival.LATE  # arrived after 5: reordered
    with pytest.raises(EnvelopeReplayed):
        tracker.accept(alice, 5)
    assert tracker.missing(alice) == [(3, 3)]
    assert tracker.accept(alice, 3) is Arrival.LATE
    assert tracker.missing(alice) == [] and tracker.delivered_through(alice) == 5
    restored = SequenceTracker(tracker.state())
    with pytest.raises(EnvelopeReplayed):
        restored.accept(alice, 5)
    assert restored.accept(alice, 6) is Arrival.IN_ORDER
    assert restored.accept(bytes(BOB.public), 1) is Arrival.IN_ORDER  # per sender


def test_a_hole_healed_another_way_is_no_longer_missing() -> None:
    tracker = SequenceTracker()
    alice = bytes(ALICE.public)
    tracker.accept(alice, 1)
    tracker.accept(alice, 3)  # 2 dropped
    tracker.accept(alice, 6)  # 4 and 5 still to come
    tracker.healed(alice, 3)  # what 2 held arrived again (in 3): only 2 is given up
    assert tracker.missing(alice) == [(4, 5)] and tracker.delivered_through(alice) == 3
    with pytest.raises(EnvelopeReplayed):
        tracker.accept(alice, 2)  # if it comes after all: what it holds is here already
    tracker.healed(alice, 6)
    assert tracker.missing(alice) == [] and tracker.delivered_through(alice) == 6
    assert SequenceTracker(tracker.state()).missing(alice) == []
    assert tracker.accept(alice, 7) is Arrival.IN_ORDER
    tracker.healed(bytes(BOB.public), 9)  # nothing of bob's: nothing changes
    assert tracker.accept(bytes(BOB.public), 1) is Arrival.IN_ORDER


def test_sequence_tracker_state_is_bounded() -> None:
    tracker = SequenceTracker()
    for seq in range(2, MAX_AHEAD_PER_SENDER + 3):
        tracker.accept(b"s", seq)
    assert tracker.lost == {b"s": 1}
    assert tracker.delivered_through(b"s") == MAX_AHEAD_PER_SENDER + 2


@given(st.permutations(list(range(1, 12))), st.sets(st.integers(1, 11)))
def test_any_delivery_order_delivers_each_once_and_reports_holes(
    order: list[int], dropped: set[int]
) -> None:
    tracker = SequenceTracker()
    delivered = [seq for seq in order if seq not in dropped]
    for seq in delivered:
        tracker.accept(b"s", seq)
        with pytest.raises(EnvelopeReplayed):
            tracker.accept(b"s", seq)
    top = max(delivered, default=0)
    holes = {seq for start, end in tracker.missing(b"s") for seq in range(start, end + 1)}
    assert holes == {seq for seq in dropped if seq < top}


def test_backups_open_only_with_matching_version_and_reject_rollback() -> None:
    snapshot = {"records": [b"r1"], "entries": [b"e1"], "note": "secret words"}
    blob = seal_backup(keys=EPOCH2, circle_id=CIRCLE, signer=ALICE, version=7, snapshot=snapshot,
                       rng=RNG)
    assert b"secret words" not in blob
    backup = open_backup(blob, circle_id=CIRCLE, version=7, keys_for_epoch=KEYS.get,
                         is_signer_allowed=is_member)
    assert (backup.version, backup.epoch, backup.snapshot) == (7, 2, snapshot)
    # The relay claims the blob is a newer version than it is.
    with pytest.raises(EnvelopeRejected, match="version-mismatch"):
        open_backup(blob, circle_id=CIRCLE, version=8, keys_for_epoch=KEYS.get,
                    is_signer_allowed=is_member)
    with pytest.raises(EnvelopeRejected, match="bad-mac"):
        open_backup(blob, circle_id=bytes(32), version=7, keys_for_epoch=KEYS.get,
                    is_signer_allowed=is_member)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(EnvelopeRejected, match="bad-mac"):
        open_backup(tampered, circle_id=CIRCLE, version=7, keys_for_epoch=KEYS.get,
                    is_signer_allowed=is_member)
    guard = RollbackGuard()
    guard.check(7)
    guard.check(7)  # the same version again (another relay) is fine
    with pytest.raises(RollbackDetected) as rolled_back:
        guard.check(6)
    assert (rolled_back.value.version, rolled_back.value.highest_seen) == (6, 7)
