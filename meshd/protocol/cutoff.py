"""A removed member's removal point: which of its log entries still count.

protocol/circle.md ("Bodies", remove) and protocol/logs.md ("A removed member's entries").
A remove record may name a **cutoff**: a signed head of the removed device's own log,
`[seq, hash, sig]`. Its entries 1..seq count; entries past seq never do. seq 0 (with a zero
hash and a zero signature) means nothing it wrote counts. A remove without a cutoff keeps
the meaning records had before the field existed: everything the device wrote counts.
Several counting removes of one key: the smallest cutoff wins (circledag.py).

Because the cutoff is a head the removed device signed itself, any receiver can check it
without the remover's log, and a receiver that holds the entries up to it can forward them
ending at that head (cut_batch), so the entries that count still sync between devices that
never held a head at exactly that seq.
"""

from __future__ import annotations

from typing import Any

from .entry import (
    HASH_BYTES,
    MAX_SEQ,
    SIGNATURE_BYTES,
    ZERO_HASH,
    EntryRejected,
    Head,
    entry_hash,
    unpack_header,
)
from .log import Batch
from .schema import Bin, Int, Tuple

# The wire shape of the cutoff field: [seq, entry hash, head signature].
CUTOFF_SCHEMA = Tuple(Int(0, MAX_SEQ), Bin(exact=HASH_BYTES), Bin(exact=SIGNATURE_BYTES))
# "Nothing of that device counts."
NOTHING_COUNTS = Head(0, ZERO_HASH, bytes(SIGNATURE_BYTES))


def cutoff_wire(head: Head) -> list[Any]:
    return [head.seq, head.hash, head.sig]


def cutoff_from_wire(value: list[Any], author: bytes) -> Head | None:
    """The cutoff of a value that passed CUTOFF_SCHEMA, or None when it is not a head that
    author signed (or, for seq 0, not exactly NOTHING_COUNTS)."""
    head = Head(value[0], value[1], value[2])
    if head.seq == 0:
        return head if head == NOTHING_COUNTS else None
    return head if head.is_valid_for(author) else None


def cut_batch(batch: Batch, cutoff: Head | None) -> Batch:
    """The part of a batch that counts, ending at the cutoff head.

    The batch itself when all of it counts (or when it is malformed: verify_batch says so);
    EntryRejected('past-removal') when none of it does, or when the batch's entry at the
    cutoff's seq is not the one the cutoff names (a fork the removed device signed).
    """
    if cutoff is None:
        return batch
    first = unpack_header(batch.headers[0])[2]
    if type(first) is not int or batch.head.seq != first + len(batch.headers) - 1:
        return batch
    if batch.head.seq <= cutoff.seq:
        return batch
    if first > cutoff.seq:
        raise EntryRejected("past-removal", f"entries from {first} are past the author's removal "
                            f"(its entries count up to {cutoff.seq})")
    keep = cutoff.seq - first + 1
    if entry_hash(batch.headers[keep - 1]) != cutoff.hash:
        raise EntryRejected("past-removal", f"entry {cutoff.seq} is not the one the removal names")
    return Batch(batch.author, batch.headers[:keep], batch.bodies[:keep], cutoff)
