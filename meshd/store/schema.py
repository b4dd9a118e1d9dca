"""The store's schema (its migrations) and the set-based statements that keep the view.

See db.py's module comment for the design: integer keys everywhere (an entry's key is
author_id << SEQ_BITS | seq), bodies in their own table, and `records`, the materialised
view, maintained per batch by the statements below rather than per row.
"""

from __future__ import annotations

import json
import sqlite3

import msgpack

from ..protocol.entry import order_key
from .errors import StoreError

SEQ_BITS = 40

MIGRATIONS: list[str] = [
    # 0 -> 1
    """
    CREATE TABLE authors(
        id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE,
        seq INTEGER NOT NULL DEFAULT 0, hash BLOB NOT NULL);
    CREATE TABLE streams(
        id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, clear_ord BLOB NOT NULL DEFAULT x'');
    CREATE TABLE entries(
        id INTEGER PRIMARY KEY, header BLOB NOT NULL, stream_id INTEGER NOT NULL,
        record_id TEXT NOT NULL, op INTEGER NOT NULL, ord BLOB NOT NULL);
    CREATE TABLE bodies(id INTEGER PRIMARY KEY, body BLOB NOT NULL);
    CREATE TABLE heads(id INTEGER PRIMARY KEY, sig BLOB NOT NULL);
    CREATE TABLE records(
        stream_id INTEGER NOT NULL, record_id TEXT NOT NULL, ord BLOB NOT NULL,
        entry_id INTEGER NOT NULL, live INTEGER NOT NULL,
        PRIMARY KEY(stream_id, record_id)) WITHOUT ROWID;
    CREATE INDEX records_order ON records(stream_id, ord);
    CREATE TABLE circle_records(id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, data BLOB NOT NULL);
    CREATE TABLE state(key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
    """,
    # 1 -> 2: an entry's record id and order key are read from its header (the view holds
    # them for winners; a batch's come with it, see BATCH): about 80 B less per entry.
    """
    ALTER TABLE entries DROP COLUMN record_id;
    ALTER TABLE entries DROP COLUMN ord;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

# The batch being committed, as the rows of a CTE the view's statements read it from:
# ?1 the first entry's id, ?2 a JSON array of the record ids, ?3 the order keys
# concatenated (ORDER_BYTES each), ?4 the ops, one byte each, ?5 the stream ids in ASCII
# decimal, STREAM_DIGITS bytes each, ?6 NULL, or the character that stands for NUL in ?2
# (SQLite's JSON strings end at a NUL). batch_columns makes them. The entries table need
# not store what the header already holds, and the batch costs no B-tree of its own.
ORDER_BYTES = 48
STREAM_DIGITS = 19
BATCH = f"""
WITH e(id, stream_id, op, record_id, ord) AS (
    SELECT ?1 + key, CAST(substr(?5, key * {STREAM_DIGITS} + 1, {STREAM_DIGITS}) AS INTEGER),
           substr(?4, key + 1, 1),
           CASE WHEN ?6 IS NULL THEN value ELSE replace(value, ?6, char(0)) END,
           substr(?3, key * {ORDER_BYTES} + 1, {ORDER_BYTES})
    FROM json_each(?2))
"""
_RECORD_IDS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def batch_columns(
    first: int, stream_ids: list[int], ops: list[int], record_ids: list[str], orders: list[bytes],
    view: tuple[str, bytes, bytes, str | None] | None = None,
) -> tuple[int, str, bytes, bytes, bytes, str | None]:
    """BATCH's parameters for a batch's columns (ops are 0 put, 1 delete, 2 clear); `view`:
    view_values of those columns, if made already (bulk.Packed)."""
    ids, joined, op_bytes, nul = view or view_values(ops, record_ids, orders)
    # Bytes, not text: substr() counts a text's characters from its start, a blob's bytes not.
    if len(set(stream_ids)) == 1:  # (one stream, the usual batch: no lookup per row)
        return (first, ids, joined, op_bytes, b"%019d" % stream_ids[0] * len(stream_ids), nul)
    digits = {sid: b"%019d" % sid for sid in set(stream_ids)}
    return (first, ids, joined, op_bytes, b"".join(map(digits.__getitem__, stream_ids)), nul)


def view_values(ops: list[int], record_ids: list[str], orders: list[bytes]
                ) -> tuple[str, bytes, bytes, str | None]:
    """BATCH's ?2, ?3, ?4 and ?6: what of batch_columns depends on the batch alone."""
    joined = b"".join(orders)
    if len(joined) != ORDER_BYTES * len(orders):
        raise StoreError("an order key of the batch is not ORDER_BYTES long")
    nul = None
    text = "".join(record_ids)
    if "\x00" in text:
        nul = next(c for c in map(chr, range(0xE000, 0x110000)) if c not in text)
        record_ids = [record_id.replace("\x00", nul) for record_id in record_ids]
    return _RECORD_IDS.encode(record_ids), joined, bytes(ops), nul


# The body of a winner that a newer entry supersedes goes as the view is updated (a TEMP
# trigger: it lives on the write connection, created at open; only UPSERT_RECORDS moves a
# record's entry_id).
CREATE_PURGE_SUPERSEDED = """
CREATE TEMP TRIGGER purge_superseded AFTER UPDATE OF entry_id ON main.records
WHEN old.entry_id != new.entry_id
BEGIN DELETE FROM bodies WHERE id = old.entry_id; END
"""
# The view: the later entry by order key wins; entries at or before a clear never enter.
# In any order of the batch's rows: the highest order key wins whatever came first.
UPSERT_RECORDS = BATCH + """
INSERT INTO records(stream_id, record_id, ord, entry_id, live)
    SELECT e.stream_id, e.record_id, e.ord, e.id, e.op = x'00'
    FROM e JOIN streams s ON s.id = e.stream_id
    WHERE e.op != x'02' AND e.ord > s.clear_ord
ON CONFLICT(stream_id, record_id) DO UPDATE
    SET ord = excluded.ord, entry_id = excluded.entry_id, live = excluded.live
    WHERE excluded.ord > records.ord
"""
# Bodies of this batch that did not end up as a live winner (lost, deleted, cleared).
PURGE_LOSERS = BATCH + """
DELETE FROM bodies WHERE id IN (
    SELECT e.id FROM e WHERE NOT EXISTS (
        SELECT 1 FROM records r WHERE r.stream_id = e.stream_id AND r.record_id = e.record_id
        AND r.entry_id = e.id AND r.live))
"""

# Rebuilding the view of some streams from their entries (after entries were dropped: a
# removed member's past its removal point), in one scan of entries each. ?1 is a JSON list
# of stream ids. SQLite takes a bare column of a max() aggregate from the row holding the
# maximum. header_ord and header_record_id (register_functions) read a stored header. No
# body needs purging after: dropping entries only makes older entries win, and their
# bodies went when they lost.
REBUILD_CLEARS = """
WITH clears AS MATERIALIZED (
    SELECT stream_id, max(header_ord(header)) AS ord FROM entries
    WHERE stream_id IN (SELECT value FROM json_each(?1)) AND op = 2 GROUP BY stream_id)
UPDATE streams SET clear_ord = coalesce(
    (SELECT ord FROM clears WHERE clears.stream_id = streams.id), x'')
WHERE id IN (SELECT value FROM json_each(?1))
"""
REBUILD_DROP = "DELETE FROM records WHERE stream_id IN (SELECT value FROM json_each(?1))"
REBUILD_RECORDS = """
INSERT INTO records(stream_id, record_id, ord, entry_id, live)
    SELECT e.stream_id, e.record_id, e.ord, e.id, e.op = 0 FROM (
        SELECT stream_id, header_record_id(header) AS record_id,
            max(header_ord(header)) AS ord, id, op FROM entries
        WHERE stream_id IN (SELECT value FROM json_each(?1)) AND op != 2
        GROUP BY stream_id, record_id) e
    JOIN streams s ON s.id = e.stream_id
    WHERE e.ord > s.clear_ord
"""


def apply_clear(db: sqlite3.Connection, stream_id: int, order: bytes) -> bool:
    """Apply a clear of stream_id up to order (in the write transaction); True if it
    deleted bodies."""
    db.execute("UPDATE streams SET clear_ord = ?1 WHERE id = ?2 AND clear_ord < ?1",
               (order, stream_id))
    deleted = db.execute("DELETE FROM bodies WHERE id IN (SELECT entry_id FROM records "
                         "WHERE stream_id = ? AND ord <= ?)", (stream_id, order)).rowcount
    db.execute("DELETE FROM records WHERE stream_id = ? AND ord <= ?", (stream_id, order))
    return deleted > 0


def statements(script: str) -> list[str]:
    """A migration script's statements, one by one."""
    return [s.strip() for s in script.split(";") if s.strip()]


class _HeaderFields:
    """The record id and order key of stored (verified) headers, for SQL: a statement asks
    for both of one row's header in turn, so the last one decoded is kept."""

    def __init__(self) -> None:
        self._header: bytes | None = None
        self._fields: tuple[str, bytes] = ("", b"")

    def _decode(self, header: bytes) -> tuple[str, bytes]:
        if header != self._header:
            fields = msgpack.unpackb(header, use_list=False, raw=False)
            self._header = header
            self._fields = (fields[6], order_key(fields[4], fields[1], fields[2]))
        return self._fields

    def order(self, header: bytes) -> bytes:
        return self._decode(header)[1]

    def record_id(self, header: bytes) -> str:
        return self._decode(header)[0]


def register_functions(db: sqlite3.Connection) -> None:
    """The SQL functions header_ord(header) and header_record_id(header) on a connection:
    the few statements that need an entry's order key or record id outside the view (a
    rebuild after a cut, a head dated before a time) read them from its header."""
    fields = _HeaderFields()  # one per connection: a connection runs one statement at a time
    db.create_function("header_ord", 1, fields.order, deterministic=True)
    db.create_function("header_record_id", 1, fields.record_id, deterministic=True)
