"""The circle: signed membership records forming a DAG, and the state they imply.

Theory of operation. A circle is a set of records (genesis, add, remove, epoch, recovery),
each signed by its author and naming the hashes of the records it builds on. A record is
*valid* when its author was an active member in the state computed from its ancestors
alone; validity never changes once decided, because a record's ancestors are fixed by its
hash. Whether a valid record *counts* (is effective) is decided over the whole set, so that
concurrent changes merge to the same state everywhere:

  - remove wins: an effective remove of K makes K a non-member whatever concurrent adds say,
    and a removed key (or its X25519 key) is never added again;
  - backdating protection: a record by K counts only if it is an ancestor of every effective
    remove of K, so a removed device cannot author records "concurrent" with its removal;
    this also holds for the authority it handed out (a device added by K concurrently with
    K's removal never becomes a member);
  - a remove whose target removed its remover concurrently still counts (both go);
  - the current epoch is the highest (number, record hash) among effective epoch-bearing
    records sealed only to current members; an epoch *number* resolves to one record (the
    current one, records sealed to no removed key, the current one's ancestors, then the
    highest hash).

The rules, and why they are order independent, are spelled out in protocol/circle.md.
Everything that decides membership lives in this file; time and randomness are arguments.
One record or device claim on its own (constants, wire shapes, signing, decoding) is
records.py's.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .crypto import (
    KEY_LEN,
    DHKeyPair,
    RandomSource,
    SigningKeyPair,
    derive_key,
    seal,
    unseal,
)
from .errors import RemoteProtocolError
from .membership import Membership, extended
from .records import (
    ADD,
    EPOCH,
    EPOCH_LABELS,
    GENESIS,
    GENESIS_NONCE_BYTES,
    MAX_CIRCLE_RECORDS,
    MAX_EPOCH_NUMBER,
    RECOVERY,
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


@dataclass(frozen=True)
class _View:
    """The state of one down-closed set of records (all of them, or a record's ancestors)."""

    effective: int  # bitmask over record indices
    members: dict[bytes, DeviceInfo]
    removed: frozenset[bytes]
    removed_dh: frozenset[bytes]
    max_epoch: int
    epoch_record: Record | None
    needs_rotation: bool
    known_dh: Mapping[bytes, bytes] = field(default_factory=dict)  # X25519 -> sign key, all intros


@dataclass(frozen=True)
class EpochKeys:
    number: int
    mailbox: bytes = field(repr=False)
    backup: bytes = field(repr=False)
    discovery: bytes = field(repr=False)
    mailbox_id_key: bytes = field(repr=False)
    device_psk: bytes = field(repr=False)


def epoch_keys(number: int, epoch_key: bytes) -> EpochKeys:
    """The per-purpose subkeys of one epoch: keyed BLAKE2b, a distinct label each."""
    context = number.to_bytes(8, "big")
    return EpochKeys(
        number,
        **{name: derive_key(epoch_key, label, context) for name, label in EPOCH_LABELS.items()},
    )


# ---- The circle -----------------------------------------------------------------------


class Circle:
    """A validated set of records plus the derived state."""

    def __init__(self, genesis: Record) -> None:
        if genesis.kind != GENESIS:
            raise RecordRejected("no-genesis")
        self.circle_id = genesis.hash
        self._records: list[Record] = []
        self._index: dict[bytes, int] = {}
        self._ancestors: list[int] = []  # per index: bitmask of strict ancestors
        self._heads: set[bytes] = set()
        self._views: dict[int, _View] = {}
        self._after: dict[bytes, Membership[DeviceInfo]] = {}  # record hash -> membership with it added
        self._budget: int | None = None  # verification steps left in this merge (None: no cap)
        self._append(genesis)
        self._remember_after(genesis, self._view(0))
        self._refresh()

    # -- construction

    @classmethod
    def create(cls, signer: SigningKeyPair, device: DeviceInfo, rng: RandomSource) -> Circle:
        """A new circle: genesis enrolling device, then epoch 1 sealed to it."""
        if device.recovery:
            raise CircleOperationError("a circle is founded by a device, not a recovery key")
        if bytes(signer.public) != bytes(device.sign_key):
            raise CircleOperationError("the founding device signs the genesis record itself")
        body = {"device": device.claim(signer), "nonce": rng(GENESIS_NONCE_BYTES)}
        genesis = Record.sign(signer, b"", GENESIS, (), body)
        circle = cls(genesis)
        circle.rotate_epoch(signer, rng)
        return circle

    @classmethod
    def from_records(cls, records: Iterable[bytes], *, max_cost: int | None = None) -> Circle:
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

    def _membership_before(self, record: Record) -> Membership[DeviceInfo] | _View:
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

    def _remember_after(self, record: Record, before: Membership[DeviceInfo] | _View) -> None:
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

    def _check(self, record: Record, view: Membership[DeviceInfo] | _View) -> None:
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
        )

    def _view(self, mask: int) -> _View:
        view = self._views.get(mask)
        if view is None:
            if len(self._views) >= _VIEW_MEMO_SIZE:
                self._views.clear()
            view = self._views[mask] = _evaluate(self._records, self._ancestors, mask)
        return view

    # -- local operations: each returns the new encoded records, already merged

    def _member_signer(self, signer: SigningKeyPair) -> None:
        if not self._state.is_member(signer.public):
            raise CircleOperationError("this key is not a member of the circle")

    def _commit(self, signer: SigningKeyPair, kind: str, body: Mapping[str, Any]) -> bytes:
        record = Record.sign(signer, self.circle_id, kind, self._state.heads, body)
        self._merge_decoded([record])
        return record.encoded

    def _epoch_body(self, rng: RandomSource, *, without: bytes | None = None) -> dict[str, Any]:
        number = self._current.max_epoch + 1
        if number > MAX_EPOCH_NUMBER:
            raise CircleOperationError("epoch numbers are exhausted")
        epoch_key = rng(KEY_LEN)
        recipients = sorted(
            info.dh_key for key, info in self._state.members.items() if key != without
        )
        return {"boxes": [[dh, seal(dh, epoch_key)] for dh in recipients], "epoch": number}

    def add_device(self, signer: SigningKeyPair, device: DeviceInfo, rng: RandomSource) -> list[bytes]:
        """Add a device (it must carry its claim), then a new epoch it can read."""
        self._member_signer(signer)
        if device.recovery:
            raise CircleOperationError("enrol a recovery key with enrol_recovery")
        return self._enrol(signer, ADD, device, rng)

    def _enrol(self, signer: SigningKeyPair, kind: str, device: DeviceInfo, rng: RandomSource) -> list[bytes]:
        _require_claim(device)
        if device.sign_key in self._state.removed:
            raise CircleOperationError("that key was removed from the circle and cannot return")
        if self._state.is_member(device.sign_key):
            raise CircleOperationError("that device is already a member")
        added = self._commit(signer, kind, {"device": device.proof})
        return [added, self._commit(signer, EPOCH, self._epoch_body(rng))]

    def remove_device(
        self, signer: SigningKeyPair, sign_key: bytes, rng: RandomSource, *, force: bool = False
    ) -> list[bytes]:
        """Remove a member; the same record starts an epoch not sealed to it.

        The last device goes only with force (protocol/circle.md, "Removing oneself").
        """
        self._member_signer(signer)
        sign_key = bytes(sign_key)
        target = self._state.members.get(sign_key)
        if target is None:
            raise CircleOperationError("that key is not a member of the circle")
        if not force and not target.recovery and all(
            info.recovery or key == sign_key for key, info in self._state.members.items()
        ):
            # Tailscale's Tailnet Lock could lock a tailnet out by removing its last
            # signing node (tailscale/tailscale#13621): the last device always stays.
            raise CircleOperationError(
                "refusing to remove the last device: the circle would have no device left "
                "(force it if that is what you want)"
            )
        body = {"removed": sign_key, **self._epoch_body(rng, without=sign_key)}
        return [self._commit(signer, REMOVE, body)]

    def settle_with_recovery(self, recovery_signer: SigningKeyPair, sign_key: bytes, rng: RandomSource) -> list[bytes]:
        """The recovery member removes a device, outranking what that device did meanwhile.

        The remove builds on the circle as it was before the dispute: every record except
        the removes of that device, the device's records that no such remove saw, and what
        builds on either. So everything the device did in the dispute (removing the owner's
        devices, or the recovery member) is concurrent with this remove, which a device's
        remove cannot threaten (protocol/circle.md, "The recovery words outrank devices").
        """
        sign_key = bytes(sign_key)
        disputed = 0
        removes = [i for i, r in enumerate(self._records) if r.target == sign_key]
        seen_by_a_remove = 0
        for i in removes:
            seen_by_a_remove |= self._ancestors[i]
        for i, record in enumerate(self._records):
            if record.target == sign_key or (record.author == sign_key and not seen_by_a_remove >> i & 1):
                disputed |= 1 << i
        before = 0
        for i in range(len(self._records)):
            if not (self._ancestors[i] | 1 << i) & disputed:
                before |= 1 << i
        view = self._view(before)
        member = view.members.get(bytes(recovery_signer.public))
        if member is None or not member.recovery:
            raise CircleOperationError("this recovery key is not enrolled in the circle")
        target = view.members.get(sign_key)
        if target is None or target.recovery:
            raise CircleOperationError("that key was not a device of the circle before the dispute")
        parents = {r.hash for i, r in enumerate(self._records) if before >> i & 1} - {
            p for i, r in enumerate(self._records) if before >> i & 1 for p in r.parents
        }
        number = view.max_epoch + 1
        recipients = sorted(info.dh_key for key, info in view.members.items() if key != sign_key)
        epoch_key = rng(KEY_LEN)
        body = {"removed": sign_key, "boxes": [[dh, seal(dh, epoch_key)] for dh in recipients], "epoch": number}
        record = Record.sign(recovery_signer, self.circle_id, REMOVE, parents, body)
        self._merge_decoded([record])
        return [record.encoded]

    def rotate_epoch(self, signer: SigningKeyPair, rng: RandomSource) -> list[bytes]:
        self._member_signer(signer)
        return [self._commit(signer, EPOCH, self._epoch_body(rng))]

    def enrol_recovery(self, signer: SigningKeyPair, recovery: DeviceInfo, rng: RandomSource) -> list[bytes]:
        """Enrol a recovery member; any previous recovery member is removed (replaced)."""
        self._member_signer(signer)
        if not recovery.recovery:
            raise CircleOperationError("a recovery member has recovery=True")
        previous = [info.sign_key for info in self._state.recovery_members()]
        if not previous:
            return self._enrol(signer, RECOVERY, recovery, rng)
        _require_claim(recovery)
        out = [self._commit(signer, RECOVERY, {"device": recovery.proof})]
        for old in previous:
            body = {"removed": old, **self._epoch_body(rng, without=old)}
            out.append(self._commit(signer, REMOVE, body))
        return out

    def recover(self, recovery_signer: SigningKeyPair, new_device: DeviceInfo, rng: RandomSource) -> list[bytes]:
        """Add new_device with records signed by the recovery member, then a new epoch."""
        member = self._state.members.get(bytes(recovery_signer.public))
        if member is None or not member.recovery:
            raise CircleOperationError("this recovery key is not enrolled in the circle")
        if new_device.recovery:
            raise CircleOperationError("recover adds a device, not a recovery key")
        return self._enrol(recovery_signer, ADD, new_device, rng)

    # -- epoch keys (protocol/circle.md, "An epoch is the record that made it")

    def epoch_key(self, dh: DHKeyPair, number: int | None = None) -> bytes:
        """The epoch key sealed to dh: the current epoch's by default, else what number resolves to."""
        if number is None:
            record = self._current.epoch_record
            if record is None:
                raise CircleOperationError("the circle has no current epoch: rotate it")
        else:
            record = self._resolve(number)
            if record is None:
                raise CircleOperationError(f"no epoch {number} is sealed to this device")
        box = record.boxes.get(bytes(dh.public))
        if box is None:
            raise CircleOperationError(f"epoch {record.epoch} is not sealed to this device")
        return _open_box(dh, box)

    def current_keys(self, dh: DHKeyPair) -> EpochKeys:
        """The subkeys of the current epoch record: what sealing, deposits and adverts use."""
        return epoch_keys(self._state.epoch_number, self.epoch_key(dh))

    def readable_epochs(self, dh: DHKeyPair) -> dict[int, bytes]:
        """Each epoch number whose resolved record is sealed to dh, with its key."""
        out: dict[int, bytes] = {}
        for number, record in sorted(self._resolved().items()):
            box = record.boxes.get(bytes(dh.public))
            if box is not None:
                out[number] = _open_box(dh, box)
        return out

    def recent_epochs(self, dh: DHKeyPair, count: int) -> list[EpochKeys]:
        """The current epoch's keys, then those the next lower numbers resolve to (sealed to dh)."""
        current = self._current.epoch_record
        if current is None or current.epoch is None:
            return []
        readable = self.readable_epochs(dh)
        numbers = sorted((n for n in readable if n <= current.epoch), reverse=True)[:count]
        return [epoch_keys(n, readable[n]) for n in numbers]

    def announcement_keys(self, dh: DHKeyPair, recipient_dh: bytes, depth: int) -> list[EpochKeys]:
        """Keys to seal a membership change under for recipient: up to `depth` epoch records
        before the current one on its chain (oldest first), then the current one.

        A recipient that missed the change still drains its mailbox of the epoch it knows;
        only the current epoch's would hide the change from it (protocol/circle.md).
        """
        current = self._current.epoch_record
        if current is None:
            return []
        index = self._index[current.hash]
        chain = self._ancestors[index]
        older = sorted(
            (r for i, r in enumerate(self._records)
             if chain >> i & 1 and r.epoch is not None and self.is_effective(r.hash)
             and bytes(dh.public) in r.boxes and bytes(recipient_dh) in r.boxes),
            key=lambda r: r.epoch or 0,
        )[-depth:] if depth > 0 else []
        return [epoch_keys(r.epoch or 0, _open_box(dh, r.boxes[bytes(dh.public)])) for r in older] + [
            self.current_keys(dh)
        ]

    def readable_epoch_records(self, dh: DHKeyPair) -> list[tuple[bytes, EpochKeys]]:
        """(record hash, keys) of every counting epoch record sealed to dh: current, then newest.

        Mailboxes are drained in all of them: a cut-off device may have sealed letters under
        a record that lost to a concurrent one with the same number.
        """
        rank, current = self._rank(), self._current.epoch_record
        records = sorted(self._epoch_records(), key=lambda r: (r == current, r.epoch or 0, rank(r)), reverse=True)
        out = []
        for record in records:
            box = record.boxes.get(bytes(dh.public))
            if box is not None and record.epoch is not None:
                out.append((record.hash, epoch_keys(record.epoch, _open_box(dh, box))))
        return out

    def _rank(self) -> Callable[[Record], tuple[bool, bool, bool, bytes]]:
        current = self._current.epoch_record
        chain = 0
        if current is not None:
            chain = self._ancestors[self._index[current.hash]]
        removed_dh = self._current.removed_dh

        def rank(record: Record) -> tuple[bool, bool, bool, bytes]:
            on_chain = bool(chain >> self._index[record.hash] & 1)
            clean = not (record.boxes.keys() & removed_dh)
            return record == current, clean, on_chain, record.hash

        return rank

    def _resolved(self) -> dict[int, Record]:
        """Each epoch number's record: the highest rank among counting records with it."""
        rank = self._rank()
        out: dict[int, Record] = {}
        for record in self._epoch_records():
            number = record.epoch or 0
            best = out.get(number)
            if best is None or rank(record) > rank(best):
                out[number] = record
        return out

    def _resolve(self, number: int) -> Record | None:
        return self._resolved().get(number)

    def _epoch_records(self) -> list[Record]:
        effective = self._current.effective
        return [r for i, r in enumerate(self._records) if r.epoch is not None and effective >> i & 1]


def _require_claim(device: DeviceInfo) -> None:
    """A device is enrolled by its own claim, which must describe exactly this DeviceInfo."""
    if not device.proof:
        raise CircleOperationError(
            "the device carries no claim: use DeviceInfo.verify_claim(claim) or .claimed(signer)"
        )
    try:
        claimed = DeviceInfo.verify_claim(device.proof)
    except RecordRejected as err:
        raise CircleOperationError(f"the device's claim is invalid ({err.reason})") from err
    if claimed != device:
        raise CircleOperationError("the device's claim describes another device")


def _open_box(dh: DHKeyPair, box: bytes) -> bytes:
    try:
        key = unseal(dh, box)
    except RemoteProtocolError as err:
        raise RecordRejected("bad-box", "an epoch box sealed to this device does not open") from err
    if len(key) != KEY_LEN:
        raise RecordRejected("bad-box", "an epoch key is 32 bytes")
    return key


# ---- The merge rule -------------------------------------------------------------------


def _evaluate(records: list[Record], ancestors: list[int], mask: int) -> _View:
    """The state of the down-closed set `mask` of valid records (protocol/circle.md).

    Which records count is the well-founded model of: r counts iff the record that
    introduced its author counts and no counting remove of its author threatens it (a
    remove t threatens r unless r is an ancestor of t, or r is a remove whose target
    authorised t's author). Gamma(S) computes the records that count when S is assumed to
    be the set of counting records; iterating Gamma(Gamma(.)) from the empty set converges
    to what certainly counts. Cycles of concurrent removes that this leaves undecided
    resolve as: the removes count (remove wins), nothing else in them does.
    """
    members_of = [i for i in range(len(records)) if mask >> i & 1]
    intros: dict[bytes, list[int]] = {}
    removes_of: dict[bytes, list[int]] = {}
    by_author: dict[bytes, list[int]] = {}
    removes_mask = 0
    for i in members_of:
        record = records[i]
        by_author.setdefault(record.author, []).append(i)
        if record.device is not None:
            intros.setdefault(record.device.sign_key, []).append(i)
        if record.target is not None:
            removes_of.setdefault(record.target, []).append(i)
            removes_mask |= 1 << i

    # support[i]: the intro records that authorise record i's author, transitively.
    support: dict[int, int] = {}
    authored: dict[bytes, int] = {}
    for i in members_of:
        record = records[i]
        authored[record.author] = authored.get(record.author, 0) | 1 << i
        mask_i = 0
        for j in intros.get(record.author, ()):
            if ancestors[i] >> j & 1:
                mask_i |= 1 << j | support[j]
        support[i] = mask_i

    recovery_keys = {
        key for key, indices in intros.items()
        if any(records[j].device.recovery for j in indices)  # type: ignore[union-attr]
    }

    def recovery_authored(index: int) -> bool:
        return records[index].author in recovery_keys

    threats: dict[int, list[int]] = {}
    for target, removes in removes_of.items():
        for t in removes:
            for i in by_author.get(target, ()):
                if i == t or ancestors[t] >> i & 1:
                    continue
                if recovery_authored(i) and not recovery_authored(t):
                    continue  # the recovery words outrank devices (protocol/circle.md)
                victim = records[i].target
                if victim is not None and not recovery_authored(t):
                    # A remove of V ignores a threat that V's own records (ones this remove
                    # threatens) authored or authorised: otherwise a removed device could
                    # veto its removal by removing its remover, or through a device it added.
                    suspended = authored.get(victim, 0) & ~ancestors[i] & ~(1 << i)
                    if ((1 << t) | support[t]) & suspended:
                        continue
                threats.setdefault(i, []).append(t)

    def gamma(assumed: int) -> int:
        counted = 0
        for i in members_of:
            record = records[i]
            if record.kind != GENESIS and not any(
                counted >> j & 1 and ancestors[i] >> j & 1 for j in intros.get(record.author, ())
            ):
                continue
            if any(assumed >> t & 1 for t in threats.get(i, ())):
                continue
            counted |= 1 << i
        return counted

    certain = 0
    while True:
        possible = gamma(certain)
        more = gamma(possible)
        if more == certain:
            break
        certain = more
    effective = certain | (possible & ~certain & removes_mask)

    removed = frozenset(
        gone
        for i in members_of
        if effective >> i & 1 and (gone := records[i].target) is not None
    )
    members: dict[bytes, DeviceInfo] = {}
    known_dh: dict[bytes, bytes] = {}
    for key, indices in intros.items():
        counted = [records[i] for i in indices if effective >> i & 1]
        for i in indices:
            known_dh[records[i].device.dh_key] = key  # type: ignore[union-attr]
        if counted and key not in removed:
            members[key] = min(counted, key=lambda r: r.hash).device  # type: ignore[assignment]
    removed_dh = frozenset(dh for dh, key in known_dh.items() if key in removed)
    member_dh = {info.dh_key for info in members.values()}

    current: Record | None = None
    max_epoch = 0
    for i in members_of:
        record = records[i]
        if record.epoch is None:
            continue
        max_epoch = max(max_epoch, record.epoch)
        if effective >> i & 1 and record.boxes.keys() <= member_dh:
            if current is None or (record.epoch, record.hash) > (current.epoch, current.hash):
                current = record
    return _View(
        effective=effective,
        members=members,
        removed=removed,
        removed_dh=removed_dh,
        max_epoch=max_epoch,
        epoch_record=current,
        needs_rotation=current is None or set(current.boxes) != member_dh,
        known_dh=known_dh,
    )
