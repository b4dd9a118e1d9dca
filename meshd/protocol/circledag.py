"""The circle's records as a DAG: validity, merging, and the state they imply.

Theory of operation. A circle is a set of records (genesis, add, remove, epoch, recovery),
each signed by its author and naming the hashes of the records it builds on. A record is
*valid* when its author was an active member in the state computed from its ancestors
alone; validity never changes once decided, because a record's ancestors are fixed by its
hash. Whether a valid record *counts* (is effective) is decided over the whole set by the
merge rule (mergerule.py), so that concurrent changes merge to the same state everywhere.

This module keeps the validated set: records in an order where parents come first, each
one's ancestors as a bitmask, the heads, and memoised views of ancestor sets (a chain of
records is checked in linear time with membership.py). The local operations that sign new
records are circle.py's; what an epoch number means is epochs.py's; one record on its own
is records.py's. The rules, and why they are order independent, are in protocol/circle.md.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from .crypto import SigningKeyPair
from .entry import Head
from .membership import Membership, extended
from .mergerule import View, evaluate
from .records import (
    GENESIS,
    MAX_CIRCLE_RECORDS,
    REMOVE,
    CircleOperationError,
    DeviceInfo,
    Record,
    RecordRejected,
)

# ---- Implementation constants -----------------------------------------------------------

# Views of ancestor sets kept while validating a batch; a chain of records reuses them.
_VIEW_MEMO_SIZE = 256
# Hashes of records already validated (by any Circle in this process). A record's hash fixes
# its content and, through its parents, its whole causal past, so its validity is a pure
# function of the hash: the relay, which rebuilds circles per registration, validates once.
_VALIDATED_MAX = 100_000
_validated: set[bytes] = set()


# ---- State ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CircleState:
    circle_id: bytes
    members: Mapping[bytes, DeviceInfo]  # sign_key -> info: devices and recovery members
    removed: frozenset[bytes]
    epoch_number: int  # 0 when no epoch qualifies (needs_rotation is then True)
    needs_rotation: bool
    heads: tuple[bytes, ...]
    epoch_record: bytes | None = None  # hash of the record that carries the current epoch
    # Removed key -> its removal point (cutoff.py): the smallest cutoff of the counting
    # removes of that key; a removed key without one here keeps all its entries.
    cutoffs: Mapping[bytes, Head] = field(default_factory=dict)

    def member_by_dh(self, dh_key: bytes) -> DeviceInfo | None:
        """The active member with that X25519 key (the lowest sign key if several claim it)."""
        found = [info for key, info in sorted(self.members.items()) if info.dh_key == dh_key]
        return found[0] if found else None

    def is_member(self, sign_key: bytes) -> bool:
        return bytes(sign_key) in self.members

    def devices(self) -> list[DeviceInfo]:
        """Non-recovery members, by name then key."""
        return sorted(
            (info for info in self.members.values() if not info.recovery),
            key=lambda info: (info.name, info.sign_key),
        )

    def recovery_members(self) -> list[DeviceInfo]:
        return sorted(
            (info for info in self.members.values() if info.recovery),
            key=lambda info: info.sign_key,
        )


# ---- The validated set ----------------------------------------------------------------


class CircleDag:
    """A validated set of records plus the derived state (circle.Circle adds operations)."""

    def __init__(self, genesis: Record) -> None:
        if genesis.kind != GENESIS:
            raise RecordRejected("no-genesis")
        self.circle_id = genesis.hash
        self._records: list[Record] = []
        self._index: dict[bytes, int] = {}
        self._ancestors: list[int] = []  # per index: bitmask of strict ancestors
        self._heads: set[bytes] = set()
        self._views: dict[int, View] = {}
        self._after: dict[bytes, Membership[DeviceInfo]] = {}  # record hash -> membership with it added
        self._budget: int | None = None  # verification steps left in this merge (None: no cap)
        self._append(genesis)
        self._remember_after(genesis, self._view(0))
        self._refresh()


    # -- construction

    @classmethod
    def from_records(cls, records: Iterable[bytes], *, max_cost: int | None = None) -> Self:
        """The circle these encoded records form, in any order. Raises RecordRejected.

        max_cost bounds the verification work for untrusted offers (see merge())."""
        records = list(records)
        if len(records) > MAX_CIRCLE_RECORDS:
            raise RecordRejected("too-many-records", f"a circle holds at most {MAX_CIRCLE_RECORDS}")
        decoded = [Record.decode(data) for data in records]
        geneses = {r.hash: r for r in decoded if r.kind == GENESIS}
        if not geneses:
            raise RecordRejected("no-genesis")
        if len(geneses) > 1:
            raise RecordRejected("wrong-circle", "records of several circles")
        circle = cls(next(iter(geneses.values())))
        circle._merge_decoded(decoded, max_cost)
        return circle
    # -- reading

    @property
    def state(self) -> CircleState:
        return self._state

    @property
    def heads(self) -> tuple[bytes, ...]:
        return self._state.heads

    def records(self) -> list[bytes]:
        """Every record, encoded, parents before children."""
        return [r.encoded for r in self._records]

    def record(self, record_hash: bytes) -> Record:
        return self._records[self._index[record_hash]]

    def has(self, record_hash: bytes) -> bool:
        return bytes(record_hash) in self._index

    def is_effective(self, record_hash: bytes) -> bool:
        """Whether a stored record counts in the current state (see the module docstring)."""
        return bool(self._current.effective >> self._index[record_hash] & 1)

    # -- merging

    def merge(self, records: Iterable[bytes], *, max_cost: int | None = None) -> list[bytes]:
        """Add the valid new records (any order within the batch); return their hashes.

        All or nothing: one invalid record rejects the batch with RecordRejected. Checking a
        chain costs one step per record; a record that merges concurrent branches costs its
        number of ancestors. Past max_cost steps the batch is rejected ("too-costly"), so
        an untrusted offer cannot buy quadratic work with signatures.
        """
        records = list(records)
        if len(self._records) + len(records) > MAX_CIRCLE_RECORDS:
            raise RecordRejected("too-many-records", f"a circle holds at most {MAX_CIRCLE_RECORDS}")
        return self._merge_decoded([Record.decode(data) for data in records], max_cost)

    def _merge_decoded(self, decoded: list[Record], max_cost: int | None = None) -> list[bytes]:
        pending: dict[bytes, Record] = {}
        for record in decoded:
            if record.hash in self._index or record.hash in pending:
                continue
            if record.kind == GENESIS or record.circle_id != self.circle_id:
                raise RecordRejected("wrong-circle")
            pending[record.hash] = record
        ordered = self._parents_first(pending)
        start = len(self._records)
        self._budget = max_cost
        try:
            for record in ordered:
                before = self._membership_before(record)
                if record.hash not in _validated:
                    self._check(record, before)
                self._append(record)
                self._remember_after(record, before)
        except RecordRejected:
            self._truncate(start)
            raise
        if len(_validated) > _VALIDATED_MAX:
            _validated.clear()
        _validated.update(r.hash for r in ordered)
        if ordered:
            self._refresh()
        return [r.hash for r in ordered]

    def _parents_first(self, pending: dict[bytes, Record]) -> list[Record]:
        """pending in an order where parents come first (Kahn's algorithm: linear, whatever
        order the records came in). Raises RecordRejected for parents found nowhere."""
        waiting_on: dict[bytes, int] = {}  # record hash -> parents not yet placed
        children: dict[bytes, list[bytes]] = {}
        ready: list[bytes] = []
        for record_hash, record in pending.items():
            missing = [p for p in record.parents if p not in self._index]
            if any(p not in pending for p in missing):
                raise RecordRejected("unknown-parents", "a parent is neither known nor offered")
            for parent in missing:
                children.setdefault(parent, []).append(record_hash)
            waiting_on[record_hash] = len(missing)
            if not missing:
                ready.append(record_hash)
        ordered: list[Record] = []
        while ready:
            record_hash = ready.pop()
            ordered.append(pending[record_hash])
            for child in children.get(record_hash, ()):
                waiting_on[child] -= 1
                if not waiting_on[child]:
                    ready.append(child)
        if len(ordered) != len(pending):  # a cycle: impossible with hashes, but never loop
            raise RecordRejected("unknown-parents", f"{len(pending) - len(ordered)} record(s)")
        return ordered

    def _membership_before(self, record: Record) -> Membership[DeviceInfo] | View:
        """The membership of record's ancestors: for a single parent, extended from the
        parent's (membership.py: linear along chains), else the full rule."""
        mask = self._mask_of_parents(record)
        for parent in record.parents:  # usually one; others may be its ancestors
            after = self._after.get(parent)
            index = self._index[parent]
            if after is not None and mask == self._ancestors[index] | 1 << index:
                return after
        self._charge(mask.bit_count())
        return self._view(mask)

    def _charge(self, cost: int) -> None:
        if self._budget is not None:
            self._budget -= cost
            if self._budget < 0:
                raise RecordRejected("too-costly", "the offered records merge too many branches")

    def _remember_after(self, record: Record, before: Membership[DeviceInfo] | View) -> None:
        after = extended(before, record) if record.kind != GENESIS else None
        if after is None:
            index = self._index[record.hash]
            self._charge(index + 1)
            view = self._view(self._ancestors[index] | 1 << index)
            after = Membership(view.members, view.removed, view.removed_dh, view.max_epoch,
                               view.known_dh)
        if len(self._after) >= _VIEW_MEMO_SIZE:
            self._after.clear()
        self._after[record.hash] = after

    def _check(self, record: Record, view: Membership[DeviceInfo] | View) -> None:
        """Validity against the record's causal past (view is the state of its ancestors)."""
        if record.author not in view.members:
            raise RecordRejected("removed-key" if record.author in view.removed else "not-a-member")
        member_dh = {info.dh_key: key for key, info in view.members.items()}
        if record.device is not None:
            device = record.device
            if device.sign_key in view.removed or device.dh_key in view.removed_dh:
                raise RecordRejected("removed-key", "a removed key is never added again")
            if device.sign_key in view.members or device.dh_key in member_dh:
                raise RecordRejected("duplicate-device")
        if record.kind == REMOVE and record.target not in view.members:
            raise RecordRejected("bad-body", "removes a key that is not a member")
        if record.epoch is not None:
            if record.epoch <= view.max_epoch:
                raise RecordRejected("stale-epoch", "epoch number not above its ancestors'")
            expected = {dh for dh, key in member_dh.items() if key != record.target}
            if set(record.boxes) != expected:
                raise RecordRejected("bad-boxes", "epoch not sealed to exactly the members")

    # -- bookkeeping

    def _mask_of_parents(self, record: Record) -> int:
        mask = 0
        for parent in record.parents:
            index = self._index[parent]
            mask |= self._ancestors[index] | 1 << index
        return mask

    def _append(self, record: Record) -> None:
        self._ancestors.append(self._mask_of_parents(record))
        self._index[record.hash] = len(self._records)
        self._records.append(record)
        self._heads.difference_update(record.parents)
        self._heads.add(record.hash)

    def _truncate(self, start: int) -> None:
        for record in self._records[start:]:
            del self._index[record.hash]
        del self._records[start:], self._ancestors[start:]
        self._heads = {r.hash for r in self._records} - {
            p for r in self._records for p in r.parents
        }
        self._views.clear()  # indices from start on will be reused
        self._after.clear()

    def _refresh(self) -> None:
        view = self._view((1 << len(self._records)) - 1)
        self._current = view
        self._state = CircleState(
            circle_id=self.circle_id,
            members=types.MappingProxyType(dict(sorted(view.members.items()))),
            removed=view.removed,
            epoch_number=(view.epoch_record.epoch or 0) if view.epoch_record else 0,
            needs_rotation=view.needs_rotation,
            heads=tuple(sorted(self._heads)),
            epoch_record=view.epoch_record.hash if view.epoch_record else None,
            cutoffs=types.MappingProxyType(_cutoffs(self._records, view)),
        )

    def _view(self, mask: int) -> View:
        view = self._views.get(mask)
        if view is None:
            if len(self._views) >= _VIEW_MEMO_SIZE:
                self._views.clear()
            view = self._views[mask] = evaluate(self._records, self._ancestors, mask)
        return view

    def _member_signer(self, signer: SigningKeyPair) -> None:
        if not self._state.is_member(signer.public):
            raise CircleOperationError("this key is not a member of the circle")

    def _commit(self, signer: SigningKeyPair, kind: str, body: Mapping[str, Any]) -> bytes:
        record = Record.sign(signer, self.circle_id, kind, self._state.heads, body)
        self._merge_decoded([record])
        return record.encoded

    # -- what epochs.py reads

    @property
    def current_view(self) -> View:
        """The state of the whole set, with which records count."""
        return self._current

    def ordered(self) -> Sequence[Record]:
        """Every record, decoded, parents before children (read-only)."""
        return self._records

    def ancestry(self, record_hash: bytes) -> int:
        """The strict ancestors of a stored record, as a bitmask over ordered()."""
        return self._ancestors[self._index[record_hash]]

    def position(self, record_hash: bytes) -> int:
        """Where a stored record is in ordered()."""
        return self._index[record_hash]


def _cutoffs(records: Sequence[Record], view: View) -> dict[bytes, Head]:
    """Per removed key, the smallest cutoff among the counting removes of it."""
    out: dict[bytes, Head] = {}
    for i, record in enumerate(records):
        cutoff, target = record.cutoff, record.target
        if cutoff is None or target not in view.removed or not view.effective >> i & 1:
            continue
        current = out.get(target)
        if current is None or (cutoff.seq, cutoff.hash) < (current.seq, current.hash):
            out[target] = cutoff
    return out
