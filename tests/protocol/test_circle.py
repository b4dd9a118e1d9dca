"""The circle's records, validity rules, merge rule and epochs (protocol/circle.md)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import pytest

from meshd.protocol.circle import Circle, epoch_keys
from meshd.protocol.crypto import (
    DHKeyPair,
    SigningKeyPair,
    blake2b_256,
    derive_key,
    seal,
    signature_is_valid,
)
from meshd.protocol.records import (
    EPOCH_LABELS,
    RECORD_DOMAIN,
    CircleOperationError,
    DeviceInfo,
    Record,
    RecordRejected,
)
from meshd.protocol.recovery import recovery_member
from meshd.protocol.removal import may_author

# The worked example of protocol/circle.md: founder "laptop" with Ed25519 seed 32 x 0x01,
# X25519 private key 32 x 0x02 and genesis nonce 16 x 0x03. Ed25519 signatures are
# deterministic, so its genesis record is the same bytes everywhere.
EXAMPLE_GENESIS_HASH = "e6290e650f80ebae964ffd7292ec319e23d41695e27f8a31af2bdbbec9467a93"


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


@dataclass
class Device:
    signer: SigningKeyPair
    dh: DHKeyPair
    info: DeviceInfo

    @property
    def key(self) -> bytes:
        return bytes(self.signer.public)


def make_device(name: str, rng: Callable[[int], bytes]) -> Device:
    signer = SigningKeyPair(rng(32))
    dh = DHKeyPair.generate(rng)
    return Device(signer, dh, DeviceInfo(signer.public, dh.public, name).claimed(signer))


def forge(signer: SigningKeyPair, circle: Circle, kind: str, body: dict, parents=None) -> bytes:
    """A correctly signed record that bypasses the local checks of Circle's operations."""
    heads = circle.heads if parents is None else parents
    return Record.sign(signer, circle.circle_id, kind, heads, body).encode()


def epoch_body(circle: Circle, recipients: list[bytes], number: int | None = None) -> dict:
    number = circle.state.epoch_number + 1 if number is None else number
    key = bytes(32)
    return {"boxes": [[dh, seal(dh, key)] for dh in sorted(recipients)], "epoch": number}


def fork(circle: Circle) -> Circle:
    return Circle.from_records(circle.records())


@pytest.fixture
def rng() -> Callable[[int], bytes]:
    return seeded_rng(7)


# ---- Records and claims ---------------------------------------------------------------


def test_the_worked_example_genesis_is_stable() -> None:
    laptop = SigningKeyPair(b"\x01" * 32)
    dh = DHKeyPair.from_private_bytes(b"\x02" * 32)
    info = DeviceInfo(laptop.public, dh.public, "laptop")
    body = {"device": info.claim(laptop), "nonce": b"\x03" * 16}
    genesis = Record.sign(laptop, b"", "genesis", (), body)
    assert Circle.create(laptop, info, lambda n: b"\x03" * n).circle_id == genesis.hash
    unsigned, signature = msgpack.unpackb(genesis.encode(), raw=False)
    assert unsigned[:5] == [1, b"", "genesis", [], bytes(laptop.public)]
    assert genesis.hash == blake2b_256(genesis.encode())
    assert genesis.hash.hex() == EXAMPLE_GENESIS_HASH


def test_create_makes_a_genesis_and_epoch_one(rng) -> None:
    laptop = make_device("laptop", rng)
    circle = Circle.create(laptop.signer, laptop.info, rng)
    genesis, epoch = (Record.decode(r) for r in circle.records())
    assert circle.circle_id == genesis.hash and genesis.circle_id == b""
    assert epoch.kind == "epoch" and epoch.parents == (genesis.hash,)
    assert epoch.circle_id == circle.circle_id
    state = circle.state
    assert dict(state.members) == {laptop.key: laptop.info}
    assert (state.epoch_number, state.needs_rotation, state.removed) == (1, False, frozenset())
    assert state.heads == circle.heads == (epoch.hash,) and state.epoch_record == epoch.hash
    assert len(circle.epoch_key(laptop.dh)) == 32
    assert circle.readable_epochs(laptop.dh) == {1: circle.epoch_key(laptop.dh)}


def test_records_round_trip_and_sign_over_the_domain(trio_of) -> None:
    circle, laptop, *_ = trio_of
    for data in circle.records():
        record = Record.decode(data)
        assert record.encode() == data and record.hash == blake2b_256(data)
        unsigned, signature = msgpack.unpackb(data, raw=False)
        message = RECORD_DOMAIN + msgpack.packb(unsigned, use_bin_type=True)
        assert signature_is_valid(record.author, message, signature)
        assert not signature_is_valid(record.author, message[len(RECORD_DOMAIN):], signature)


def test_a_claim_round_trips_and_a_forged_one_is_refused(rng) -> None:
    laptop, other = make_device("laptop", rng), make_device("x", rng)
    assert DeviceInfo.verify_claim(laptop.info.claim(laptop.signer)) == laptop.info
    with pytest.raises(CircleOperationError):
        laptop.info.claim(other.signer)
    (fields, signature) = msgpack.unpackb(laptop.info.proof, raw=False)
    fields[3] = "evil"
    with pytest.raises(RecordRejected) as caught:
        DeviceInfo.verify_claim(msgpack.packb([fields, signature], use_bin_type=True))
    assert caught.value.reason == "bad-signature"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda u: u.__setitem__(0, 2),  # version
        lambda u: u.__setitem__(0, True),  # a bool is not the int 1
        lambda u: u.__setitem__(2, "promote"),  # kind
        lambda u: u.__setitem__(3, list(reversed(u[3])) + [b"\0" * 32]),  # unsorted parents
        lambda u: u.__setitem__(3, []),  # no parents
        lambda u: u.__setitem__(1, b"short"),  # circle id
        lambda u: u.__setitem__(5, {"epoch": 9, "boxes": []}),  # unsorted body keys
        lambda u: u.__setitem__(5, []),  # body not a map
    ],
)
def test_malformed_records_are_rejected_even_when_signed(trio_of, mutate) -> None:
    circle, laptop, *_ = trio_of
    unsigned, _ = msgpack.unpackb(circle.records()[-1], raw=False)
    mutate(unsigned)
    signature = laptop.signer.sign(RECORD_DOMAIN + msgpack.packb(unsigned, use_bin_type=True))
    data = msgpack.packb([unsigned, signature], use_bin_type=True)
    with pytest.raises(RecordRejected) as caught:
        circle.merge([data])
    assert caught.value.reason == "malformed"


def test_a_non_canonical_encoding_is_malformed(trio_of) -> None:
    circle, *_ = trio_of
    data = circle.records()[-1]
    assert data[:2] == b"\x92\x96"  # fixarray(2), fixarray(6)
    wide = b"\xdc\x00\x02" + data[1:]  # the same array with a 16-bit length
    assert msgpack.unpackb(wide, raw=False) == msgpack.unpackb(data, raw=False)
    with pytest.raises(RecordRejected) as caught:
        Record.decode(wide)
    assert caught.value.reason == "malformed"


def test_an_altered_record_fails_its_signature(trio_of) -> None:
    circle, *_ = trio_of
    data = bytearray(circle.records()[-1])
    data[-1] ^= 1  # inside the signature
    with pytest.raises(RecordRejected) as caught:
        fork(circle).merge([bytes(data)])
    assert caught.value.reason == "bad-signature"
    unsigned, signature = msgpack.unpackb(circle.records()[-1], raw=False)
    unsigned[5]["epoch"] += 1
    with pytest.raises(RecordRejected) as caught:
        Record.decode(msgpack.packb([unsigned, signature], use_bin_type=True))
    assert caught.value.reason == "bad-signature"


# ---- Validity -------------------------------------------------------------------------


def test_records_from_another_circle_are_rejected(trio_of, rng) -> None:
    circle, laptop, *_ = trio_of
    other = Circle.create(laptop.signer, laptop.info, seeded_rng(99))
    other.rotate_epoch(laptop.signer, rng)
    with pytest.raises(RecordRejected) as caught:
        circle.merge(other.records()[-1:])
    assert caught.value.reason == "wrong-circle"
    with pytest.raises(RecordRejected) as caught:
        Circle.from_records(circle.records() + other.records())
    assert caught.value.reason == "wrong-circle"
    with pytest.raises(RecordRejected) as caught:
        Circle.from_records(circle.records()[1:])
    assert caught.value.reason == "no-genesis"


def test_a_batch_may_arrive_in_any_order_but_parents_must_exist(trio_of, rng) -> None:
    circle, laptop, desktop, _ = trio_of
    base = fork(circle)
    new = circle.rotate_epoch(laptop.signer, rng) + circle.rotate_epoch(desktop.signer, rng)
    with pytest.raises(RecordRejected) as caught:
        base.merge(new[1:])
    assert caught.value.reason == "unknown-parents"
    assert base.merge(reversed(new)) == [Record.decode(d).hash for d in new]
    assert base.state == circle.state
    assert base.merge(new) == []  # duplicates are ignored


def test_a_batch_is_all_or_nothing(trio_of, rng) -> None:
    circle, laptop, *_ = trio_of
    base = fork(circle)
    good = circle.rotate_epoch(laptop.signer, rng)
    outsider = make_device("outsider", rng)
    bad = forge(outsider.signer, circle, "epoch", epoch_body(circle, []))
    with pytest.raises(RecordRejected) as caught:
        base.merge(good + [bad])
    assert caught.value.reason == "not-a-member"
    assert not base.has(Record.decode(good[0]).hash)
    assert base.merge(good) and base.state == circle.state


def test_a_removed_device_cannot_author_once_its_removal_is_in_its_past(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    circle.remove_device(laptop.signer, phone.key, rng)
    with pytest.raises(CircleOperationError):
        circle.rotate_epoch(phone.signer, rng)
    members = [laptop.info.dh_key, desktop.info.dh_key]
    data = forge(phone.signer, circle, "epoch", epoch_body(circle, members))
    with pytest.raises(RecordRejected) as caught:
        fork(circle).merge([data])
    assert caught.value.reason == "removed-key"


def test_entries_are_accepted_from_members_and_removed_members_only(trio_of, rng) -> None:
    """protocol/logs.md: unknown-author for a key the circle never admitted; a removed
    member's entries stay valid (its history)."""
    circle, laptop, desktop, phone = trio_of
    stranger = make_device("stranger", rng)
    circle.remove_device(laptop.signer, phone.key, rng)
    assert may_author(circle, laptop.key) and may_author(circle, desktop.key)
    assert may_author(circle, phone.key)
    assert not may_author(circle, stranger.key)


def test_a_removed_key_is_never_added_again(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    circle.remove_device(laptop.signer, phone.key, rng)
    with pytest.raises(CircleOperationError):
        circle.add_device(laptop.signer, phone.info, rng)
    with pytest.raises(RecordRejected) as caught:
        fork(circle).merge([forge(laptop.signer, circle, "add", {"device": phone.info.proof})])
    assert caught.value.reason == "removed-key"
    # Nor its X25519 key under a fresh identity.
    fresh = SigningKeyPair(rng(32))
    reuse = DeviceInfo(fresh.public, phone.dh.public, "phone again").claimed(fresh)
    with pytest.raises(RecordRejected) as caught:
        fork(circle).merge([forge(laptop.signer, circle, "add", {"device": reuse.proof})])
    assert caught.value.reason == "removed-key"


def test_duplicate_devices_and_bad_epochs_are_rejected(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    with pytest.raises(CircleOperationError):
        circle.add_device(laptop.signer, phone.info, rng)
    with pytest.raises(RecordRejected) as caught:
        fork(circle).merge([forge(laptop.signer, circle, "add", {"device": phone.info.proof})])
    assert caught.value.reason == "duplicate-device"
    everyone = [d.info.dh_key for d in (laptop, desktop, phone)]
    stale = forge(laptop.signer, circle, "epoch", epoch_body(circle, everyone, number=1))
    with pytest.raises(RecordRejected) as caught:
        fork(circle).merge([stale])
    assert caught.value.reason == "stale-epoch"
    partial = forge(laptop.signer, circle, "epoch", epoch_body(circle, everyone[:2]))
    with pytest.raises(RecordRejected) as caught:
        fork(circle).merge([partial])
    assert caught.value.reason == "bad-boxes"
    outsider = make_device("outsider", rng)
    leak = forge(laptop.signer, circle, "epoch", epoch_body(circle, everyone + [outsider.info.dh_key]))
    with pytest.raises(RecordRejected) as caught:
        fork(circle).merge([leak])
    assert caught.value.reason == "bad-boxes"


def test_adding_needs_the_devices_own_claim(trio_of, rng) -> None:
    circle, laptop, *_ = trio_of
    tablet = make_device("tablet", rng)
    with pytest.raises(CircleOperationError, match="claim"):
        circle.add_device(laptop.signer, DeviceInfo(tablet.key, tablet.dh.public, "tablet"), rng)
    impostor = DeviceInfo(tablet.key, laptop.dh.public, "tablet", proof=tablet.info.proof)
    with pytest.raises(CircleOperationError, match="another device"):
        circle.add_device(laptop.signer, impostor, rng)
    claim = tablet.info.claim(tablet.signer)
    circle.add_device(laptop.signer, DeviceInfo.verify_claim(claim), rng)
    assert circle.state.is_member(tablet.key)
    assert circle.state.member_by_dh(tablet.dh.public) == tablet.info


# ---- Removal and epochs ---------------------------------------------------------------


def test_remove_starts_an_epoch_the_removed_device_cannot_read(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    before = circle.epoch_key(phone.dh)
    (data,) = circle.remove_device(desktop.signer, phone.key, rng)
    record = Record.decode(data)
    assert record.kind == "remove" and record.target == phone.key
    assert set(record.boxes) == {laptop.info.dh_key, desktop.info.dh_key}
    state = circle.state
    assert state.removed == {phone.key} and not state.is_member(phone.key)
    assert state.member_by_dh(phone.dh.public) is None
    assert state.epoch_record == record.hash and not state.needs_rotation
    with pytest.raises(CircleOperationError):
        circle.epoch_key(phone.dh)
    assert circle.epoch_key(laptop.dh) == circle.epoch_key(desktop.dh) != before
    assert circle.readable_epochs(phone.dh)[state.epoch_number - 1] == before
    assert state.epoch_number not in circle.readable_epochs(phone.dh)


def test_the_last_device_is_never_removed(rng) -> None:
    laptop, desktop = make_device("laptop", rng), make_device("desktop", rng)
    circle = Circle.create(laptop.signer, laptop.info, rng)
    _, _, recovery = recovery_member(rng(32))
    circle.enrol_recovery(laptop.signer, recovery, rng)
    with pytest.raises(CircleOperationError, match="last device"):
        circle.remove_device(laptop.signer, laptop.key, rng)
    circle.add_device(laptop.signer, desktop.info, rng)
    circle.remove_device(desktop.signer, laptop.key, rng)
    with pytest.raises(CircleOperationError, match="last device"):
        circle.remove_device(desktop.signer, desktop.key, rng)
    circle.remove_device(desktop.signer, recovery.sign_key, rng)  # a recovery key may go
    assert [d.name for d in circle.state.devices()] == ["desktop"]


def test_epoch_keys_are_distinct_labelled_derivations() -> None:
    key = bytes(range(32))
    keys = epoch_keys(7, key)
    context = (7).to_bytes(8, "big")
    assert keys.number == 7
    assert keys.mailbox == derive_key(key, b"mailbox", context)
    assert keys.backup == derive_key(key, b"backup", context)
    assert keys.discovery == derive_key(key, b"discovery", context)
    assert keys.mailbox_id_key == derive_key(key, b"mailbox-id", context)
    assert keys.device_psk == derive_key(key, b"device-psk", context)
    assert len({keys.mailbox, keys.backup, keys.discovery, keys.mailbox_id_key, keys.device_psk}) == 5
    assert epoch_keys(8, key).mailbox != keys.mailbox
    assert set(EPOCH_LABELS) == {"mailbox", "backup", "discovery", "mailbox_id_key", "device_psk"}
    assert key.hex() not in repr(keys) and keys.mailbox.hex() not in repr(keys)


def test_concurrent_epochs_pick_the_highest_number_then_hash(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    left, right = fork(circle), fork(circle)
    a = Record.decode(left.rotate_epoch(laptop.signer, rng)[0])
    b = Record.decode(right.rotate_epoch(desktop.signer, rng)[0])
    assert a.epoch == b.epoch
    left.merge(right.records())
    right.merge(left.records())
    winner = max(a, b, key=lambda r: r.hash)
    assert left.state == right.state and left.state.epoch_record == winner.hash
    assert left.epoch_key(phone.dh) == right.epoch_key(phone.dh)
    higher = Record.decode(left.rotate_epoch(phone.signer, rng)[0])
    assert higher.epoch == a.epoch + 1 and left.state.epoch_record == higher.hash


def test_a_concurrent_add_and_rotation_ask_for_a_rotation(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    left, right = fork(circle), fork(circle)
    tablet = make_device("tablet", rng)
    left.add_device(laptop.signer, tablet.info, rng)
    right.rotate_epoch(desktop.signer, rng)
    right.rotate_epoch(desktop.signer, rng)  # a higher number than left's epoch
    left.merge(right.records())
    assert left.state.is_member(tablet.key) and left.state.needs_rotation
    with pytest.raises(CircleOperationError):
        left.epoch_key(tablet.dh)  # the chosen epoch predates the tablet
    left.rotate_epoch(tablet.signer, rng)
    assert not left.state.needs_rotation and len(left.epoch_key(tablet.dh)) == 32


# ---- The merge rule -------------------------------------------------------------------


def merged(*circles: Circle) -> Circle:
    union = [data for circle in circles for data in circle.records()]
    result = Circle.from_records(union)
    assert result.state == Circle.from_records(reversed(union)).state
    return result


def test_remove_wins_over_a_concurrent_add(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    left, right = fork(circle), fork(circle)
    tablet = make_device("tablet", rng)
    (removal,) = left.remove_device(laptop.signer, desktop.key, rng)
    right.add_device(phone.signer, tablet.info, rng)
    right.add_device(desktop.signer, make_device("watch", rng).info, rng)
    result = merged(left, right)
    state = result.state
    assert state.removed == {desktop.key} and state.is_member(tablet.key)
    assert {d.name for d in state.devices()} == {"laptop", "phone", "tablet"}  # not "watch"
    # right's epochs are sealed to the desktop: the removal's epoch is the only safe one,
    # and it lacks the tablet.
    assert state.epoch_record == Record.decode(removal).hash and state.needs_rotation
    result.rotate_epoch(tablet.signer, rng)
    assert not result.state.needs_rotation


def test_a_removed_device_cannot_backdate_records(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    honest, thief = fork(circle), fork(circle)
    honest.remove_device(laptop.signer, phone.key, rng)
    accomplice = make_device("accomplice", rng)
    thief.add_device(phone.signer, accomplice.info, rng)  # concurrent with its removal
    thief.remove_device(accomplice.signer, desktop.key, rng)  # authority from the phone
    thief.rotate_epoch(phone.signer, rng)
    result = merged(honest, thief)
    state = result.state
    assert state.removed == {phone.key}
    assert set(state.members) == {laptop.key, desktop.key}
    assert result.epoch_key(desktop.dh) == honest.epoch_key(desktop.dh)
    for data in thief.records()[len(circle.records()):]:
        assert not result.is_effective(Record.decode(data).hash)


def test_records_a_remover_saw_before_removing_still_count(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    tablet = make_device("tablet", rng)
    circle.add_device(phone.signer, tablet.info, rng)
    circle.remove_device(laptop.signer, phone.key, rng)
    assert circle.state.is_member(tablet.key) and not circle.state.is_member(phone.key)


def test_concurrent_mutual_removal_removes_both(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    left, right = fork(circle), fork(circle)
    left.remove_device(laptop.signer, desktop.key, rng)
    right.remove_device(desktop.signer, laptop.key, rng)
    state = merged(left, right).state
    assert state.removed == {laptop.key, desktop.key}
    assert set(state.members) == {phone.key}
    # Each removal's epoch is sealed to a device the other removed: neither may be used.
    assert state.epoch_record is None and state.needs_rotation and state.epoch_number == 0


def test_a_backdated_remove_by_a_removed_device_does_not_count(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    left, right = fork(circle), fork(circle)
    left.remove_device(laptop.signer, phone.key, rng)
    right.remove_device(phone.signer, desktop.key, rng)
    state = merged(left, right).state
    assert state.removed == {phone.key} and state.is_member(desktop.key)


def test_a_second_removal_of_the_thief_defeats_its_retaliation(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    a, b, thief = fork(circle), fork(circle), fork(circle)
    a.remove_device(laptop.signer, phone.key, rng)
    b.remove_device(desktop.signer, phone.key, rng)
    thief.remove_device(phone.signer, laptop.key, rng)
    state = merged(a, b, thief).state
    assert state.removed == {phone.key}
    assert set(state.members) == {laptop.key, desktop.key}


# ---- Recovery -------------------------------------------------------------------------


def test_recovery_member_enrols_and_recovers_a_fresh_device(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    seed = rng(32)
    signer, dh, info = recovery_member(seed)
    circle.enrol_recovery(laptop.signer, info, rng)
    assert circle.state.is_member(info.sign_key) and circle.state.recovery_members() == [info]
    assert len(circle.epoch_key(dh)) == 32
    assert info not in circle.state.devices()
    # Every device is lost: only the words and the records (from the relay) remain.
    stored = circle.records()
    fresh = make_device("new laptop", rng)
    restored = Circle.from_records(stored)
    again_signer, again_dh, _ = recovery_member(seed)
    new = restored.recover(again_signer, fresh.info, rng)
    kinds = [Record.decode(d).kind for d in new]
    assert kinds == ["add", "epoch"] and {Record.decode(d).author for d in new} == {info.sign_key}
    assert restored.state.is_member(fresh.key) and not restored.state.needs_rotation
    assert restored.epoch_key(fresh.dh) == restored.epoch_key(again_dh)
    assert restored.readable_epochs(again_dh)  # the history since enrolment is readable
    circle.merge(new)
    assert circle.state == restored.state


def test_recover_needs_an_enrolled_recovery_member(trio_of, rng) -> None:
    circle, laptop, *_ = trio_of
    signer, _, info = recovery_member(rng(32))
    with pytest.raises(CircleOperationError, match="not enrolled"):
        circle.recover(signer, make_device("x", rng).info, rng)
    with pytest.raises(CircleOperationError):
        circle.recover(laptop.signer, make_device("y", rng).info, rng)


def test_enrolling_a_new_recovery_key_replaces_the_old(trio_of, rng) -> None:
    circle, laptop, *_ = trio_of
    _, old_dh, old = recovery_member(rng(32))
    _, new_dh, new = recovery_member(rng(32))
    circle.enrol_recovery(laptop.signer, old, rng)
    records = circle.enrol_recovery(laptop.signer, new, rng)
    assert [Record.decode(d).kind for d in records] == ["recovery", "remove"]
    assert circle.state.recovery_members() == [new] and old.sign_key in circle.state.removed
    with pytest.raises(CircleOperationError):
        circle.epoch_key(old_dh)
    assert len(circle.epoch_key(new_dh)) == 32


def test_a_device_added_by_the_removed_one_cannot_veto_the_removal(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    honest, thief = fork(circle), fork(circle)
    honest.remove_device(laptop.signer, phone.key, rng)
    accomplice = make_device("accomplice", rng)
    thief.add_device(phone.signer, accomplice.info, rng)
    thief.remove_device(accomplice.signer, laptop.key, rng)  # the remover itself
    state = merged(honest, thief).state
    assert state.removed == {phone.key}
    assert set(state.members) == {laptop.key, desktop.key}


def test_a_lone_remover_can_be_taken_down_by_direct_retaliation(trio_of, rng) -> None:
    """The documented limit: concurrent mutual removal is symmetric, so both keys go."""
    circle, laptop, desktop, phone = trio_of
    honest, thief = fork(circle), fork(circle)
    honest.remove_device(laptop.signer, phone.key, rng)
    thief.remove_device(phone.signer, laptop.key, rng)
    thief.remove_device(phone.signer, desktop.key, rng)
    state = merged(honest, thief).state
    assert state.removed == {phone.key, laptop.key}
    assert set(state.members) == {desktop.key}


def test_a_cycle_of_concurrent_removes_removes_everyone_in_it(trio_of, rng) -> None:
    circle, laptop, desktop, phone = trio_of
    server = make_device("server", rng)
    circle.add_device(laptop.signer, server.info, rng)
    a, b, c = fork(circle), fork(circle), fork(circle)
    a.remove_device(laptop.signer, desktop.key, rng)
    b.remove_device(desktop.signer, phone.key, rng)
    c.remove_device(phone.signer, laptop.key, rng)
    state = merged(a, b, c).state
    assert state.removed == {laptop.key, desktop.key, phone.key}
    assert set(state.members) == {server.key}
