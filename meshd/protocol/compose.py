"""Composing local writes into entries of our own log (re-exported by log.py, whose names
the shell imports): Write, PutRun, compose_batch, compose_units, and VerifiedBatch, the
columns a composed or verified batch is committed from.

Theory of operation. compose_units() turns units of writes (one per request of a group
commit) into entries continuing our chain, signing a head at least every HEAD_EVERY_BYTES
and at the end. A unit is a sequence of Writes, or a PutRun: puts of many bodies to one
stream, each with a fresh record id, checked once for the whole run (the batch route's
usual request). A PutRun holds no object per entry, so a request of thousands of puts costs
no per-entry Python object before its composition, which walks its bodies directly. Either
way the entries are the same bytes (tests/protocol/test_compose.py compares them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from itertools import repeat
from operator import attrgetter

import msgpack

from .crypto import SigningKeyPair
from .entry import (
    CLEAR,
    DELETE,
    EMPTY_BODY_HASH,
    ENTRY_VERSION,
    HLC_COUNTER_BITS,
    MAX_BODY_BYTES,
    OP_NAMES,
    PUT,
    ZERO_HASH,
    EntryRejected,
    Head,
    InvalidRequest,
    check_name,
    sign_head,
)

# A writer signs a head at least this often (bytes of headers and bodies), so any run of a
# log can be cut into batches that end at signed heads and fit a transport message.
HEAD_EVERY_BYTES = 256 * 1024

@dataclass(slots=True)
class VerifiedBatch:
    """Entries ready to commit, as parallel columns (no per-entry objects: sync moves
    millions of entries, and the store inserts columns with executemany)."""

    author: bytes
    first_seq: int
    headers: list[bytes] = field(default_factory=list)
    bodies: list[bytes | None] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)
    record_ids: list[str] = field(default_factory=list)
    ops: list[int] = field(default_factory=list)
    orders: list[bytes] = field(default_factory=list)
    heads: list[Head] = field(default_factory=list)
    last_hash: bytes = ZERO_HASH
    max_hlc: int = 0
    # The store's packing of these columns, made before the commit by whoever composed
    # them (meshd/store/bulk.Packed; None: the store packs them as it inserts). Opaque here.
    packed: object = None

    def __len__(self) -> int:
        return len(self.headers)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.headers) - 1


@dataclass(frozen=True, slots=True)
class Write:
    """One operation an app asked for, before it becomes an entry."""

    stream: str
    record_id: str
    op: int
    body: bytes = b""

    def check(self) -> None:
        """Raises InvalidRequest unless this can become a valid entry."""
        check_write(self.stream, self.record_id, self.op, self.body)


def check_write(stream: str, record_id: str, op: int, body: bytes) -> None:
    """Write(stream, record_id, op, body).check() without building the Write."""
    if op not in (PUT, DELETE, CLEAR) or type(body) is not bytes:
        raise InvalidRequest("invalid operation")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(f"body larger than {MAX_BODY_BYTES} bytes")
    if op != PUT and body:
        raise InvalidRequest(f"{OP_NAMES[op]} takes no body")
    try:
        check_name(stream, "stream", empty=False)
        check_name(record_id, "record id", empty=op == CLEAR)
    except EntryRejected as err:
        raise InvalidRequest(str(err)) from None


class PutRun(Sequence[Write]):
    """Puts of bodies to one stream, each with a fresh record id: one unit for
    compose_units, which walks its bodies without a Write per entry. Whoever makes one has
    checked it as check_write would each put (the stream name once; each body bytes, at
    most MAX_BODY_BYTES). As a sequence it reads as those Writes (record id "": a fresh one)."""

    __slots__ = ("stream", "bodies")

    def __init__(self, stream: str, bodies: Sequence[bytes]) -> None:
        self.stream = stream
        self.bodies = bodies

    def __len__(self) -> int:
        return len(self.bodies)

    def __getitem__(self, index: int) -> Write:  # type: ignore[override]  # (no slices)
        return Write(self.stream, "", PUT, self.bodies[index])

    def __iter__(self) -> Iterator[Write]:
        return (Write(self.stream, "", PUT, body) for body in self.bodies)


def compose_batch(
    signer: SigningKeyPair,
    tip_seq: int,
    tip_hash: bytes,
    last_hlc: int,
    wall_ms: int,
    writes: Iterable[Write],
    *,
    head_every_bytes: int = HEAD_EVERY_BYTES,
    checked: bool = False,
) -> VerifiedBatch:
    """Turn local writes into entries continuing our chain, with signed heads at least every
    head_every_bytes and at the end. Raises InvalidRequest (nothing is produced then).
    checked=True: every write's check() already passed (the caller did it, one by one), except
    that a put's record id may be "": that put gets a fresh id, auto_record_id(its hlc)."""
    return compose_units(signer, tip_seq, tip_hash, last_hlc, wall_ms, [writes],
                         head_every_bytes=head_every_bytes, checked=checked)


_FIELDS = attrgetter("stream", "record_id", "op", "body")
_BLAKE2B_256 = blake2b(digest_size=32)
# An order key (protocol/logs.md): hlc, author, seq; big-endian, an author of 32 bytes.
_ORDER = struct.Struct(">Q32sQ").pack


def compose_units(
    signer: SigningKeyPair,
    tip_seq: int,
    tip_hash: bytes,
    last_hlc: int,
    wall_ms: int,
    units: Iterable[Iterable[Write]],
    *,
    head_every_bytes: int = HEAD_EVERY_BYTES,
    checked: bool = False,
) -> VerifiedBatch:
    """compose_batch of the units' writes one after the other; a PutRun unit is always
    taken as checked (see PutRun), others as `checked` says.

    Per entry this is one msgpack encoding and two hashes, with the loop's names bound
    locally: a batch request composes tens of thousands of entries (protocol/logs.md's
    header is encode_header's, byte for byte; the tests pin that)."""
    if not checked:  # (before anything is composed: a refused write produces nothing)
        for unit in units:
            if type(unit) is not PutRun:
                for write in unit:
                    write.check()
    author = bytes(signer.public)
    out = VerifiedBatch(author, tip_seq + 1, last_hash=tip_hash, max_hlc=last_hlc)
    # One Packer for the batch (packb builds one per call); its options are encode_header's.
    pack = msgpack.Packer(use_bin_type=True).pack
    headers, bodies, streams = out.headers, out.bodies, out.streams
    record_ids, ops, orders = out.record_ids, out.ops, out.orders
    prev, seq, hlc, since_head = tip_hash, tip_seq, last_hlc, 0
    floor = wall_ms << HLC_COUNTER_BITS  # next_hlc(hlc, wall_ms), inlined
    tag = author[:6].hex()
    # A copy of an empty BLAKE2b-256 state is one: updated and digested, the same hash as
    # blake2b(data, digest_size=32) for ~150 ns less than making one with its arguments.
    fresh = _BLAKE2B_256.copy
    for unit in units:
        if type(unit) is PutRun and len(author) == 32:  # (_ORDER's layout)
            # A PutRun's loop: its columns that are one value (stream, op) or its own
            # (bodies) are extended in C after it, and it does per entry only what differs.
            stream, put = unit.stream, OP_NAMES[PUT]
            for body in unit.bodies:
                seq += 1
                hlc = hlc + 1 if hlc >= floor else floor
                record_id = "%016x.%s" % (hlc, tag)  # noqa: UP031 - auto_record_id; 60 ns faster
                if body:
                    hash = fresh()
                    hash.update(body)
                    body_hash = hash.digest()
                else:
                    body_hash = EMPTY_BODY_HASH
                header = pack([ENTRY_VERSION, author, seq, prev, hlc, stream, record_id, put,
                               body_hash, len(body)])
                hash = fresh()
                hash.update(header)
                prev = hash.digest()
                headers.append(header)
                record_ids.append(record_id)
                orders.append(_ORDER(hlc, author, seq))
                since_head += len(header) + len(body)
                if since_head >= head_every_bytes:
                    out.heads.append(sign_head(signer, seq, prev))
                    since_head = 0
            bodies.extend(unit.bodies)
            streams.extend(repeat(stream, len(unit.bodies)))
            ops.extend(repeat(PUT, len(unit.bodies)))
            continue
        # A unit's rows (stream, record id, op, body), made in C.
        rows: Iterable[tuple[str, str, int, bytes]] = (
            zip(repeat(unit.stream), repeat(""), repeat(PUT), unit.bodies)
            if type(unit) is PutRun else map(_FIELDS, unit))
        for stream, record_id, op, body in rows:
            seq += 1
            hlc = hlc + 1 if hlc >= floor else floor
            if not record_id and op == PUT:
                record_id = f"{hlc:016x}.{tag}"  # auto_record_id(hlc, author)
            if body:
                hash = fresh()
                hash.update(body)
                body_hash = hash.digest()
            else:
                body_hash = EMPTY_BODY_HASH
            header = pack([ENTRY_VERSION, author, seq, prev, hlc, stream, record_id,
                           OP_NAMES[op], body_hash, len(body)])
            hash = fresh()
            hash.update(header)
            prev = hash.digest()
            headers.append(header)
            bodies.append(body if op == PUT else None)
            streams.append(stream)
            record_ids.append(record_id)
            ops.append(op)
            orders.append(_ORDER(hlc, author, seq) if len(author) == 32 else
                          hlc.to_bytes(8, "big") + author + seq.to_bytes(8, "big"))
            since_head += len(header) + len(body)
            if since_head >= head_every_bytes:
                out.heads.append(sign_head(signer, seq, prev))
                since_head = 0
    if seq > tip_seq and (not out.heads or out.heads[-1].seq != seq):
        out.heads.append(sign_head(signer, seq, prev))
    out.last_hash, out.max_hlc = prev, hlc
    return out


def auto_record_id(hlc: int, author: bytes) -> str:
    """A fresh record id for a put without one: time-ordered, so the store appends."""
    return f"{hlc:016x}.{author[:6].hex()}"


def split_units(units: Sequence[Sequence[Write]], entries: int) -> list[list[Sequence[Write]]]:
    """units cut into parts of at most `entries` writes each, in order (a unit may be cut
    across parts; a PutRun's pieces are PutRuns). Composed one after the other, each from
    the last one's tip and with the same wall_ms, the parts give the entries the whole
    gives, plus a signed head at the end of each part."""
    parts: list[list[Sequence[Write]]] = [[]]
    room = entries
    for unit in units:
        start = 0
        while start < len(unit):
            if not room:
                parts.append([])
                room = entries
            end = min(len(unit), start + room)
            parts[-1].append(unit if start == 0 and end == len(unit) else
                             PutRun(unit.stream, unit.bodies[start:end]) if type(unit) is PutRun
                             else unit[start:end])
            room -= end - start
            start = end
    return parts


def joined(batches: Sequence[VerifiedBatch]) -> VerifiedBatch:
    """One batch of consecutive batches of one author (each continuing the last)."""
    out = VerifiedBatch(batches[0].author, batches[0].first_seq,
                        last_hash=batches[-1].last_hash, max_hlc=batches[-1].max_hlc)
    for batch in batches:
        out.headers += batch.headers
        out.bodies += batch.bodies
        out.streams += batch.streams
        out.record_ids += batch.record_ids
        out.ops += batch.ops
        out.orders += batch.orders
        out.heads += batch.heads
    return out
