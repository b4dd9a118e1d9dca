"""Membership along a chain of records, in time linear in the records (circledag.py uses it).

Validity of a circle record is decided against the state of its ancestors (protocol/circle.md,
"Validity"). Evaluating the merge rule afresh for every record of an offered circle costs
O(n) each, O(n^2) in all: 2,000 records froze a relay for seconds. But when every record of
a set S is an ancestor of r, adding r to S changes nothing about which records of S count
(r threatens only records that are not its ancestors, and authorises none of them), and r
itself counts (it is valid, so its author is an active member of S). So the membership of
S + {r} follows from that of S in O(1) dict work: `extended(before, r)`. A record whose
only parent is p has exactly anc(p) + {p} as its ancestors, so a chain is checked by
extending one Membership record by record; a record with several parents (a merge) still
needs the full rule over its ancestors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class DeviceLike(Protocol):
    """What this module reads of records.DeviceInfo (typed structurally: circledag.py
    imports this module, not the other way round)."""

    @property
    def sign_key(self) -> bytes: ...
    @property
    def dh_key(self) -> bytes: ...


D = TypeVar("D", bound=DeviceLike)
D_co = TypeVar("D_co", bound=DeviceLike, covariant=True)


class RecordLike(Protocol[D_co]):
    """What this module reads of records.Record."""

    @property
    def device(self) -> D_co | None: ...
    @property
    def target(self) -> bytes | None: ...
    @property
    def epoch(self) -> int | None: ...


@dataclass(frozen=True)
class Membership(Generic[D]):
    """What validity needs of a down-closed set of records (a subset of mergerule.View)."""

    members: Mapping[bytes, D]  # sign key -> device, the active members
    removed: frozenset[bytes]  # sign keys removed by a counting remove
    removed_dh: frozenset[bytes]  # every X25519 key ever introduced for a removed key
    max_epoch: int
    known_dh: Mapping[bytes, bytes]  # X25519 key -> sign key, of every intro in the set


class MembershipLike(Protocol[D_co]):
    """Membership, or mergerule.View (which has these fields and more)."""

    @property
    def members(self) -> Mapping[bytes, D_co]: ...
    @property
    def removed(self) -> frozenset[bytes]: ...
    @property
    def removed_dh(self) -> frozenset[bytes]: ...
    @property
    def max_epoch(self) -> int: ...
    @property
    def known_dh(self) -> Mapping[bytes, bytes]: ...


def extended(before: MembershipLike[D], record: RecordLike[D]) -> Membership[D] | None:
    """The membership of S + {record}, where `before` is that of S, every record of S is an
    ancestor of `record`, and `record` is valid against S. None in the one case this does
    not decide alike with the full rule (an X25519 key introduced before for another sign
    key): the caller then evaluates the full rule."""
    members, removed, removed_dh, known_dh = before.members, before.removed, before.removed_dh, before.known_dh
    if record.device is not None:
        device = record.device
        if known_dh.get(device.dh_key, device.sign_key) != device.sign_key:
            return None
        members = {**members, device.sign_key: device}
        known_dh = {**known_dh, device.dh_key: device.sign_key}
    if record.target is not None:
        target = record.target
        members = {key: info for key, info in members.items() if key != target}
        removed = removed | {target}
        removed_dh = removed_dh | {dh for dh, key in known_dh.items() if key == target}
    max_epoch = before.max_epoch if record.epoch is None else max(before.max_epoch, record.epoch)
    return Membership(members, removed, removed_dh, max_epoch, known_dh)
