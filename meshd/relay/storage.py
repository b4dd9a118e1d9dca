"""The relay's storage: a small interface and its SQLite implementation.

The relay server needs only the methods of RelayStorage, so another engine (a database
shared by several relay instances) can replace SQLiteRelayStorage without touching the
protocol code. Contract for every implementation:

- A write method returns only once its effect is durable (it survives a crash or kill -9 of
  the process; SQLite: WAL, synchronous=FULL, one transaction per call).
- Write methods may be called from a worker thread, one at a time; read methods are called
  from the event loop's thread, possibly while a write is in progress.
- Envelope ids increase and are never reused within a mailbox, even after deletion, because
  devices use them as cursors.
"""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack


@dataclass(frozen=True, slots=True)
class NewEnvelope:
    circle_id: bytes
    mailbox: bytes
    envelope: bytes
    expires_at: float  # wall-clock seconds


@dataclass(frozen=True, slots=True)
class StoredBackup:
    version: int
    blob: bytes


class RelayStorage(abc.ABC):
    # -- circles --
    @abc.abstractmethod
    def circle_records(self, circle_id: bytes) -> list[bytes] | None:
        """The newest record set stored for the circle, or None."""

    @abc.abstractmethod
    def save_circle_records(self, circle_id: bytes, records: Sequence[bytes]) -> None:
        """Replace the circle's record set (write)."""

    @abc.abstractmethod
    def all_circle_records(self) -> list[tuple[bytes, list[bytes]]]:
        """Every circle's record set (read at start-up)."""

    # -- mailboxes --
    @abc.abstractmethod
    def add_envelopes(self, items: Sequence[NewEnvelope]) -> list[int]:
        """Store all items in one transaction (write); their ids, in order."""

    @abc.abstractmethod
    def envelopes_after(
        self, circle_id: bytes, mailbox: bytes, after: int, *, now: float, limit: int,
        max_bytes: int,
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """Unexpired envelopes with id > after, in id order, and whether more remain.

        Returns at least one envelope when any is available, even past max_bytes.
        """

    @abc.abstractmethod
    def delete_through(self, circle_id: bytes, mailbox: bytes, upto: int) -> int:
        """Delete the mailbox's envelopes with id <= upto (write). Returns the bytes freed."""

    @abc.abstractmethod
    def delete_expired(self, now: float) -> dict[bytes, int]:
        """Delete every envelope past its expiry (write). Returns bytes freed per circle."""

    @abc.abstractmethod
    def usage(self) -> dict[bytes, int]:
        """Bytes stored per circle: envelopes plus backup."""

    # -- backups --
    @abc.abstractmethod
    def backup(self, circle_id: bytes) -> StoredBackup | None:
        """The circle's current backup, or None."""

    @abc.abstractmethod
    def put_backup(
        self, circle_id: bytes, expected_version: int, version: int, blob: bytes
    ) -> StoredBackup | None:
        """Compare-and-swap (write): store (version, blob) if the stored version is
        expected_version (0 = none yet). Returns None on success, else the current backup."""

    # -- backup segments (immutable blobs named by the device; protocol/relay.md) --
    @abc.abstractmethod
    def put_segment(self, circle_id: bytes, segment_id: bytes, blob: bytes) -> bool:
        """Store a segment (write); False (nothing stored) if the id already exists."""

    @abc.abstractmethod
    def segment(self, circle_id: bytes, segment_id: bytes) -> bytes | None:
        """A stored segment, or None."""

    @abc.abstractmethod
    def delete_segments(self, circle_id: bytes, segment_ids: Sequence[bytes]) -> int:
        """Delete these segments of the circle (write); the bytes freed."""

    @abc.abstractmethod
    def close(self) -> None: ...


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
CREATE TABLE IF NOT EXISTS backups (
    circle_id BLOB PRIMARY KEY,
    version INTEGER NOT NULL,
    blob BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segments (
    circle_id BLOB NOT NULL,
    id BLOB NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (circle_id, id)
);
"""

DATABASE_FILE = "relay.sqlite3"
# The WAL is truncated back to this size after a checkpoint (else it keeps its largest size).
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024


class SQLiteRelayStorage(RelayStorage):
    """One SQLite file in WAL mode: a writer connection and a reader connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = self._connect(path)
        self._writer.executescript(SCHEMA)
        self._reader = self._connect(path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # check_same_thread=False: the writer is used by one worker thread at a time.
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA busy_timeout=10000")
        connection.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        return connection

    def _write(self, statements: list[tuple[str, tuple[object, ...]]]) -> list[sqlite3.Cursor]:
        cursors = []
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                cursors.append(self._writer.execute(sql, params))
        except BaseException:
            self._writer.execute("ROLLBACK")
            raise
        self._writer.execute("COMMIT")
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
        db = self._writer
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

    def put_segment(self, circle_id: bytes, segment_id: bytes, blob: bytes) -> bool:
        (cursor,) = self._write([("INSERT INTO segments (circle_id, id, blob) VALUES (?, ?, ?) "
                                  "ON CONFLICT DO NOTHING", (circle_id, segment_id, blob))])
        return cursor.rowcount == 1

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
        self._writer.close()
