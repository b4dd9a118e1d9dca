"""The merge rule: which records of a circle count, and the state they imply.

Validity of one record is decided against its ancestors (circledag.py); whether a valid
record *counts* is decided over the whole set, so that concurrent changes merge to the same
state everywhere (protocol/circle.md, "The merge rule"):

  - remove wins: an effective remove of K makes K a non-member whatever concurrent adds say,
    and a removed key (or its X25519 key) is never added again;
  - backdating protection: a record by K counts only if it is an ancestor of every effective
    remove of K, so a removed device cannot author records "concurrent" with its removal;
    this also holds for the authority it handed out (a device added by K concurrently with
    K's removal never becomes a member);
  - a remove whose target removed its remover concurrently still counts (both go);
  - the recovery words outrank devices;
  - the current epoch is the highest (number, record hash) among effective epoch-bearing
    records sealed only to current members.

evaluate() is a pure function of the records and their ancestry; circledag.py memoises it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .records import GENESIS, DeviceInfo, Record


@dataclass(frozen=True)
class View:
    """The state of one down-closed set of records (all of them, or a record's ancestors)."""

    effective: int  # bitmask over record indices
    members: dict[bytes, DeviceInfo]
    removed: frozenset[bytes]
    removed_dh: frozenset[bytes]
    max_epoch: int
    epoch_record: Record | None
    needs_rotation: bool
    known_dh: Mapping[bytes, bytes] = field(default_factory=dict)  # X25519 -> sign key, all intros


def evaluate(records: list[Record], ancestors: list[int], mask: int) -> View:
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
    return View(
        effective=effective,
        members=members,
        removed=removed,
        removed_dh=removed_dh,
        max_epoch=max_epoch,
        epoch_record=current,
        needs_rotation=current is None or set(current.boxes) != member_dh,
        known_dh=known_dh,
    )
