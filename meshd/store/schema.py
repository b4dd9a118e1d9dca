"""The store's schema (its migrations) and the set-based statements that keep the view.

See db.py's module comment for the design: integer keys everywhere (an entry's key is
author_id << SEQ_BITS | seq), bodies in their own table, and `records`, the materialised
view, maintained per batch by the statements below rather than per row.
"""

from __future__ import annotations

import sqlite3

from ..protocol.entry import order_key, unpack_header

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
    # them for winners; a batch's come from temp.incoming): about 80 B less per entry.
    """
    ALTER TABLE entries DROP COLUMN record_id;
    ALTER TABLE entries DROP COLUMN ord;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

# The batch being committed, on the write connection only (in memory: temp_store=MEMORY):
# the view's statements below read each entry's stream, record id, op and order key from
# it, so the entries table need not store what the header already holds.
CREATE_INCOMING = """
CREATE TEMP TABLE incoming(
    id INTEGER PRIMARY KEY, stream_id INTEGER NOT NULL, record_id TEXT NOT NULL,
    op INTEGER NOT NULL, ord BLOB NOT NULL)
"""
INSERT_INCOMING = "INSERT INTO temp.incoming(id, stream_id, record_id, op, ord) VALUES (?, ?, ?, ?, ?)"
CLEAR_INCOMING = "DELETE FROM temp.incoming"

# Bodies of old winners that a batch supersedes (before the view is updated).
PURGE_SUPERSEDED = """
DELETE FROM bodies WHERE id IN (
    SELECT r.entry_id FROM temp.incoming e
    JOIN records r ON r.stream_id = e.stream_id AND r.record_id = e.record_id
    WHERE e.op != 2 AND r.ord < e.ord)
"""
# The view: the later entry by order key wins; entries at or before a clear never enter.
UPSERT_RECORDS = """
INSERT INTO records(stream_id, record_id, ord, entry_id, live)
    SELECT e.stream_id, e.record_id, e.ord, e.id, e.op = 0
    FROM temp.incoming e JOIN streams s ON s.id = e.stream_id
    WHERE e.op != 2 AND e.ord > s.clear_ord
    ORDER BY e.id
ON CONFLICT(stream_id, record_id) DO UPDATE
    SET ord = excluded.ord, entry_id = excluded.entry_id, live = excluded.live
    WHERE excluded.ord > records.ord
"""
# Bodies of this batch (ids ?1..?2) that did not end up as a live winner (lost, deleted,
# cleared).
PURGE_LOSERS = """
DELETE FROM bodies WHERE id BETWEEN ?1 AND ?2 AND NOT EXISTS (
    SELECT 1 FROM temp.incoming e
    JOIN records r ON r.stream_id = e.stream_id AND r.record_id = e.record_id
    WHERE e.id = bodies.id AND r.entry_id = e.id AND r.live)
"""

# Rebuilding the view of some streams from their entries (after entries were dropped: a
# removed member's past its removal point), in one scan of entries each. ?1 is a JSON list
# of stream ids. SQLite takes a bare column of a max() aggregate from the row holding the
# maximum. header_ord and header_record_id (register_functions) read a stored header. No body needs purging after: dropping entries only makes older entries win, and
# their bodies went when they lost.
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


def statements(script: str) -> list[str]:
    """A migration script's statements, one by one."""
    return [s.strip() for s in script.split(";") if s.strip()]


def header_ord(header: bytes) -> bytes:
    """The view's order key of a stored (verified) header."""
    fields = unpack_header(bytes(header))
    return order_key(fields[4], fields[1], fields[2])


def header_record_id(header: bytes) -> str:
    record_id: str = unpack_header(bytes(header))[6]
    return record_id


def register_functions(db: sqlite3.Connection) -> None:
    """The SQL functions header_ord(header) and header_record_id(header) on a connection:
    the few statements that need an entry's order key or record id outside the view (a
    rebuild after a cut, a head dated before a time) read them from its header."""
    db.create_function("header_ord", 1, header_ord, deterministic=True)
    db.create_function("header_record_id", 1, header_record_id, deterministic=True)
