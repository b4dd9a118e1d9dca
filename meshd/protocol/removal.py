"""The removal notice: what a removed device is handed so it learns it was removed.

protocol/circle.md, "Removal notice": every counting remove record whose target is the
device, with all their ancestors and nothing newer. The records are signed, so the notice
needs no trust in whoever hands it over; the removed device merges them like any records.
"""

from __future__ import annotations

from .circle import Circle
from .crypto import blake2b_256
from .records import DeviceInfo, Record


def _decoded(circle: Circle) -> list[Record]:
    """The circle's records, parents first (already verified: looked up, not decoded again)."""
    return [circle.record(blake2b_256(encoded)) for encoded in circle.records()]


def removed_devices(circle: Circle) -> list[DeviceInfo]:
    """Every non-recovery device whose removal counts (for a settlement by the words)."""
    removed = circle.state.removed
    found = {r.device.sign_key: r.device for r in _decoded(circle)
             if r.device is not None and r.device.sign_key in removed and not r.device.recovery}
    return sorted(found.values(), key=lambda d: (d.name, d.sign_key))


def removed_dh_keys(circle: Circle) -> dict[bytes, bytes]:
    """X25519 key -> Ed25519 key of every device whose removal counts in the circle."""
    removed = circle.state.removed
    out: dict[bytes, bytes] = {}
    for record in _decoded(circle):
        device = record.device
        if device is not None and device.sign_key in removed:
            out[device.dh_key] = device.sign_key
    return out


def removal_notice(circle: Circle, dh_key: bytes) -> list[bytes]:
    """The notice for the device with that X25519 key, parents first; [] if it is not removed."""
    sign_key = removed_dh_keys(circle).get(bytes(dh_key))
    if sign_key is None:
        return []
    wanted: set[bytes] = set()
    records = _decoded(circle)
    stack = [r.hash for r in records if r.target == sign_key and circle.is_effective(r.hash)]
    while stack:
        record_hash = stack.pop()
        if record_hash not in wanted:
            wanted.add(record_hash)
            stack.extend(circle.record(record_hash).parents)
    return [r.encoded for r in records if r.hash in wanted]


def may_author(circle: Circle, sign_key: bytes) -> bool:
    """Whose log entries are accepted (protocol/logs.md, "Verification of a batch"): every
    active member's, and a removed member's too, so the history it wrote before its removal
    stays valid for devices that sync it later. A key the circle never admitted is refused."""
    state = circle.state
    return state.is_member(sign_key) or sign_key in state.removed
