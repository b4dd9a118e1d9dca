"""The relay's storage on PostgreSQL: several relay processes, one database.

`meshd relay --database postgresql://...` selects it. Every method blocks on the network, so
the relay server calls them from worker threads (RelayStorage.blocking_reads); connections
come from a psycopg_pool pool, one per call. What makes several processes one relay:

- Envelope ids come from one sequence, and the envelopes of a mailbox are inserted under a
  transaction-scoped advisory lock on that mailbox, taken before the ids are drawn: ids of
  a mailbox commit in id order, so a device's cursor never passes an id still uncommitted
  in another process.
- Each write transaction also sends a NOTIFY (delivered only if it commits) that the other
  processes turn into pushes to their subscribers and into their view of each circle's
  usage (quotas); see StorageEvent.
- Backups are a compare-and-swap on a row lock; circle records a read-modify-write on one.
- The TTL sweep runs in one process at a time (a try-lock: the others skip that round).
- The schema is versioned in the database (relay_schema) and migrated under an advisory
  lock, so processes started together migrate it once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgpack
import psycopg
import psycopg_pool

from .backend import NewEnvelope, RelayStorage, StorageEvent, StorageUnavailable, StoredBackup
from .postgres_events import EventListener, notify
from .postgres_schema import INCARNATION_BYTES, MIGRATIONS, SEGMENTS_OF

log = logging.getLogger(__name__)

# Advisory lock keys (bigint) of this schema; mailbox and circle locks are hashes below.
MIGRATION_LOCK = 0x6D65736864_01  # "meshd" 1
SWEEP_LOCK = 0x6D65736864_02
POOL_SIZE = 8


class PostgresStorageError(Exception):
    """The database could not be opened or migrated (the message names no secret)."""


def _lock_key(*parts: bytes) -> int:
    """A signed 64-bit advisory lock key for these bytes."""
    digest = hashlib.blake2b(b"".join(parts), digest_size=8, person=b"meshd-lock").digest()
    return int.from_bytes(digest, "big", signed=True)


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparseable DSN)"
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo(**{k: v for k, v in info.items() if v is not None})


class PostgresRelayStorage(RelayStorage):
    shared = True
    blocking_reads = True

    def __init__(self, dsn: str, *, pool_size: int = POOL_SIZE) -> None:
        self.dsn = dsn
        # This process's events come back on the channel too: they carry its origin token.
        self.origin = secrets.token_hex(8)
        try:
            # Listening from the start (the server reads its initial state after this
            # constructor); connecting it first also fails fast on a wrong DSN.
            self._listener = EventListener(dsn, self.origin)
        except psycopg.Error as err:
            raise PostgresStorageError(
                f"cannot connect to PostgreSQL at {redact(dsn)}: {type(err).__name__}") from None
        self._pool = psycopg_pool.ConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=False, kwargs={"autocommit": True},
            name="meshd-relay")
        try:
            self._pool.open(wait=True, timeout=30)
            self.schema_version = self._migrate()
        except (psycopg.Error, psycopg_pool.PoolTimeout, StorageUnavailable) as err:
            self.close()
            raise PostgresStorageError(
                f"cannot use the PostgreSQL database at {redact(dsn)}: {type(err).__name__}"
            ) from None
        except BaseException:
            self.close()
            raise

    # -- plumbing --

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; the server unreachable is StorageUnavailable (typed: the
        relay answers `internal` and keeps the device's connection)."""
        try:
            with self._pool.connection() as connection:
                yield connection
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as err:
            raise StorageUnavailable(
                f"PostgreSQL: {type(err).__name__} {getattr(err, 'sqlstate', '') or ''}".rstrip()
            ) from None

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with self._connection() as connection, connection.transaction():
            yield connection

    def _migrate(self) -> int:
        with self._transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS relay_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM relay_schema").fetchone()
            version = 0 if row is None else int(row[0])
            if version > len(MIGRATIONS):
                raise PostgresStorageError(
                    f"the database's relay schema is version {version}; this meshd knows "
                    f"versions up to {len(MIGRATIONS)}: upgrade meshd")
            for number in range(version, len(MIGRATIONS)):
                db.execute(MIGRATIONS[number])
                log.info("relay database migrated to schema version %d", number + 1)
            if row is None:
                db.execute("INSERT INTO relay_schema (version) VALUES (%s)", (len(MIGRATIONS),))
            else:
                db.execute("UPDATE relay_schema SET version = %s", (len(MIGRATIONS),))
            # A random id created with the storage and never changed: a wiped or replaced
            # database has a new one (devices then know their cursors mean nothing here).
            db.execute("INSERT INTO relay_meta (key, value) VALUES ('incarnation', %s) "
                       "ON CONFLICT (key) DO NOTHING", (os.urandom(INCARNATION_BYTES),))
            found = db.execute("SELECT value FROM relay_meta WHERE key = 'incarnation'").fetchone()
            assert found is not None
            self._incarnation = bytes(found[0])
        return len(MIGRATIONS)

    def incarnation(self) -> bytes:
        """This storage's random id, shared by every process on the database (read once)."""
        return self._incarnation

    def purge(self) -> bool:
        """VACUUM the tables deletions leave dead rows in. Unlike SQLite's secure_delete and
        WAL checkpoint, this does not overwrite the freed bytes: PostgreSQL keeps them in
        free page space and in its WAL until reused; the operator's disk encryption and
        WAL retention settings decide how long (README, "Running a relay for many circles")."""
        with self._connection() as db:
            db.execute("VACUUM envelopes, backups, segments")
        return True

    def _notify(self, db: psycopg.Connection[Any], events: Sequence[StorageEvent]) -> None:
        notify(db, self.origin, events)

    # -- circles --

    def circle_records(self, circle_id: bytes) -> list[bytes] | None:
        with self._connection() as db:
            row = db.execute("SELECT records FROM circles WHERE circle_id = %s",
                             (circle_id,)).fetchone()
        return None if row is None else list(msgpack.unpackb(row[0], raw=False))

    def all_circle_records(self) -> list[tuple[bytes, list[bytes]]]:
        with self._connection() as db:
            rows = db.execute("SELECT circle_id, records FROM circles").fetchall()
        return [(bytes(c), list(msgpack.unpackb(r, raw=False))) for c, r in rows]

    def save_circle_records(self, circle_id: bytes, records: Sequence[bytes]) -> None:
        self.update_circle_records(circle_id, lambda stored: list(records))

    def update_circle_records(
        self, circle_id: bytes, update: Callable[[list[bytes] | None], list[bytes] | None]
    ) -> list[bytes] | None:
        with self._transaction() as db:
            # The advisory lock also covers a circle with no row yet (nothing to lock).
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(b"circle", circle_id),))
            row = db.execute("SELECT records FROM circles WHERE circle_id = %s",
                             (circle_id,)).fetchone()
            stored = None if row is None else list(msgpack.unpackb(row[0], raw=False))
            new = update(stored)
            if new is None:
                return stored
            db.execute(
                "INSERT INTO circles (circle_id, records) VALUES (%s, %s) ON CONFLICT (circle_id) "
                "DO UPDATE SET records = excluded.records",
                (circle_id, msgpack.packb(list(new), use_bin_type=True)))
            self._notify(db, [StorageEvent("records", circle_id)])
            return new

    # -- mailboxes --

    def add_envelopes(self, items: Sequence[NewEnvelope]) -> list[int]:
        if not items:
            return []
        boxes = sorted({(i.circle_id, i.mailbox) for i in items})
        with self._transaction() as db:
            # Sorted: two processes locking overlapping sets cannot deadlock.
            for circle_id, mailbox in boxes:
                db.execute("SELECT pg_advisory_xact_lock(%s)",
                           (_lock_key(b"mailbox", circle_id, mailbox),))
            with db.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO envelopes (circle_id, mailbox, expires_at, envelope) "
                    "VALUES (%s, %s, %s, %s) RETURNING id",
                    [(i.circle_id, i.mailbox, i.expires_at, i.envelope) for i in items],
                    returning=True)
                ids = []
                while True:
                    row = cursor.fetchone()
                    assert row is not None
                    ids.append(int(row[0]))
                    if not cursor.nextset():
                        break
            sizes: dict[tuple[bytes, bytes], int] = {}
            for item in items:
                key = (item.circle_id, item.mailbox)
                sizes[key] = sizes.get(key, 0) + len(item.envelope)
            self._notify(db, [StorageEvent("deposit", c, m, size) for (c, m), size in sizes.items()])
        return ids

    def envelopes_after(
        self, circle_id: bytes, mailbox: bytes, after: int, *, now: float, limit: int,
        max_bytes: int,
    ) -> tuple[list[tuple[int, bytes]], bool]:
        with self._connection() as db:
            rows = db.execute(
                "SELECT id, envelope FROM envelopes WHERE circle_id = %s AND mailbox = %s "
                "AND id > %s AND expires_at > %s ORDER BY id LIMIT %s",
                (circle_id, mailbox, after, now, limit + 1)).fetchall()
        items: list[tuple[int, bytes]] = []
        size = 0
        for envelope_id, envelope in rows[:limit]:
            if items and size + len(envelope) > max_bytes:
                return items, True
            items.append((int(envelope_id), bytes(envelope)))
            size += len(envelope)
        return items, len(rows) > limit

    def delete_through(self, circle_id: bytes, mailbox: bytes, upto: int) -> int:
        with self._transaction() as db:
            row = db.execute(
                "WITH gone AS (DELETE FROM envelopes WHERE circle_id = %s AND mailbox = %s "
                "AND id <= %s RETURNING octet_length(envelope) AS size) "
                "SELECT coalesce(sum(size), 0) FROM gone", (circle_id, mailbox, upto)).fetchone()
            freed = int(row[0]) if row else 0
            if freed:
                self._notify(db, [StorageEvent("usage", circle_id, delta=-freed)])
        return freed

    def delete_expired(self, now: float) -> dict[bytes, int]:
        with self._transaction() as db:
            locked = db.execute("SELECT pg_try_advisory_xact_lock(%s)", (SWEEP_LOCK,)).fetchone()
            if not (locked and locked[0]):
                return {}  # another process is sweeping; its deletions reach us as events
            rows = db.execute(
                "WITH gone AS (DELETE FROM envelopes WHERE expires_at <= %s "
                "RETURNING circle_id, octet_length(envelope) AS size) "
                "SELECT circle_id, sum(size) FROM gone GROUP BY circle_id", (now,)).fetchall()
            freed = {bytes(circle_id): int(size) for circle_id, size in rows}
            self._notify(db, [StorageEvent("usage", c, delta=-n) for c, n in freed.items()])
        return freed

    def usage(self) -> dict[bytes, int]:
        totals: dict[bytes, int] = {}
        with self._connection() as db:
            rows = db.execute(
                "SELECT circle_id, sum(octet_length(envelope)) FROM envelopes GROUP BY circle_id "
                "UNION ALL SELECT circle_id, octet_length(blob) FROM backups "
                "UNION ALL SELECT circle_id, sum(octet_length(blob)) FROM segments "
                "GROUP BY circle_id").fetchall()
        for circle_id, size in rows:
            totals[bytes(circle_id)] = totals.get(bytes(circle_id), 0) + int(size)
        return totals

    # -- backups --

    def backup(self, circle_id: bytes) -> StoredBackup | None:
        with self._connection() as db:
            row = db.execute("SELECT version, blob FROM backups WHERE circle_id = %s",
                             (circle_id,)).fetchone()
        return None if row is None else StoredBackup(int(row[0]), bytes(row[1]))

    def put_backup(
        self, circle_id: bytes, expected_version: int, version: int, blob: bytes
    ) -> StoredBackup | None:
        with self._transaction() as db:
            # The row lock orders concurrent writers; the first insert is the one that wins.
            row = db.execute("SELECT version, blob FROM backups WHERE circle_id = %s FOR UPDATE",
                             (circle_id,)).fetchone()
            if row is None:
                if expected_version != 0:
                    return StoredBackup(0, b"")
                inserted = db.execute(
                    "INSERT INTO backups (circle_id, version, blob) VALUES (%s, %s, %s) "
                    "ON CONFLICT (circle_id) DO NOTHING", (circle_id, version, blob)).rowcount
                if inserted != 1:  # another process stored the first backup meanwhile
                    current = db.execute("SELECT version, blob FROM backups WHERE circle_id = %s",
                                         (circle_id,)).fetchone()
                    assert current is not None
                    return StoredBackup(int(current[0]), bytes(current[1]))
                replaced = 0
            else:
                if int(row[0]) != expected_version:
                    return StoredBackup(int(row[0]), bytes(row[1]))
                db.execute("UPDATE backups SET version = %s, blob = %s WHERE circle_id = %s",
                           (version, blob, circle_id))
                replaced = len(row[1])
            self._notify(db, [StorageEvent("usage", circle_id, delta=len(blob) - replaced)])
        return None

    # -- backup segments --

    def put_segment(self, circle_id: bytes, segment_id: bytes, blob: bytes, device: bytes | None = None) -> bool:
        with self._transaction() as db:
            inserted = db.execute(
                "INSERT INTO segments (circle_id, id, blob, device) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING", (circle_id, segment_id, blob, device)).rowcount
            if inserted == 1:
                self._notify(db, [StorageEvent("usage", circle_id, delta=len(blob))])
        return inserted == 1

    def segment(self, circle_id: bytes, segment_id: bytes) -> bytes | None:
        with self._connection() as db:
            row = db.execute("SELECT blob FROM segments WHERE circle_id = %s AND id = %s",
                             (circle_id, segment_id)).fetchone()
        return None if row is None else bytes(row[0])

    def segments_of(self, circle_id: bytes, device: bytes, after: bytes, limit: int) -> list[tuple[bytes, int]]:
        with self._connection() as db:
            rows = db.execute(SEGMENTS_OF, {"circle": circle_id, "device": device,
                                            "after": after, "limit": limit}).fetchall()
        return [(bytes(i), int(size)) for i, size in rows]

    def delete_segments(self, circle_id: bytes, segment_ids: Sequence[bytes]) -> int:
        if not segment_ids:
            return 0
        with self._transaction() as db:
            row = db.execute(
                "WITH gone AS (DELETE FROM segments WHERE circle_id = %s AND id = ANY(%s) "
                "RETURNING octet_length(blob) AS size) SELECT coalesce(sum(size), 0) FROM gone",
                (circle_id, list(segment_ids))).fetchone()
            freed = int(row[0]) if row else 0
            if freed:
                self._notify(db, [StorageEvent("usage", circle_id, delta=-freed)])
        return freed

    # -- rate limits --

    def share_rates(self, taken: dict[bytes, int]) -> None:
        with self._transaction() as db:
            self._notify(db, [StorageEvent("rate", key, delta=n) for key, n in taken.items()])

    # -- rendezvous offers --

    def claim_nameplate(self, nameplate: int, address: str, now: float, expires_at: float) -> bool:
        with self._transaction() as db:
            row = db.execute(
                "INSERT INTO rendezvous_offers (nameplate, address, expires_at) "
                "VALUES (%s, %s, %s) ON CONFLICT (nameplate) DO UPDATE "
                "SET address = excluded.address, expires_at = excluded.expires_at "
                "WHERE rendezvous_offers.expires_at <= %s RETURNING 1",
                (nameplate, address, expires_at, now)).fetchone()
        return row is not None

    def release_nameplate(self, nameplate: int, address: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM rendezvous_offers WHERE nameplate = %s AND address = %s",
                       (nameplate, address))

    def nameplate_offered_at(self, nameplate: int, now: float) -> str | None:
        with self._connection() as db:
            row = db.execute("SELECT address FROM rendezvous_offers WHERE nameplate = %s "
                             "AND expires_at > %s", (nameplate, now)).fetchone()
        return None if row is None else str(row[0])

    # -- events from the other processes --

    async def events(self) -> list[StorageEvent]:
        """The next events other processes committed (postgres_events.py)."""
        return await self._listener.events()

    def close(self) -> None:
        self._listener.close()
        self._pool.close()


def open_postgres(dsn: str) -> PostgresRelayStorage:
    """The relay's PostgreSQL storage for `--database`; PGPASSWORD etc. work as usual."""
    os.environ.setdefault("PGAPPNAME", "meshd-relay")
    return PostgresRelayStorage(dsn)
