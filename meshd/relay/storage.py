"""The relay's SQLite storage: one file in WAL mode (the default engine).

The interface and the contract every engine keeps are in backend.py; their names are
re-exported here, where the relay server and the tests have always imported them.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import msgpack

from .backend import (
    INCARNATION_BYTES,
    PURGE_BOUND_S,
    PURGE_DEBOUNCE_S,
    NewEnvelope,
    RelayStorage,
    StorageEvent,
    StorageUnavailable,
    StoredBackup,
)

__all__ = ["DATABASE_FILE", "INCARNATION_BYTES", "PURGE_BOUND_S", "PURGE_DEBOUNCE_S",
           "NewEnvelope", "RelayStorage", "SQLiteRelayStorage", "StorageEvent",
           "StorageUnavailable", "StoredBackup"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS circles (
    circle_id BLOB PRIMARY KEY,
    records BLOB NOT NULL            -- msgpack array of encoded records
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS envelopes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- AUTOINCREMENT: ids are never reused
    circle_id BLOB NOT NULL,
    mailbox BLOB NOT NULL,
    expires_at REAL NOT NULL,
    envelope BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS envelopes_by_mailbox ON envelopes (circle_id, mailbox, id);
CREATE INDEX IF NOT EXISTS envelopes_by_expiry ON envelopes (expires_at);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL              -- 'incarnation': random, created with the database
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backups (
    circle_id BLOB PRIMARY KEY,
    version INTEGER NOT NULL,
    blob BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segments (
    circle_id BLOB NOT NULL,
    id BLOB NOT NULL,
    blob BLOB NOT NULL,
    device BLOB,                     -- the key that stored it (backend.py: b"" and NULL)
    PRIMARY KEY (circle_id, id)
);
"""
# A database made before segments had an owner gains the column, its rows marked b"" (stored
# before: listed to every member); a row stored later with no owner keeps NULL (backend.py).
# (NULL -> x'' keeps each record's size: SQLite overwrites it in place, no blob is copied.)
ADD_SEGMENT_OWNER: list[tuple[str, tuple[object, ...]]] = [("ALTER TABLE segments ADD COLUMN device BLOB", ()),
                     ("UPDATE segments SET device = x''", ())]
# A page of segments_of reads the key's rows and the b"" rows by this index (never the rows of
# the circle's other keys); added after the column, to a database made before it too.
SEGMENTS_BY_DEVICE = "CREATE INDEX IF NOT EXISTS segments_by_device ON segments (circle_id, device, id)"
# Each side of the UNION reads at most `limit` rows by segments_by_device; UNION (not ALL):
# a key b"" would list the old rows twice.
SEGMENTS_OF = """
SELECT id, size FROM (SELECT id, length(blob) AS size FROM segments
    WHERE circle_id = :circle AND device = :device AND id > :after ORDER BY id LIMIT :limit)
UNION
SELECT id, size FROM (SELECT id, length(blob) AS size FROM segments
    WHERE circle_id = :circle AND device = x'' AND id > :after ORDER BY id LIMIT :limit)
ORDER BY id LIMIT :limit"""

DATABASE_FILE = "relay.sqlite3"
# The WAL is truncated back to this size after a checkpoint (else it keeps its largest size).
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024
# The page cache of the connection that writes segments and backups (see __init__), in KiB.
BLOB_CACHE_KIB = 256


def _private_files(path: Path) -> None:
    """The database, its WAL and shared-memory files 0600 whatever the umask (protocol/relay.md).

    Created 0600 before SQLite opens it (SQLite gives -wal and -shm the database's mode);
    files left wider by an older relay are narrowed.
    """
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and file.stat().st_mode & 0o077:
            file.chmod(0o600)


class SQLiteRelayStorage(RelayStorage):
    """One SQLite file in WAL mode: a writer, a reader, and a writer of large blobs."""

    def __init__(self, path: Path, *, rng: Callable[[int], bytes] = os.urandom) -> None:
        self.path = path
        _private_files(path)
        self._writer = self._connect(path)
        # Deleted envelopes and replaced backups are overwritten in the pages they leave.
        self._writer.execute("PRAGMA secure_delete=ON")
        self._writer.executescript(SCHEMA)
        if "device" not in {row[1] for row in self._writer.execute("PRAGMA table_info(segments)")}:
            self._write(ADD_SEGMENT_OWNER)
        self._writer.execute(SEGMENTS_BY_DEVICE)
        # Created once, with the database: a wiped directory gets a new one.
        self._write([("INSERT OR IGNORE INTO meta (key, value) VALUES ('incarnation', ?)",
                      (rng(INCARNATION_BYTES),))])
        self._incarnation = bytes(self._writer.execute(
            "SELECT value FROM meta WHERE key = 'incarnation'").fetchone()[0])
        self._reader = self._connect(path)
        # Segments and backups are written through a connection that keeps no statement: a
        # cached statement keeps its last bound parameters until it runs again, and Python's
        # sqlite3 binds bytes as a copy (SQLITE_TRANSIENT), so the writer held the last
        # segment (up to 4 MiB) and backup (up to 15 MiB) it stored for good (issue 20). Its
        # page cache is small: the blob's pages go to the WAL, nothing reads them back here.
        self._blobs = self._connect(path, cached_statements=0)
        self._blobs.execute("PRAGMA secure_delete=ON")
        self._blobs.execute(f"PRAGMA cache_size=-{BLOB_CACHE_KIB}")

    def incarnation(self) -> bytes:
        return self._incarnation

    def purge(self) -> bool:
        # The WAL keeps the page images from before a deletion until a checkpoint copies the
        # overwritten pages back and TRUNCATE empties it (-shm holds only the WAL's index).
        busy, _, _ = self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy

    @staticmethod
    def _connect(path: Path, cached_statements: int = 128) -> sqlite3.Connection:
        # check_same_thread=False: the writer is used by one worker thread at a time.
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                     cached_statements=cached_statements)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA busy_timeout=10000")
        connection.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        return connection

    def _write(self, statements: list[tuple[str, tuple[object, ...]]],
               db: sqlite3.Connection | None = None) -> list[sqlite3.Cursor]:
        db = db or self._writer
        cursors = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                cursors.append(db.execute(sql, params))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return cursors

    def circle_records(self, circle_id: bytes) -> list[bytes] | None:
        row = self._reader.execute(
            "SELECT records FROM circles WHERE circle_id = ?", (circle_id,)).fetchone()
        return None if row is None else list(msgpack.unpackb(row[0], raw=False))

    def all_circle_records(self) -> list[tuple[bytes, list[bytes]]]:
        return [(circle_id, list(msgpack.unpackb(records, raw=False)))
                for circle_id, records in self._reader.execute("SELECT circle_id, records FROM circles")]

    def save_circle_records(self, circle_id: bytes, records: Sequence[bytes]) -> None:
        packed = msgpack.packb(list(records), use_bin_type=True)
        self._write([("INSERT INTO circles (circle_id, records) VALUES (?, ?) "
                      "ON CONFLICT (circle_id) DO UPDATE SET records = excluded.records",
                      (circle_id, packed))])

    def add_envelopes(self, items: Sequence[NewEnvelope]) -> list[int]:
        db = self._writer
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO envelopes (circle_id, mailbox, expires_at, envelope) VALUES (?, ?, ?, ?)",
                [(i.circle_id, i.mailbox, i.expires_at, i.envelope) for i in items])
            # One writer, one transaction, AUTOINCREMENT: the new ids are consecutive.
            last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return list(range(last - len(items) + 1, last + 1))

    def envelopes_after(
        self, circle_id: bytes, mailbox: bytes, after: int, *, now: float, limit: int,
        max_bytes: int,
    ) -> tuple[list[tuple[int, bytes]], bool]:
        rows = self._reader.execute(
            "SELECT id, envelope FROM envelopes WHERE circle_id = ? AND mailbox = ? AND id > ? "
            "AND expires_at > ? ORDER BY id LIMIT ?",
            (circle_id, mailbox, after, now, limit + 1)).fetchall()
        items: list[tuple[int, bytes]] = []
        size = 0
        for envelope_id, envelope in rows[:limit]:
            if items and size + len(envelope) > max_bytes:
                return items, True
            items.append((envelope_id, envelope))
            size += len(envelope)
        return items, len(rows) > limit

    def delete_through(self, circle_id: bytes, mailbox: bytes, upto: int) -> int:
        where = "circle_id = ? AND mailbox = ? AND id <= ?"
        count, _ = self._write([
            (f"SELECT coalesce(sum(length(envelope)), 0) FROM envelopes WHERE {where}",
             (circle_id, mailbox, upto)),
            (f"DELETE FROM envelopes WHERE {where}", (circle_id, mailbox, upto)),
        ])
        return int(count.fetchone()[0])

    def delete_expired(self, now: float) -> dict[bytes, int]:
        freed, _ = self._write([
            ("SELECT circle_id, sum(length(envelope)) FROM envelopes WHERE expires_at <= ? "
             "GROUP BY circle_id", (now,)),
            ("DELETE FROM envelopes WHERE expires_at <= ?", (now,)),
        ])
        return {circle_id: int(size) for circle_id, size in freed.fetchall()}

    def usage(self) -> dict[bytes, int]:
        totals: dict[bytes, int] = {}
        for circle_id, size in self._reader.execute(
            "SELECT circle_id, sum(length(envelope)) FROM envelopes GROUP BY circle_id "
            "UNION ALL SELECT circle_id, length(blob) FROM backups "
            "UNION ALL SELECT circle_id, sum(length(blob)) FROM segments GROUP BY circle_id"
        ):
            totals[circle_id] = totals.get(circle_id, 0) + int(size)
        return totals

    def backup(self, circle_id: bytes) -> StoredBackup | None:
        row = self._reader.execute(
            "SELECT version, blob FROM backups WHERE circle_id = ?", (circle_id,)).fetchone()
        return None if row is None else StoredBackup(row[0], row[1])

    def put_backup(
        self, circle_id: bytes, expected_version: int, version: int, blob: bytes
    ) -> StoredBackup | None:
        db = self._blobs  # see __init__
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT version, blob FROM backups WHERE circle_id = ?", (circle_id,)).fetchone()
            current = 0 if row is None else row[0]
            if current != expected_version:
                db.execute("ROLLBACK")
                return StoredBackup(row[0], row[1]) if row else StoredBackup(0, b"")
            db.execute(
                "INSERT INTO backups (circle_id, version, blob) VALUES (?, ?, ?) "
                "ON CONFLICT (circle_id) DO UPDATE SET version = excluded.version, "
                "blob = excluded.blob", (circle_id, version, blob))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return None

    def put_segment(self, circle_id: bytes, segment_id: bytes, blob: bytes, device: bytes | None = None) -> bool:
        (cursor,) = self._write([("INSERT INTO segments (circle_id, id, blob, device) VALUES (?, ?, ?, ?) "
                                  "ON CONFLICT DO NOTHING", (circle_id, segment_id, blob, device))],
                               self._blobs)  # see __init__
        return cursor.rowcount == 1

    def segments_of(self, circle_id: bytes, device: bytes, after: bytes, limit: int) -> list[tuple[bytes, int]]:
        rows = self._reader.execute(SEGMENTS_OF, {"circle": circle_id, "device": device,
                                                  "after": after, "limit": limit})
        return [(bytes(i), int(size)) for i, size in rows]

    def segment(self, circle_id: bytes, segment_id: bytes) -> bytes | None:
        row = self._reader.execute("SELECT blob FROM segments WHERE circle_id = ? AND id = ?",
                                   (circle_id, segment_id)).fetchone()
        return None if row is None else bytes(row[0])

    def delete_segments(self, circle_id: bytes, segment_ids: Sequence[bytes]) -> int:
        marks = ",".join("?" * len(segment_ids))
        if not segment_ids:
            return 0
        where = f"circle_id = ? AND id IN ({marks})"
        size, _ = self._write([
            (f"SELECT coalesce(sum(length(blob)), 0) FROM segments WHERE {where}", (circle_id, *segment_ids)),
            (f"DELETE FROM segments WHERE {where}", (circle_id, *segment_ids)),
        ])
        return int(size.fetchone()[0])

    def close(self) -> None:
        self._reader.close()
        self._blobs.close()
        self._writer.close()
