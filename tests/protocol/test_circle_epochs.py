"""Epochs are identified by the record that made them (protocol/circle.md, "Epochs").

A removal and a concurrent rotation by a cut-off device carry the same epoch number. Every
device must then agree on the current epoch record (the removal's), and everything that
names an epoch by number (envelopes, backups, mailboxes, adverts) must resolve that number
to that same record, never to the key the removed device holds.
"""

from __future__ import annotations

import random

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from meshd.protocol.circle import Circle, epoch_keys
from meshd.protocol.envelope import mailbox_id
from meshd.protocol.records import Record

from .test_circle import Device, fork, make_device

TRIALS = 20


def _trio(seed: int) -> tuple[Circle, Device, Device, Device]:
    rng = random.Random(seed).randbytes
    laptop, desktop, phone = (make_device(name, rng) for name in ("laptop", "desktop", "phone"))
    circle = Circle.create(laptop.signer, laptop.info, rng)
    circle.add_device(laptop.signer, desktop.info, rng)
    circle.add_device(laptop.signer, phone.info, rng)
    return circle, laptop, desktop, phone


def _race(seed: int) -> tuple[list[Circle], Record, Device, Device, Device]:
    """laptop removes phone while desktop, cut off, rotates; then they exchange records."""
    circle, laptop, desktop, phone = _trio(seed)
    rng = random.Random(seed + 1000).randbytes
    left, right = fork(circle), fork(circle)
    removal = Record.decode(left.remove_device(laptop.signer, phone.key, rng)[0])
    rotation = Record.decode(right.rotate_epoch(desktop.signer, rng)[0])
    assert removal.epoch == rotation.epoch
    right.merge(left.records())
    left.merge(right.records())
    return [left, right], removal, laptop, desktop, phone


def _resolves_the_right_key(seed: int) -> bool:
    replicas, removal, laptop, desktop, _ = _race(seed)
    for replica in replicas:
        state = replica.state
        if state.epoch_record != removal.hash or state.needs_rotation:
            return False
        for member in (laptop, desktop):
            # What a receiver resolves "epoch n" to is what a sender sealed under.
            if replica.readable_epochs(member.dh).get(state.epoch_number) != replica.epoch_key(member.dh):
                return False
            if replica.epoch_key(member.dh, state.epoch_number) != replica.epoch_key(member.dh):
                return False
    return True


def _uses_the_right_key(seed: int) -> bool:
    replicas, _, laptop, desktop, phone = _race(seed)
    for replica in replicas:
        phone_keys = {keys.discovery for _, keys in replica.readable_epoch_records(phone.dh)}
        for member in (laptop, desktop):
            current = replica.current_keys(member.dh)
            adverts = replica.recent_epochs(member.dh, 2)
            if not adverts or adverts[0] != current or adverts[0].discovery in phone_keys:
                return False
            # The mailbox a sender deposits to is one the recipient drains, first.
            drained = [mailbox_id(keys, member.key) for _, keys in replica.readable_epoch_records(member.dh)]
            if drained[0] != mailbox_id(current, member.key):
                return False
    return True


def test_a_removal_and_a_concurrent_rotation_resolve_to_the_removals_key() -> None:
    converged = sum(_resolves_the_right_key(seed) for seed in range(TRIALS))
    assert converged == TRIALS, f"{converged} of {TRIALS} trials converged on the right key"


def test_adverts_and_mailboxes_use_the_removals_key() -> None:
    converged = sum(_uses_the_right_key(seed) for seed in range(TRIALS))
    assert converged == TRIALS, f"{converged} of {TRIALS} trials used the right key"


def test_mail_sealed_under_the_losing_record_is_still_drained() -> None:
    circle, laptop, desktop, phone = _trio(3)
    rng = random.Random(3).randbytes
    left, right = fork(circle), fork(circle)
    left.remove_device(laptop.signer, phone.key, rng)
    right.rotate_epoch(desktop.signer, rng)
    sent_under = right.current_keys(laptop.dh)  # desktop deposits for laptop before it learns
    left.merge(right.records())
    drained = {mailbox_id(keys, laptop.key): keys for _, keys in left.readable_epoch_records(laptop.dh)}
    assert drained[mailbox_id(sent_under, laptop.key)] == sent_under
    assert left.current_keys(laptop.dh) != sent_under


replica = st.integers(0, 3)
operation = st.one_of(
    st.tuples(st.just("remove"), replica, st.integers(0, 9)),
    st.tuples(st.just("rotate"), replica),
    st.tuples(st.just("sync"), replica, replica),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operation, max_size=14), seed=st.integers(0, 2**32))
def test_concurrent_rotations_and_removals_converge_on_one_clean_epoch(ops, seed: int) -> None:
    rng = random.Random(seed).randbytes
    devices = [make_device(f"d{i}", rng) for i in range(4)]
    founder = devices[0]
    base = Circle.create(founder.signer, founder.info, rng)
    for device in devices[1:]:
        base.add_device(founder.signer, device.info, rng)
    replicas = [fork(base) for _ in devices]
    for op in ops:
        who = op[1]
        circle, actor = replicas[who], devices[who]
        if op[0] == "sync":
            circle.merge(replicas[op[2]].records())
            continue
        if not circle.state.is_member(actor.key):
            continue
        if op[0] == "rotate":
            circle.rotate_epoch(actor.signer, rng)
            continue
        members = sorted(k for k, info in circle.state.members.items() if not info.recovery)
        if len(members) > 1:
            circle.remove_device(actor.signer, members[op[2] % len(members)], rng)
    everything = [d for c in replicas for d in c.records()]
    for circle in replicas:
        circle.merge(everything)
    _check_one_clean_epoch(replicas, devices)
    state = replicas[0].state
    if state.needs_rotation:  # what a daemon does on seeing it: any member rotates
        rotator = next((d for d in devices if state.is_member(d.key)), None)
        if rotator is None:
            return  # concurrent removes left no device: what the recovery words are for
        replicas[0].rotate_epoch(rotator.signer, rng)
        for circle in replicas[1:]:
            circle.merge(replicas[0].records())
        assert not replicas[0].state.needs_rotation
        _check_one_clean_epoch(replicas, devices)


def _check_one_clean_epoch(replicas: list[Circle], devices: list[Device]) -> None:
    state = replicas[0].state
    removed_dh = {d.info.dh_key for d in devices if d.key in state.removed}
    for circle in replicas:
        assert circle.state == state
    if state.epoch_record is None:
        return
    current = replicas[0].record(state.epoch_record)
    assert not current.boxes.keys() & removed_dh, "a key sealed to a removed member is current"
    readers = [d for d in devices if state.is_member(d.key) and d.info.dh_key in current.boxes]
    for member in readers:
        keys = replicas[0].current_keys(member.dh)
        for circle in replicas:
            # Every device resolves every number to the same key, the current number to
            # the current record, and advertises under and drains first the current record.
            assert circle.readable_epochs(member.dh) == replicas[0].readable_epochs(member.dh)
            assert circle.readable_epochs(member.dh)[state.epoch_number] == circle.epoch_key(member.dh)
            assert circle.recent_epochs(member.dh, 2)[0] == keys
            assert circle.readable_epoch_records(member.dh)[0][1] == keys
        # A number resolves to a record sealed to a removed key only when no clean one exists.
        circle = replicas[0]
        readable = circle.readable_epoch_records(member.dh)
        for number, key in circle.readable_epochs(member.dh).items():
            same_number = [circle.record(h) for h, k in readable if k.number == number]
            chosen = next(circle.record(h) for h, k in readable if k == epoch_keys(number, key))
            if any(not r.boxes.keys() & removed_dh for r in same_number):
                assert not chosen.boxes.keys() & removed_dh
