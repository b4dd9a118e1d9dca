"""Message logs: batches of entries, their verification, local writes and the materialised view.

One entry's format, heads and the clock are entry.py's (re-exported here).

Theory of operation. Every device appends to its own log. An entry is a canonical msgpack
header (a 10-field array, see protocol/logs.md) plus an optional body that travels beside
it; the header carries the body's hash, so a body can be purged (delete, clear, superseded)
while the chain of headers still verifies. Entry n's header names the hash of entry n-1's
header (zeros for entry 1), so a signature over the newest entry's hash covers the whole
prefix: authors sign *heads* (author, seq, hash) rather than entries, one signature per
write batch and at least every HEAD_EVERY_BYTES of log, because Ed25519 verification
(~16k/s) would otherwise cap sync far below the storage rate.

Rules the receiver enforces, all before anything is committed (verify_batch):

  Rule 1: a batch is one author's contiguous run of entries ending at a signed head of that
          author; the head's hash is the hash of the batch's last header.
  Rule 2: the first new entry continues the receiver's chain tip (else "gap" or
          "broken-chain"); every header names the previous header's hash.
  Rule 3: a body, when present, matches the header's length and hash; bodies and names
          have hard size limits ("oversized").

The view (materialise, and the store's incremental copy of it) is a pure function of the
set of entries: per stream, the latest put or delete per record id by the total order
(hlc, author, seq) wins; a clear hides every record whose winning entry orders at or
before it; live records are listed in that order.

Nothing here performs I/O or reads a clock: wall time comes in as an argument.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import msgpack

from .compose import HEAD_EVERY_BYTES as HEAD_EVERY_BYTES
from .compose import PutRun as PutRun
from .compose import VerifiedBatch as VerifiedBatch
from .compose import Write as Write
from .compose import auto_record_id as auto_record_id
from .compose import check_write as check_write
from .compose import compose_batch as compose_batch
from .compose import compose_units as compose_units
from .compose import joined as joined
from .compose import split_units as split_units
from .crypto import blake2b_256 as blake2b_256  # (re-exported: tools import it from here)
from .entry import (
    CLEAR,
    DELETE,
    EMPTY_BODY_HASH,
    ENTRY_VERSION,
    HASH_BYTES,
    HEAD_CONTEXT,
    HLC_COUNTER_BITS,
    KEY_BYTES,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_HLC,
    MAX_HLC_DRIFT_MS,
    MAX_NAME_BYTES,
    MAX_SEQ,
    OP_CODES,
    OP_NAMES,
    PUT,
    SIGNATURE_BYTES,
    ZERO_HASH,
    EntryRejected,
    Head,
    Header,
    InvalidRequest,
    adoptable_hlc,
    check_header,
    encode_header,
    entry_hash,
    head_signed_bytes,
    hlc_limit,
    hlc_millis,
    next_hlc,
    order_key,
    sign_head,
    unpack_header,
)
from .schema import Array, Bin, Either, Int, Map, Nil, SchemaError
from .view import ViewRecord as ViewRecord
from .view import materialise as materialise

# Entry names are re-exported: the shell and the tests import the log's vocabulary from here.
__all__ = [
    "CLEAR", "DELETE", "EMPTY_BODY_HASH", "ENTRIES_SCHEMA", "ENTRY_VERSION", "HASH_BYTES",
    "HEAD_CONTEXT", "HEAD_EVERY_BYTES", "HLC_COUNTER_BITS", "KEY_BYTES", "MAX_BATCH_BYTES",
    "MAX_BATCH_ENTRIES", "MAX_BODY_BYTES", "MAX_HEADER_BYTES", "MAX_HLC", "MAX_HLC_DRIFT_MS",
    "MAX_NAME_BYTES", "MAX_SEQ", "OP_CODES", "OP_NAMES", "PUT", "SIGNATURE_BYTES", "ZERO_HASH",
    "Batch", "EntryRejected", "Head", "Header", "InvalidRequest", "VerifiedBatch", "ViewRecord",
    "Write", "adoptable_hlc", "auto_record_id", "batch_message", "batch_size", "check_write",
    "PutRun", "compose_batch", "compose_units", "joined", "split_units",
    "encode_header", "entry_hash", "head_signed_bytes", "hlc_limit", "hlc_millis",
    "materialise", "next_hlc", "order_key", "sign_head", "verify_batch",
]

# ---- Wire shapes (protocol/logs.md, "Sync messages"): checked before anything reads them

# A log.entries message: at most this many entries (a batch is at most 8 MiB of headers
# and bodies, and a header is at least ~90 bytes).
MAX_BATCH_ENTRIES = 1 << 17
_ORDER_KEY = struct.Struct(">Q32sQ")  # an entry's order key: hlc, author, seq
ENTRIES_SCHEMA = Map(
    {"author": Bin(exact=KEY_BYTES),
     # Sizes are verify_batch's to judge ("oversized"); here only the types.
     "headers": Array(Bin(), 1, MAX_BATCH_ENTRIES),
     "bodies": Array(Either(Nil(), Bin()), 1, MAX_BATCH_ENTRIES),
     "head": Map({"seq": Int(1, MAX_SEQ), "hash": Bin(exact=HASH_BYTES),
                  "sig": Bin(exact=SIGNATURE_BYTES)})},
    open_=True,  # "t" and "rid", and fields a later version may add
)

# ---- Implementation constants -------------------------------------------------------

# A sender ends a batch at the first signed head past the requested size, unless that
# would pass this bound and an earlier head exists.
MAX_BATCH_BYTES = 8 * 1024 * 1024


# ---- Batches ------------------------------------------------------------------------


@dataclass(slots=True)
class Batch:
    """A 'log.entries' message: one author's entries from some seq up to a signed head."""

    author: bytes
    headers: list[bytes]
    bodies: list[bytes | None]
    head: Head

    def to_message(self) -> dict[str, Any]:
        return batch_message(self.author, self.headers, self.bodies, self.head)

    @property
    def size(self) -> int:
        """Bytes of headers and bodies: what flow-control credit counts."""
        return batch_size(self.headers, self.bodies)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Batch:
        """Check a 'log.entries' message against ENTRIES_SCHEMA. Raises EntryRejected
        ('malformed'); each header's own fields are checked by verify_batch."""
        try:
            ENTRIES_SCHEMA.check(message)
        except SchemaError as err:
            raise EntryRejected("malformed", str(err)) from err
        headers, bodies, head = message["headers"], message["bodies"], message["head"]
        if len(headers) != len(bodies):
            raise EntryRejected("malformed", "headers and bodies differ in length")
        return cls(message["author"], headers, bodies, Head(head["seq"], head["hash"], head["sig"]))


def batch_message(
    author: bytes, headers: list[bytes], bodies: list[bytes | None], head: Head
) -> dict[str, Any]:
    return {"t": "log.entries", "author": author, "headers": headers, "bodies": bodies,
            "head": head.to_wire()}


def batch_size(headers: Sequence[bytes], bodies: Sequence[bytes | None]) -> int:
    # (filter(None) drops empty bodies too, which count 0: mapped in C, no Python per body)
    return sum(map(len, headers)) + sum(map(len, filter(None, bodies)))


_EMPTY_BLAKE2B_256 = blake2b(digest_size=32)


def verify_batch(
    batch: Batch, tip_seq: int, tip_hash: bytes, is_author_allowed: Callable[[bytes], bool],
    *, hlc_bound: int = MAX_HLC,
) -> VerifiedBatch:
    """Check a batch against our chain tip for its author (Rules 1-3) and return its new
    entries (those past tip_seq; an overlap with what we have must match our chain).
    A new entry with an hlc above hlc_bound (see hlc_limit) refuses the batch ("clock-ahead").

    Raises EntryRejected; on success nothing has been committed yet.
    """
    author = batch.author
    if not is_author_allowed(author):
        raise EntryRejected("unknown-author", "author is not a member of the circle")
    if type(author) is not bytes or len(author) != KEY_BYTES:  # (order keys hold it as is)
        raise EntryRejected("malformed", "author is not a public key")
    headers, bodies, head = batch.headers, batch.bodies, batch.head
    first = unpack_header(headers[0])[2]
    if type(first) is not int or first < 1:
        raise EntryRejected("malformed", "seq is not a sequence number")
    if head.seq != first + len(headers) - 1:
        raise EntryRejected("malformed", "the head does not cover the batch's last entry")
    if first > tip_seq + 1:
        raise EntryRejected("gap", f"batch starts at {first}, we have up to {tip_seq}")
    skip = tip_seq + 1 - first  # entries we already have
    out = VerifiedBatch(author, tip_seq + 1, last_hash=tip_hash)
    if skip >= len(headers):
        return out
    if skip and entry_hash(headers[skip - 1]) != tip_hash:
        raise EntryRejected("broken-chain", f"entry {tip_seq} differs from ours (a fork)")
    # The signature is checked before the entries so a forged batch costs one verify.
    if entry_hash(headers[-1]) != head.hash:
        raise EntryRejected("broken-chain", "the head's hash is not the last entry's")
    if not head.is_valid_for(author):
        raise EntryRejected("bad-signature", f"head {head.seq} is not signed by its author")
    prev, seq, max_hlc = tip_hash, tip_seq, 0
    o_streams, o_records, o_orders = out.streams, out.record_ids, out.orders
    not_puts: list[tuple[int, int]] = []  # (index in out, op code): their bodies are not kept
    order_key = _ORDER_KEY.pack
    # A fresh BLAKE2b-256 state per hash, copied from an empty one: about 0.1 us less per
    # hash than blake2b(data, digest_size=32), whose keyword parameters are parsed per call
    # (two hashes per entry; the template itself is never updated, so threads may share it).
    new_hash = _EMPTY_BLAKE2B_256.copy
    # Per entry, the usual case (a well-formed put) is checked inline, with the names bound
    # locally; anything else goes through unpack_header and check_header, which raise
    # exactly what they always did (the fast checks only ever accept what they accept).
    unpackb = msgpack.unpackb
    short_name = MAX_NAME_BYTES // 4  # this many characters are at most MAX_NAME_BYTES
    for i in range(skip, len(headers)):
        header = headers[i]
        fields = None
        if type(header) is bytes and len(header) <= MAX_HEADER_BYTES:
            try:
                fields = unpackb(header, use_list=False, raw=False)
            except Exception:  # noqa: BLE001 (unpack_header below says which error it is)
                fields = None
        if type(fields) is not tuple or len(fields) != 10 or fields[0] != ENTRY_VERSION:
            fields = unpack_header(header)  # raises EntryRejected
        _, h_author, h_seq, h_prev, hlc, stream, record_id, op, body_hash, body_len = fields
        seq += 1
        if h_seq != seq or type(h_seq) is not int:
            raise EntryRejected("gap", f"expected entry {seq}, got {h_seq!r}")
        if h_author != author:
            raise EntryRejected("malformed", "an entry of another author in the batch")
        if (op == "put" and seq <= MAX_SEQ and type(hlc) is int and 0 <= hlc <= MAX_HLC
                and type(h_prev) is bytes and len(h_prev) == HASH_BYTES
                and type(body_hash) is bytes and len(body_hash) == HASH_BYTES
                and type(body_len) is int and 0 <= body_len <= MAX_BODY_BYTES
                and type(stream) is str and 0 < len(stream) <= short_name
                and type(record_id) is str and 0 < len(record_id) <= short_name):
            pass
        else:
            code = check_header(author, seq, h_prev, hlc, stream, record_id, op, body_hash,
                                body_len)
            if code != PUT:
                not_puts.append((i - skip, code))
        if h_prev != prev:
            raise EntryRejected("broken-chain", f"entry {seq} does not name entry {seq - 1}")
        if hlc > hlc_bound:
            raise EntryRejected("clock-ahead", f"entry {seq} is dated more than "
                                f"{MAX_HLC_DRIFT_MS // 3_600_000} h ahead of our clock")
        body = bodies[i]
        if body is not None:
            if type(body) is not bytes:
                raise EntryRejected("malformed", "body is not bytes")
            if len(body) > MAX_BODY_BYTES:
                raise EntryRejected("oversized", f"body of {len(body)} bytes")
            hasher = new_hash()
            hasher.update(body)
            if len(body) != body_len or hasher.digest() != body_hash:
                raise EntryRejected("bad-body", f"body of entry {seq} does not match its hash")
        hasher = new_hash()
        hasher.update(header)
        prev = hasher.digest()  # entry_hash(header)
        if hlc > max_hlc:
            max_hlc = hlc
        o_streams.append(stream)
        o_records.append(record_id)
        o_orders.append(order_key(hlc, author, seq))
    # Headers and bodies as they came (one copy per batch, not an append per entry); a
    # delete's or clear's body is not kept, whatever the peer sent (with a matching hash).
    out.headers = headers[skip:]
    out.bodies = bodies[skip:]
    out.ops = [PUT] * len(out.headers)
    for index, code in not_puts:
        out.ops[index] = code
        out.bodies[index] = None
    out.heads.append(head)
    out.last_hash = prev
    out.max_hlc = max_hlc
    return out
