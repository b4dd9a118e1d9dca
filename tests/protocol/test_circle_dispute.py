"""The recovery words settle a dispute with a thief (protocol/circle.md, "The merge rule").

A two-device circle whose devices remove each other ends with no device; the owner, who
holds the recovery words, signs a remove of the thief that outranks what the thief did, and
the circle ends with the owner's device.
"""

from __future__ import annotations

import random

import pytest

from meshd.protocol.circle import Circle
from meshd.protocol.records import CircleOperationError, Record
from meshd.protocol.recovery import recovery_member

from .test_circle import fork, make_device


def _owner_thief_and_words(seed: int = 1):  # noqa: ANN202
    rng = random.Random(seed).randbytes
    owner, thief = make_device("laptop", rng), make_device("stolen phone", rng)
    circle = Circle.create(owner.signer, owner.info, rng)
    circle.add_device(owner.signer, thief.info, rng)
    words_signer, words_dh, words_info = recovery_member(rng(32))
    circle.enrol_recovery(owner.signer, words_info, rng)
    return circle, owner, thief, words_signer, words_dh, rng


def _dispute(circle: Circle, owner, thief, rng, *, thief_also_removes_the_words: bool = False):  # noqa: ANN001, ANN202
    """The owner removes the thief while the thief, cut off, removes the owner (and maybe the words)."""
    owners, thiefs = fork(circle), fork(circle)
    owners.remove_device(owner.signer, thief.key, rng)
    if thief_also_removes_the_words:
        words = thiefs.state.recovery_members()[0].sign_key
        thiefs.remove_device(thief.signer, words, rng)
    thiefs.remove_device(thief.signer, owner.key, rng)
    owners.merge(thiefs.records())
    thiefs.merge(owners.records())
    return owners, thiefs


@pytest.mark.parametrize("removes_words", [False, True])
def test_the_words_settle_a_dispute_for_the_owner(removes_words: bool) -> None:
    circle, owner, thief, words_signer, words_dh, rng = _owner_thief_and_words()
    owners, thiefs = _dispute(circle, owner, thief, rng, thief_also_removes_the_words=removes_words)
    state = owners.state
    # Without the words: both removes stand, and the circle has no device left.
    assert state.devices() == [] and {owner.key, thief.key} <= state.removed
    owners.settle_with_recovery(words_signer, thief.key, rng)
    thiefs.merge(owners.records())
    for replica in (owners, thiefs, Circle.from_records(reversed(owners.records()))):
        assert [d.sign_key for d in replica.state.devices()] == [owner.key]
        assert thief.key in replica.state.removed and owner.key not in replica.state.removed
        assert replica.state.recovery_members(), "the words stay enrolled"
    # A new epoch for the owner, which the thief cannot open.
    if owners.state.needs_rotation:
        owners.rotate_epoch(owner.signer, rng)
    assert len(owners.epoch_key(owner.dh)) == 32
    with pytest.raises(CircleOperationError):
        owners.epoch_key(thief.dh)


def test_the_thief_cannot_undo_the_settlement_afterwards() -> None:
    circle, owner, thief, words_signer, _, rng = _owner_thief_and_words(2)
    owners, thiefs = _dispute(circle, owner, thief, rng)
    thiefs_view = fork(thiefs)
    owners.settle_with_recovery(words_signer, thief.key, rng)
    # The thief, not yet aware, tries again: it is no member anywhere, so nothing it signs counts.
    with pytest.raises(CircleOperationError):
        thiefs_view.remove_device(thief.signer, owner.key, rng)
    owners.merge(thiefs_view.records())
    assert [d.sign_key for d in owners.state.devices()] == [owner.key]


def test_only_the_recovery_member_settles() -> None:
    circle, owner, thief, words_signer, _, rng = _owner_thief_and_words(3)
    owners, _ = _dispute(circle, owner, thief, rng)
    with pytest.raises(CircleOperationError, match="recovery key"):
        owners.settle_with_recovery(owner.signer, thief.key, rng)
    with pytest.raises(CircleOperationError, match="before the dispute"):
        owners.settle_with_recovery(words_signer, words_signer.public, rng)


def test_a_settlement_builds_on_the_circle_before_the_dispute() -> None:
    circle, owner, thief, words_signer, _, rng = _owner_thief_and_words(4)
    before = set(circle.heads)
    owners, _ = _dispute(circle, owner, thief, rng)
    [encoded] = owners.settle_with_recovery(words_signer, thief.key, rng)
    record = Record.decode(encoded)
    assert set(record.parents) == before and record.target == thief.key
