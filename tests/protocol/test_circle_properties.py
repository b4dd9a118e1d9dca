"""Property tests of the merge rule: replicas change the circle while partitioned, then merge.

Three replicas (each a device of the circle) and a pool of extra devices (whose keys the
replica that added them may use) add, remove, rotate and gossip in random patterns. Then
every merge order must give the same CircleState, no record by a non-member is accepted, a
removed key never comes back, and no removed device can open the current epoch.
"""

from __future__ import annotations

import random

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from meshd.protocol.circle import Circle
from meshd.protocol.mergerule import evaluate
from meshd.protocol.records import CircleOperationError, Record, RecordRejected

from .test_circle import Device, epoch_body, forge, make_device

_rng = random.Random(2024).randbytes
REPLICAS = [make_device(f"replica-{i}", _rng) for i in range(3)]
EXTRAS = [make_device(f"extra-{i}", _rng) for i in range(5)]
OUTSIDER = make_device("outsider", _rng)
EVERYONE = REPLICAS + EXTRAS

replica = st.integers(0, len(REPLICAS) - 1)
extra = st.integers(0, len(EXTRAS) - 1)
pick = st.integers(0, 50)
operation = st.one_of(
    st.tuples(st.just("add"), replica, extra),
    st.tuples(st.just("remove"), replica, pick),
    st.tuples(st.just("rotate"), replica),
    st.tuples(st.just("sync"), replica, replica),
    st.tuples(st.just("as-extra"), replica, extra, st.sampled_from(["add", "remove", "rotate"]), pick),
    st.tuples(st.just("forge"), replica),
)
operations = st.lists(operation, max_size=30)


def founded(rng) -> list[Circle]:
    founder = REPLICAS[0]
    circle = Circle.create(founder.signer, founder.info, rng)
    for device in REPLICAS[1:]:
        circle.add_device(founder.signer, device.info, rng)
    return [Circle.from_records(circle.records()) for _ in REPLICAS]


def act(circle: Circle, actor: Device, action: str, choice: int, rng) -> None:
    """One local operation by actor; refused exactly when the rules say it must be."""
    state = circle.state
    if not state.is_member(actor.key):
        try:
            circle.rotate_epoch(actor.signer, rng)
        except CircleOperationError:
            return
        raise AssertionError("a non-member rotated the epoch")
    if action == "add":
        device = EXTRAS[choice % len(EXTRAS)]
        if device.key in state.removed:
            try:
                circle.add_device(actor.signer, device.info, rng)
            except CircleOperationError:
                return
            raise AssertionError("a removed key was added again")
        if not state.is_member(device.key):
            circle.add_device(actor.signer, device.info, rng)
    elif action == "remove":
        members = sorted(state.members)
        target = members[choice % len(members)]
        devices_left = [k for k, info in state.members.items() if not info.recovery and k != target]
        if devices_left:
            circle.remove_device(actor.signer, target, rng)
        else:
            try:
                circle.remove_device(actor.signer, target, rng)
            except CircleOperationError:
                return
            raise AssertionError("the last device was removed")
    else:
        circle.rotate_epoch(actor.signer, rng)


def forge_by(circle: Circle, device: Device) -> bytes:
    """A well-formed epoch record by device, built on every record the circle holds."""
    members = [info.dh_key for info in circle.state.members.values()]
    number = max(Record.decode(d).epoch or 0 for d in circle.records()) + 1
    return forge(device.signer, circle, "epoch", epoch_body(circle, members, number))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=operations, shuffler=st.randoms(use_true_random=False))
def test_partitioned_replicas_converge(ops, shuffler: random.Random) -> None:
    rng = random.Random(shuffler.random()).randbytes
    replicas = founded(rng)
    history: list[tuple[frozenset[bytes], dict[bytes, list[bytes]]]] = []
    for op in ops:
        kind, who = op[0], op[1]
        circle = replicas[who]
        if kind == "sync":
            circle.merge(replicas[op[2]].records())
        elif kind == "forge":
            data = forge_by(circle, REPLICAS[who])
            if circle.state.is_member(REPLICAS[who].key):
                circle.merge([data])
            else:
                try:
                    circle.merge([data])
                except RecordRejected as err:
                    assert err.reason in ("removed-key", "not-a-member")
                else:
                    raise AssertionError("a record by a non-member was accepted")
        elif kind == "as-extra":
            device = EXTRAS[op[2]]
            if circle.state.is_member(device.key):
                act(circle, device, op[3], op[4], rng)
        else:
            act(circle, REPLICAS[who], kind, op[2] if len(op) > 2 else 0, rng)
        history.append(removals(circle))

    union = {Record.decode(d).hash: d for c in replicas for d in c.records()}
    orders = [list(union.values()) for _ in range(2)]
    for order in orders:
        shuffler.shuffle(order)
    final = Circle.from_records(orders[0])
    state = final.state
    assert Circle.from_records(orders[1]).state == state
    assert_linear_membership_is_the_full_rule(final)

    # Gossip in a random order: every replica ends in the same state.
    for i in shuffler.sample(range(len(replicas)), len(replicas)):
        for j in shuffler.sample(range(len(replicas)), len(replicas)):
            replicas[i].merge(replicas[j].records())
    for i in range(len(replicas)):
        replicas[i].merge(replicas[(i + 1) % len(replicas)].records())
        replicas[i].merge(replicas[(i + 2) % len(replicas)].records())
        assert replicas[i].state == state

    # Random chunks, retrying those that arrive before their parents.
    chunks = [orders[1][k : k + 3] for k in range(0, len(orders[1]), 3)]
    chunked = Circle.from_records([d for d in orders[1] if Record.decode(d).kind == "genesis"])
    while chunks:
        waiting = []
        for chunk in chunks:
            try:
                chunked.merge(chunk)
            except RecordRejected as err:
                assert err.reason == "unknown-parents"
                waiting.append(chunk)
        if len(waiting) == len(chunks):
            chunked.merge([d for chunk in waiting for d in chunk])
            waiting = []
        chunks = waiting
    assert chunked.state == state

    # A removed key never comes back; a removal is undone only when its remover lost its
    # own standing (removed, or introduced by a record that does not count).
    assert not state.removed & state.members.keys()
    for removed_then, removers in history:
        for key in removed_then - state.removed:
            for remover, remove in removers[key]:
                assert (remover not in state.members or remover in state.removed
                        or not _introduced_before(final, remover, remove))

    # No record by a non-member is accepted; no removed key is added back.
    for device in [OUTSIDER] + [d for d in EVERYONE if not state.is_member(d.key)]:
        try:
            Circle.from_records(final.records()).merge([forge_by(final, device)])
        except RecordRejected as err:
            assert err.reason in ("removed-key", "not-a-member")
        else:
            raise AssertionError("a record by a non-member was accepted")
    adder = next((d for d in EVERYONE if state.is_member(d.key)), None)
    for device in EVERYONE:
        if device.key in state.removed and adder is not None:
            data = forge(adder.signer, final, "add", {"device": device.info.proof})
            try:
                Circle.from_records(final.records()).merge([data])
            except RecordRejected as err:
                assert err.reason == "removed-key"
            else:
                raise AssertionError("a removed key was added again")

    # The current epoch is sealed to current members only, and reaches them all unless a
    # rotation is due; a rotation by any member then clears it.
    for device in EVERYONE:
        if not state.is_member(device.key):
            assert state.epoch_record is None or device.info.dh_key not in final.record(
                state.epoch_record
            ).boxes
    if adder is not None:
        if state.needs_rotation:
            final.rotate_epoch(adder.signer, rng)
        keys = {final.epoch_key(d.dh) for d in EVERYONE if final.state.is_member(d.key)}
        assert len(keys) == 1 and not final.state.needs_rotation


def assert_linear_membership_is_the_full_rule(circle: Circle) -> None:
    """Every membership the linear path remembered (membership.py) is what the full merge
    rule says about the same set of records."""
    assert circle._after  # noqa: SLF001 - the cache under test
    for record_hash, after in circle._after.items():  # noqa: SLF001
        index = circle._index[record_hash]  # noqa: SLF001
        full = evaluate(circle._records, circle._ancestors, circle._ancestors[index] | 1 << index)  # noqa: SLF001
        assert (dict(after.members), after.removed, after.removed_dh, after.max_epoch) == (
            full.members, full.removed, full.removed_dh, full.max_epoch)
        assert {dh: k for dh, k in after.known_dh.items()} == dict(full.known_dh)


def removals(circle: Circle) -> tuple[frozenset[bytes], dict[bytes, list[tuple[bytes, bytes]]]]:
    """The replica's removed keys, each with (author, hash) of the removes that count for it."""
    removers: dict[bytes, list[tuple[bytes, bytes]]] = {key: [] for key in circle.state.removed}
    for data in circle.records():
        record = Record.decode(data)
        if record.target in removers and circle.is_effective(record.hash):
            removers[record.target].append((record.author, record.hash))
    return circle.state.removed, removers


def _introduced_before(circle: Circle, author: bytes, record_hash: bytes) -> bool:
    """Whether a counting record introducing author is among the record's ancestors: a
    device added twice concurrently may keep its membership through the other add while the
    records it built on the add that lost do not count (protocol/circle.md, "Introduction")."""
    seen, stack = set(), list(circle.record(record_hash).parents)
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        record = circle.record(current)
        if record.device is not None and record.device.sign_key == author and circle.is_effective(current):
            return True
        stack.extend(record.parents)
    return False


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), flips=st.lists(st.integers(0, 10_000), max_size=4))
def test_hostile_bytes_only_raise_record_rejected(data: bytes, flips: list[int]) -> None:
    circle = founded(random.Random(1).randbytes)[0]
    valid = bytearray(circle.records()[-1])
    for flip in flips:
        valid[flip % len(valid)] ^= 1 << (flip % 8)
    for candidate in (data, bytes(valid)):
        try:
            circle.merge([candidate])
        except RecordRejected as err:
            assert err.reason
