"""The daemon's SQLite store: log entries and the view, circle records, small state.

Theory of operation. Two connections. The write connection makes every change as one
explicit transaction (BEGIN IMMEDIATE ... COMMIT) under `write_lock`, from whichever thread
holds the lock: the daemon commits from a worker thread (meshd/store/groupcommit.py) so the trio
thread keeps serving while SQLite inserts and fsyncs. The read connection serves reads (reads.py) on
the caller's thread; in WAL mode it sees exactly what is committed, never a transaction in
progress. An exception rolls a transaction back and leaves the in-memory caches (author
tips, stream ids) as they were, so a failed write loses nothing that was committed and
leaves nothing half-done. The caches are replaced, never mutated, after a commit, so a
reader on another thread always sees a whole dictionary that matches committed data.

Durability. The database runs in WAL mode. Local writes (what an app is told is saved,
circle records, state) commit with synchronous=FULL: the WAL is fsynced before COMMIT
returns, so an acknowledged write survives kill -9 *and* power loss. Entries received from
peers commit with synchronous=NORMAL: they survive kill -9 (the WAL write happened), and a
power cut can only lose the newest received batches, which the next sync fetches again
from the peer that still has them. FULL commits sync everything before them in the WAL,
so NORMAL commits never make a local write less durable. COMMIT never checkpoints
(wal_autocheckpoint=0): a thread with its own connection does, and the writer only past a hard
bound on the WAL's size (checkpoint.py).

Schema (integer keys everywhere, so inserts append to B-trees; a random key measured 18x
slower): authors get small ids; an entry's key is author_id << 40 | seq, so one author's
log is one contiguous key range. An entry row is its header with its stream id and op
(what a cut needs); its record id and order key stay inside the header (schema 2, 80 B
less per entry): the view's statements get a batch's as parameters (schema.BATCH), a cut's
rebuild reads them with the SQL functions schema.register_functions adds. Bodies live in
their own table so purging one is a DELETE. `records` is the materialised view (the latest
put/delete per stream and record id, with its order key); it is maintained per batch by a
few set-based statements rather than per-row Python or triggers on entries (measured 117k
entries/s against 63k with triggers). A batch's entries and bodies go in the same way, one
statement per table from packed columns (bulk.py): executemany stepped once per row, and
each step gave up the GIL and waited to take it back from the thread verifying the next
batch. One TEMP trigger on records purges the body of a winner an overwrite supersedes,
as the view moves: it fires only on an overwrite.

Body retention: a body is kept only while its entry is the live winner of its record.
Superseded, deleted and cleared bodies are purged in the same transaction, with
secure_delete on so their bytes are overwritten in the database file. The WAL still holds
the page images from before that transaction, so a commit that purged sets purge_pending,
and purge() (called by meshd/store/purge.py within PURGE_DEBOUNCE_S) checkpoints with TRUNCATE:
the overwritten pages reach the database file and the WAL is emptied (protocol/logs.md,
"Purge on disk").

Cutting. A removed member's entries past its removal point are deleted with their bodies
and heads (cut_author), and the view of the streams they touched is rebuilt from the
entries left (schema.py's REBUILD_* statements): the one change that removes entries.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ..protocol.crypto import blake2b_256
from ..protocol.log import CLEAR, ZERO_HASH, Head, VerifiedBatch, entry_hash
from . import purgelog
from .bulk import Packed, insert_packed, insert_rows
from .checkpoint import WAL_HARD_BYTES, WAL_SOFT_BYTES, Checkpointer, measured_wal_bytes, restart
from .errors import StoreCorrupt as StoreCorrupt
from .errors import StoreError
from .errors import StoreFull as StoreFull
from .errors import StoreReadOnly as StoreReadOnly
from .maintenance import StoreMaintenance
from .purgelog import PurgeLog
from .reads import Tip
from .recent import RecentEntries
from .schema import (
    CREATE_PURGE_SUPERSEDED,
    MIGRATIONS,
    PURGE_LOSERS,
    REBUILD_CLEARS,
    REBUILD_DROP,
    REBUILD_RECORDS,
    SCHEMA_VERSION,
    SEQ_BITS,
    UPSERT_RECORDS,
    apply_clear,
    batch_columns,
    register_functions,
    statements,
)

log = logging.getLogger(__name__)

class Store(StoreMaintenance):
    """SQLite (WAL) storage. Every method raises StoreError subclasses, never sqlite3's."""

    def __init__(self, path: Path, *, cache_kib: int = 8 * 1024,  # per connection; see memory.py
                 wal_soft_bytes: int = WAL_SOFT_BYTES, wal_hard_bytes: int = WAL_HARD_BYTES) -> None:
        self.path = Path(path)
        self._wal_soft = wal_soft_bytes
        self._wal_hard = wal_hard_bytes
        self.self_checkpoints = 0  # RESTART checkpoints the writer ran at the hard bound
        self._synchronous = ""
        self._tips: dict[bytes, Tip] = {}
        self._stream_ids: dict[str, int] = {}
        self._pending_tips: dict[bytes, Tip] = {}
        self._pending_streams: dict[str, int] = {}
        # stream id -> commits that changed its entries (stream_changes), counted after each
        # commit on the thread that made it (under write_lock: one writer at a time).
        self._stream_commits: dict[int, int] = {}
        # A committed transaction deleted bodies whose old page images the WAL may still hold.
        self.purge_pending = False
        # Which entries each commit that purged bodies purged (Store.purges counts them).
        self.purge_log = PurgeLog()
        self.recent = RecentEntries()  # the newest committed entries, for batch_since
        # Held for every write transaction (and by callers that read a tip, compose entries
        # and commit them as one step); reentrant, so such a caller may commit inside it.
        self.write_lock = threading.RLock()
        # WAL checkpoints run in a thread of their own, not inside COMMIT (checkpoint.py).
        self.checkpointer = Checkpointer(self.path, lock=threading.Lock(),
                                         write_lock=self.write_lock)
        with self._errors("open"):
            if not self.path.exists():
                # Created 0600 before SQLite sees it; its -wal and -shm copy this mode.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._rdb: sqlite3.Connection | None = None
        try:
            with self._errors("open"):
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreError(f"{self.path}: cannot use WAL mode (got {mode})")
                self._db.execute("PRAGMA secure_delete=ON")
                self._db.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
                self._db.execute("PRAGMA temp_store=MEMORY")
                self._db.execute(f"PRAGMA journal_size_limit={int(wal_soft_bytes)}")
                self._db.execute("PRAGMA wal_autocheckpoint=0")
                self._set_synchronous("FULL")
                register_functions(self._db)
                self._migrate()
                self._db.execute(CREATE_PURGE_SUPERSEDED)
                purgelog.create(self._db)
                self._load_caches()
                self._rdb = sqlite3.connect(self.path, isolation_level=None)
                register_functions(self._rdb)
                self._rdb.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
                self._rdb.execute("PRAGMA temp_store=MEMORY")
        except BaseException:
            self.checkpointer.stop()
            if self._rdb is not None:
                self._rdb.close()
            self._db.close()
            raise

    def close(self) -> None:
        self.checkpointer.stop()
        with self.write_lock:
            self._reader.close()
            self._db.close()

    # -- schema --

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this meshd "
                f"({SCHEMA_VERSION}); upgrade meshd"
            )
        for number in range(version, SCHEMA_VERSION):
            with self._transaction(durable=True):
                for statement in statements(MIGRATIONS[number]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={number + 1}")
            log.info("store %s migrated to schema %d", self.path, number + 1)

    def _load_caches(self) -> None:
        self._tips = {
            bytes(key): Tip(author_id, seq, bytes(hash))
            for author_id, key, seq, hash in self._db.execute(
                "SELECT id, key, seq, hash FROM authors")
        }
        self._stream_ids = dict(self._db.execute("SELECT name, id FROM streams"))

    # -- errors and transactions --

    def _set_synchronous(self, level: str) -> None:
        if self._synchronous != level:
            self._db.execute(f"PRAGMA synchronous={level}")
            self._synchronous = level

    @contextmanager
    def _transaction(self, *, durable: bool, doing: str = "write") -> Iterator[None]:
        with self.write_lock, self._errors(doing):
            self._set_synchronous("FULL" if durable else "NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._pending_tips.clear()
                self._pending_streams.clear()
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            if self._pending_streams:
                self._stream_ids = {**self._stream_ids, **self._pending_streams}
            if self._pending_tips:
                self._tips = {**self._tips, **self._pending_tips}
            self._pending_streams.clear()
            self._pending_tips.clear()
            self._bound_wal()

    def _bound_wal(self) -> None:
        """After a commit: wake the checkpointer past the soft bound; past the hard bound
        (it fell behind) checkpoint here, waiting for it but not for readers (checkpoint.py).
        Never raises (failures are logged): the transaction is committed, and a caller told
        otherwise would write it again."""
        size = measured_wal_bytes(self.path)
        if size is None:
            return
        self.checkpointer.committed(over_soft=size > self._wal_soft)
        if size > self._wal_hard and restart(self._db, self.checkpointer.lock):
            self.self_checkpoints += 1

    # -- logs --

    def version_vector(self) -> dict[bytes, int]:
        return {author: tip.seq for author, tip in self._tips.items() if tip.seq}

    def tip(self, author: bytes) -> tuple[int, bytes]:
        """(highest seq, its entry hash) of author's log; (0, zeros) when we have none."""
        tip = self._tips.get(author)
        return (tip.seq, tip.hash) if tip else (0, ZERO_HASH)

    def commit_batch(self, batch: VerifiedBatch, *, durable: bool) -> None:
        """Commit verified entries (continuing the author's tip) and update the view, in one
        transaction. durable=True for local writes (see the module comment)."""
        if len(batch):
            self.commit_batches((batch,), durable=durable)

    def commit_batches(self, batches: Iterable[VerifiedBatch], *, durable: bool) -> None:
        """commit_batch of batches each continuing the last, all in one transaction: all or
        none. The iterable may compose them as they are asked for (composeahead.py)."""
        purged = False
        runs: list[purgelog.Run] | None = []
        touched: set[int] = set()  # the ids of the streams the batches change
        done: list[VerifiedBatch] = []
        with self.write_lock:  # (until the tails have them: a later purge clears after)
            with self._transaction(durable=durable):
                for batch in batches:
                    if len(batch):
                        purged = self._insert_batch(batch, touched) or purged
                        done.append(batch)
                if purged:
                    runs = purgelog.take_runs(self._db)
                    self.recent.clear()  # before COMMIT: no read after it sees a purged body
            self.recent.add(() if purged else done)
        self._count_stream_commits(touched)
        if purged:
            self.purge_pending = True
            self.purge_log.add(runs)

    def _insert_batch(self, batch: VerifiedBatch, touched: set[int]) -> bool:
        """commit_batch's work inside the transaction (adding the ids of the streams it
        changes to `touched`); True if it purged bodies."""
        count = len(batch)
        tip = self._author(batch.author)
        if tip.seq + 1 != batch.first_seq:
            raise StoreError(f"batch starts at {batch.first_seq}, the tip is {tip.seq}")
        first = (tip.author_id << SEQ_BITS) | batch.first_seq
        # Each distinct stream looked up once (in first-seen order, as ids are assigned).
        ids = {name: self._stream_id(name) for name in dict.fromkeys(batch.streams)}
        touched.update(ids.values())
        stream_ids = list(map(ids.__getitem__, batch.streams))
        db = self._db
        # The batch's columns for the view's statements (schema.BATCH), and the set-based
        # inserts of its entries and bodies (bulk.py), packed by its composer if it did.
        packed = batch.packed if isinstance(batch.packed, Packed) else None
        rows = batch_columns(first, stream_ids, batch.ops, batch.record_ids, batch.orders,
                             packed.view if packed else None)
        if packed is None:
            insert_rows(db, first, batch.headers, batch.bodies, rows[4], rows[3])
        else:  # (in the composing thread: composeahead.py)
            insert_packed(db, first, *packed.columns, rows[4], rows[3])
        # (Python 3.11 gives no rowcount for a statement that starts with WITH.)
        changes = db.total_changes
        db.execute(UPSERT_RECORDS, rows)
        won = db.execute("SELECT changes()").fetchone()[0]  # without the trigger's
        purged = db.total_changes - changes > won  # the trigger purged superseded bodies
        ops = batch.ops
        clears = [i for i, op in enumerate(ops) if op == CLEAR] if CLEAR in ops else []
        for i in clears:
            purged = apply_clear(db, stream_ids[i], batch.orders[i]) or purged
        # Every body of the batch survived unless one lost, was deleted or was cleared,
        # or two of its entries are of one record (of one stream, the usual case, its
        # record ids say it without a tuple per entry).
        if (clears or won != count - len(clears)
                or len(set(batch.record_ids if len(ids) == 1 else
                           zip(stream_ids, batch.record_ids, strict=True))) != count):
            changes = db.total_changes
            db.execute(PURGE_LOSERS, rows)
            purged = db.total_changes > changes or purged
        db.executemany("INSERT INTO heads(id, sig) VALUES (?, ?)",
                       [((tip.author_id << SEQ_BITS) | head.seq, head.sig) for head in batch.heads])
        db.execute("UPDATE authors SET seq = ?, hash = ? WHERE id = ?",
                   (batch.last_seq, batch.last_hash, tip.author_id))
        self._pending_tips[batch.author] = Tip(tip.author_id, batch.last_seq,
                                               batch.last_hash)
        return purged

    def cut_author(self, author: bytes, cutoff: Head) -> bool:
        """Drop author's entries past its removal point (protocol/logs.md, "A removed
        member's entries") and rebuild the view of every stream they touched, in one
        transaction. If our entry at cutoff.seq is not the one it names (a fork the removed
        device signed), keep only up to the newest head we hold before it. True if
        anything was dropped."""
        tip = self._tips.get(author)
        if tip is None or tip.seq <= cutoff.seq:
            return False
        base = tip.author_id << SEQ_BITS
        with self._transaction(durable=True, doing="cut"):
            db = self._db
            keep, new_hash = cutoff.seq, cutoff.hash
            row = db.execute("SELECT header FROM entries WHERE id = ?", (base | keep,)).fetchone()
            if keep and row is not None and entry_hash(row[0]) == cutoff.hash:
                db.execute("INSERT OR REPLACE INTO heads(id, sig) VALUES (?, ?)",
                           (base | keep, cutoff.sig))
            elif keep:
                row = db.execute("SELECT h.id, e.header FROM heads h JOIN entries e ON e.id = h.id "
                                 "WHERE h.id > ? AND h.id < ? ORDER BY h.id DESC LIMIT 1",
                                 (base, base | keep)).fetchone()
                keep, new_hash = ((row[0] - base, entry_hash(row[1])) if row else (0, ZERO_HASH))
            span = (base | (keep + 1), base | tip.seq)
            streams = [sid for (sid,) in db.execute(
                "SELECT DISTINCT stream_id FROM entries WHERE id BETWEEN ? AND ?", span)]
            for table in ("bodies", "entries", "heads"):
                db.execute(f"DELETE FROM {table} WHERE id BETWEEN ? AND ?", span)
            touched = json.dumps(streams)
            for statement in (REBUILD_CLEARS, REBUILD_DROP, REBUILD_RECORDS):
                db.execute(statement, (touched,))
            db.execute("UPDATE authors SET seq = ?, hash = ? WHERE id = ?",
                       (keep, new_hash, tip.author_id))
            self._pending_tips[author] = Tip(tip.author_id, keep, new_hash)
            runs = purgelog.take_runs(db)
            self.recent.clear()  # before COMMIT: entries past the cut are gone
        self._count_stream_commits(streams)
        self.purge_pending = True
        self.purge_log.add(runs)
        return True

    def stream_changes(self, stream: str) -> int:
        """Commits since this store was opened that changed `stream`'s entries (never reset):
        a follower of one stream re-reads it only when this moved, not at every commit."""
        stream_id = self._stream_ids.get(stream)
        return 0 if stream_id is None else self._stream_commits.get(stream_id, 0)

    def _count_stream_commits(self, stream_ids: Iterable[int]) -> None:
        with self.write_lock:
            for stream_id in stream_ids:
                self._stream_commits[stream_id] = self._stream_commits.get(stream_id, 0) + 1

    def _author(self, key: bytes) -> Tip:
        tip = self._pending_tips.get(key) or self._tips.get(key)
        if tip is None:
            cursor = self._db.execute("INSERT INTO authors(key, seq, hash) VALUES (?, 0, ?)",
                                      (key, ZERO_HASH))
            assert cursor.lastrowid is not None
            if cursor.lastrowid >= 1 << (63 - SEQ_BITS):
                raise StoreError("too many authors")
            tip = self._pending_tips[key] = Tip(cursor.lastrowid, 0, ZERO_HASH)
        return tip

    def _stream_id(self, name: str) -> int:
        stream_id = self._stream_ids.get(name) or self._pending_streams.get(name)
        if stream_id is None:
            cursor = self._db.execute("INSERT INTO streams(name) VALUES (?)", (name,))
            assert cursor.lastrowid is not None
            stream_id = self._pending_streams[name] = cursor.lastrowid
        return stream_id

    # -- circle records and state --

    def add_circle_records(self, records: list[bytes]) -> None:
        """Append records not already stored (by content), in the given order."""
        with self._transaction(durable=True):
            self._db.executemany(
                "INSERT OR IGNORE INTO circle_records(hash, data) VALUES (?, ?)",
                [(blake2b_256(record), record) for record in records])

    def set_state(self, key: str, value: bytes) -> None:
        self.set_states({key: value})

    def set_states(self, values: Mapping[str, bytes]) -> None:
        """Several state values in one durable transaction (one fsync)."""
        with self._transaction(durable=True):
            self._db.executemany("INSERT INTO state(key, value) VALUES (?, ?) "
                                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                                 list(values.items()))
