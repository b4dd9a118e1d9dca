"""The store's schema (its migrations) and the set-based statements that keep the view.

See db.py's module comment for the design: integer keys everywhere (an entry's key is
author_id << SEQ_BITS | seq), bodies in their own table, and `records`, the materialised
view, maintained per batch by the statements below rather than per row.
"""

from __future__ import annotations

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
]
SCHEMA_VERSION = len(MIGRATIONS)

# Bodies of old winners that a batch supersedes (before the view is updated).
PURGE_SUPERSEDED = """
DELETE FROM bodies WHERE id IN (
    SELECT r.entry_id FROM entries e
    JOIN records r ON r.stream_id = e.stream_id AND r.record_id = e.record_id
    WHERE e.id BETWEEN ?1 AND ?2 AND e.op != 2 AND r.ord < e.ord)
"""
# The view: the later entry by order key wins; entries at or before a clear never enter.
UPSERT_RECORDS = """
INSERT INTO records(stream_id, record_id, ord, entry_id, live)
    SELECT e.stream_id, e.record_id, e.ord, e.id, e.op = 0
    FROM entries e JOIN streams s ON s.id = e.stream_id
    WHERE e.id BETWEEN ?1 AND ?2 AND e.op != 2 AND e.ord > s.clear_ord
    ORDER BY e.id
ON CONFLICT(stream_id, record_id) DO UPDATE
    SET ord = excluded.ord, entry_id = excluded.entry_id, live = excluded.live
    WHERE excluded.ord > records.ord
"""
# Bodies of this batch that did not end up as a live winner (lost, deleted, cleared).
PURGE_LOSERS = """
DELETE FROM bodies WHERE id BETWEEN ?1 AND ?2 AND NOT EXISTS (
    SELECT 1 FROM entries e
    JOIN records r ON r.stream_id = e.stream_id AND r.record_id = e.record_id
    WHERE e.id = bodies.id AND r.entry_id = e.id AND r.live)
"""

# Rebuilding the view of some streams from their entries (after entries were dropped: a
# removed member's past its removal point), in one scan of entries each. ?1 is a JSON list
# of stream ids. SQLite takes a bare column of a max() aggregate from the row holding the
# maximum. No body needs purging after: dropping entries only makes older entries win, and
# their bodies went when they lost.
REBUILD_CLEARS = """
WITH clears AS MATERIALIZED (
    SELECT stream_id, max(ord) AS ord FROM entries
    WHERE stream_id IN (SELECT value FROM json_each(?1)) AND op = 2 GROUP BY stream_id)
UPDATE streams SET clear_ord = coalesce(
    (SELECT ord FROM clears WHERE clears.stream_id = streams.id), x'')
WHERE id IN (SELECT value FROM json_each(?1))
"""
REBUILD_DROP = "DELETE FROM records WHERE stream_id IN (SELECT value FROM json_each(?1))"
REBUILD_RECORDS = """
INSERT INTO records(stream_id, record_id, ord, entry_id, live)
    SELECT e.stream_id, e.record_id, e.ord, e.id, e.op = 0 FROM (
        SELECT stream_id, record_id, max(ord) AS ord, id, op FROM entries
        WHERE stream_id IN (SELECT value FROM json_each(?1)) AND op != 2
        GROUP BY stream_id, record_id) e
    JOIN streams s ON s.id = e.stream_id
    WHERE e.ord > s.clear_ord
"""


def statements(script: str) -> list[str]:
    """A migration script's statements, one by one."""
    return [s.strip() for s in script.split(";") if s.strip()]
