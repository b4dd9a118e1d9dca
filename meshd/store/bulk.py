"""Set-based inserts of a batch's entries and bodies: one statement per table per batch.

Why not executemany. CPython's sqlite3 releases the GIL around every sqlite3_step and takes
it back after, and executemany steps once per row: with another Python thread busy (the
receive pipeline verifies batch n+1 while batch n commits, meshd/net/receivepipe.py), each
take-back can wait for that thread's switch interval, once per row. Here a batch's rows go
in as a few parameters of one INSERT ... SELECT, so its insert is one step, one GIL release,
and no per-row Python binding: measured in bench/insert_step.py.

The parameters. A column of blobs (headers, bodies) is packed into one blob, all of them
concatenated, with a JSON array of spans (start << 32 | length, start counted from 1 as
substr() does; null for a row that has no body): json_each() yields one row per span and
substr() cuts the row's blob out of the packed one (a blob's substr is a copy of those bytes,
no scan). The stream ids and ops are fixed-width ASCII columns, as in schema.BATCH.
Every row is the one executemany inserted: same ids, same types, same bytes
(tests/shell/test_store_bulk.py compares the two, row by row).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import lshift, or_

from ..protocol.log import VerifiedBatch
from .errors import StoreError
from .schema import STREAM_DIGITS, view_values

SPAN_BITS = 32  # a span's length fits below bit 32
_LENGTH_MASK = (1 << SPAN_BITS) - 1
# A larger batch is inserted in parts (a packed column stays far below SQLite's 1 GB blob
# limit and the spans' 63 bits; catch-up batches are 256 KiB, local groups a few MiB).
MAX_PACKED_BYTES = 64 << 20

# A row's blob out of the packed one (substr() of an empty blob is NULL, not x'': an empty
# span is spelt out, or a batch whose every body is empty would have NULL bodies).
_CUT = (f"CASE WHEN value & {_LENGTH_MASK} = 0 THEN x'' "
        f"ELSE substr(?2, value >> {SPAN_BITS}, value & {_LENGTH_MASK}) END")
INSERT_BODIES = f"""
INSERT INTO bodies(id, body)
    SELECT ?1 + key, {_CUT}
    FROM json_each(?3) WHERE value IS NOT NULL
"""
INSERT_ENTRIES = f"""
INSERT INTO entries(id, header, stream_id, op)
    SELECT ?1 + key, {_CUT},
           CAST(substr(?4, key * {STREAM_DIGITS} + 1, {STREAM_DIGITS}) AS INTEGER),
           CAST(substr(?5, key + 1, 1) AS INTEGER)
    FROM json_each(?3)
"""
_OP_DIGITS = bytes.maketrans(b"\x00\x01\x02", b"012")
_SPANS = json.JSONEncoder(separators=(",", ":"))


def spans(blobs: Sequence[bytes | None]) -> tuple[bytes, str]:
    """(the blobs concatenated, the JSON array of their spans in it; null for None)."""
    if None not in blobs:
        lengths = list(map(len, blobs))  # (the usual case: every row has one, no test per row)
        packed = b"".join(blobs)  # type: ignore[arg-type]  # (no None: checked above)
        starts = accumulate(lengths, initial=1)
        # start << SPAN_BITS | length, mapped in C (map stops at the last length: there is
        # one start more, the end)
        return packed, _SPANS.encode(list(map(or_, map(lshift, starts, repeat(SPAN_BITS)),
                                              lengths)))
    present = [blob for blob in blobs if blob is not None]
    packed = b"".join(present)
    out: list[int | None] = []
    start = 1
    for blob in blobs:
        if blob is None:
            out.append(None)
        else:
            out.append(start << SPAN_BITS | len(blob))
            start += len(blob)
    return packed, _SPANS.encode(out)


@dataclass(frozen=True, slots=True)
class Packed:
    """A batch's columns as its insert's statements take them, made ahead of the insert
    (composeahead.py packs each part in its composing thread, so the writer thread, whose
    Python work between statements is the group commit's critical path, need not)."""

    columns: tuple[bytes, str, bytes, str]  # spans() of the headers, then of the bodies
    view: tuple[str, bytes, bytes, str | None]  # schema.view_values of the batch


def pack(batch: VerifiedBatch) -> Packed | None:
    """batch's Packed; None for columns over MAX_PACKED_BYTES (insert_rows cuts those)."""
    headers, bodies = batch.headers, batch.bodies
    if sum(map(len, headers)) + sum(map(len, filter(None, bodies))) > MAX_PACKED_BYTES:
        return None
    return Packed((*spans(headers), *spans(bodies)),
                  view_values(batch.ops, batch.record_ids, batch.orders))


def insert_rows(db: sqlite3.Connection, first: int, headers: Sequence[bytes],
                bodies: Sequence[bytes | None], stream_digits: bytes, ops: bytes) -> None:
    """Insert a batch's entries (ids first, first + 1, ...) and its bodies (None: no row).
    stream_digits and ops are schema.batch_columns' ?5 and ?4 (STREAM_DIGITS ASCII digits
    per row; one byte per row, 0 put, 1 delete, 2 clear)."""
    count = len(headers)
    if len(bodies) != count or len(ops) != count or len(stream_digits) != count * STREAM_DIGITS:
        raise StoreError("the batch's columns differ in length")
    # (measured before anything is joined: a large group is not copied whole first)
    if count > 1 and (sum(map(len, headers)) + sum(map(len, filter(None, bodies)))
                      > MAX_PACKED_BYTES):
        half = count // 2
        cut = half * STREAM_DIGITS
        insert_rows(db, first, headers[:half], bodies[:half], stream_digits[:cut], ops[:half])
        insert_rows(db, first + half, headers[half:], bodies[half:], stream_digits[cut:],
                    ops[half:])
        return
    insert_packed(db, first, *spans(headers), *spans(bodies), stream_digits, ops)


def insert_packed(db: sqlite3.Connection, first: int, header_blob: bytes, header_spans: str,
                  body_blob: bytes, body_spans: str, stream_digits: bytes, ops: bytes) -> None:
    """insert_rows of columns already packed (spans(); one part, within MAX_PACKED_BYTES)."""
    db.execute(INSERT_BODIES, (first, body_blob, body_spans))
    db.execute(INSERT_ENTRIES, (first, header_blob, header_spans, stream_digits,
                                ops.translate(_OP_DIGITS)))
