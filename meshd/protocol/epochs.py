"""What an epoch number means: the record it resolves to, and the keys that record seals.

protocol/circle.md, "An epoch is the record that made it". Concurrent changes can make two
counting records carry one epoch number (a removal and a pairing on either side of a
partition). The current epoch is a record (mergerule.py picks it); a *number* resolves to
one record: the current one, then records sealed to no removed key, then the current one's
ancestors, then the highest hash. So a number never means a key a removed device holds
while another record of that number exists that it does not.

Functions over a validated circle (circledag.CircleDag); circle.Circle offers them as
methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .circledag import CircleDag
from .crypto import KEY_LEN, DHKeyPair, derive_key, unseal
from .errors import RemoteProtocolError
from .records import EPOCH_LABELS, CircleOperationError, Record, RecordRejected


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


def open_box(dh: DHKeyPair, box: bytes) -> bytes:
    """The epoch key in a box sealed to dh; RecordRejected if it does not open."""
    try:
        key = unseal(dh, box)
    except RemoteProtocolError as err:
        raise RecordRejected("bad-box", "an epoch box sealed to this device does not open") from err
    if len(key) != KEY_LEN:
        raise RecordRejected("bad-box", "an epoch key is 32 bytes")
    return key


def epoch_key(circle: CircleDag, dh: DHKeyPair, number: int | None = None) -> bytes:
    """The epoch key sealed to dh: the current epoch's by default, else what number resolves to."""
    if number is None:
        record = circle.current_view.epoch_record
        if record is None:
            raise CircleOperationError("the circle has no current epoch: rotate it")
    else:
        record = resolved(circle).get(number)
        if record is None:
            raise CircleOperationError(f"no epoch {number} is sealed to this device")
    box = record.boxes.get(bytes(dh.public))
    if box is None:
        raise CircleOperationError(f"epoch {record.epoch} is not sealed to this device")
    return open_box(dh, box)


def current_keys(circle: CircleDag, dh: DHKeyPair) -> EpochKeys:
    """The subkeys of the current epoch record: what sealing, deposits and adverts use."""
    return epoch_keys(circle.state.epoch_number, epoch_key(circle, dh))


def readable_epochs(circle: CircleDag, dh: DHKeyPair) -> dict[int, bytes]:
    """Each epoch number whose resolved record is sealed to dh, with its key."""
    out: dict[int, bytes] = {}
    for number, record in sorted(resolved(circle).items()):
        box = record.boxes.get(bytes(dh.public))
        if box is not None:
            out[number] = open_box(dh, box)
    return out


def recent_epochs(circle: CircleDag, dh: DHKeyPair, count: int) -> list[EpochKeys]:
    """The current epoch's keys, then those the next lower numbers resolve to (sealed to dh)."""
    current = circle.current_view.epoch_record
    if current is None or current.epoch is None:
        return []
    readable = readable_epochs(circle, dh)
    numbers = sorted((n for n in readable if n <= current.epoch), reverse=True)[:count]
    return [epoch_keys(n, readable[n]) for n in numbers]


def announcement_keys(circle: CircleDag, dh: DHKeyPair, recipient_dh: bytes, depth: int) -> list[EpochKeys]:
    """Keys to seal a membership change under for recipient: up to `depth` epoch records
    before the current one on its chain (oldest first), then the current one.

    A recipient that missed the change still drains its mailbox of the epoch it knows;
    only the current epoch's would hide the change from it (protocol/circle.md).
    """
    current = circle.current_view.epoch_record
    if current is None:
        return []
    chain = circle.ancestry(current.hash)
    older = sorted(
        (r for i, r in enumerate(circle.ordered())
         if chain >> i & 1 and r.epoch is not None and circle.is_effective(r.hash)
         and bytes(dh.public) in r.boxes and bytes(recipient_dh) in r.boxes),
        key=lambda r: r.epoch or 0,
    )[-depth:] if depth > 0 else []
    return [epoch_keys(r.epoch or 0, open_box(dh, r.boxes[bytes(dh.public)])) for r in older] + [
        current_keys(circle, dh)
    ]


def readable_epoch_records(circle: CircleDag, dh: DHKeyPair) -> list[tuple[bytes, EpochKeys]]:
    """(record hash, keys) of every counting epoch record sealed to dh: current, then newest.

    Mailboxes are drained in all of them: a cut-off device may have sealed letters under
    a record that lost to a concurrent one with the same number.
    """
    by_rank, current = rank(circle), circle.current_view.epoch_record
    records = sorted(epoch_records(circle), key=lambda r: (r == current, r.epoch or 0, by_rank(r)),
                     reverse=True)
    out = []
    for record in records:
        box = record.boxes.get(bytes(dh.public))
        if box is not None and record.epoch is not None:
            out.append((record.hash, epoch_keys(record.epoch, open_box(dh, box))))
    return out


def rank(circle: CircleDag) -> Callable[[Record], tuple[bool, bool, bool, bytes]]:
    """The order among counting records of one number: current, clean, on the current
    record's chain, then the higher hash."""
    current = circle.current_view.epoch_record
    chain = circle.ancestry(current.hash) if current is not None else 0
    removed_dh = circle.current_view.removed_dh

    def ranked(record: Record) -> tuple[bool, bool, bool, bytes]:
        on_chain = bool(chain >> circle.position(record.hash) & 1)
        clean = not (record.boxes.keys() & removed_dh)
        return record == current, clean, on_chain, record.hash

    return ranked


def resolved(circle: CircleDag) -> dict[int, Record]:
    """Each epoch number's record: the highest rank among counting records with it."""
    by_rank = rank(circle)
    out: dict[int, Record] = {}
    for record in epoch_records(circle):
        number = record.epoch or 0
        best = out.get(number)
        if best is None or by_rank(record) > by_rank(best):
            out[number] = record
    return out


def epoch_records(circle: CircleDag) -> list[Record]:
    """The counting records that carry an epoch, parents first."""
    effective = circle.current_view.effective
    return [r for i, r in enumerate(circle.ordered()) if r.epoch is not None and effective >> i & 1]
