"""The store's read side: queries on the read connection, which in WAL mode sees exactly
what is committed, never a transaction in progress (db.py's Store is the one subclass; it
owns the connections and the caches these read)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol.crypto import blake2b_256
from ..protocol.log import MAX_BATCH_BYTES, Head, batch_message
from .errors import StoreError, store_errors
from .purgelog import PurgeLog
from .recent import RecentEntries
from .schema import SEQ_BITS

STREAM_COUNTS = ("SELECT s.name, (SELECT count(*) FROM records r WHERE r.stream_id = s.id "
                 "AND r.live) FROM streams s ORDER BY s.name")


@dataclass(slots=True)
class Tip:
    author_id: int
    seq: int
    hash: bytes


class StoreReads:
    """Reads of committed data. Every method raises StoreError subclasses, never sqlite3's."""

    path: Path
    _tips: dict[bytes, Tip]
    _stream_ids: dict[str, int]
    _rdb: sqlite3.Connection | None
    purge_log: PurgeLog
    recent: RecentEntries

    @property
    def _reader(self) -> sqlite3.Connection:
        assert self._rdb is not None
        return self._rdb

    def _errors(self, doing: str) -> AbstractContextManager[None]:
        return store_errors(self.path, doing)

    def last_header(self, author: bytes) -> bytes | None:
        tip = self._tips.get(author)
        if not tip or not tip.seq:
            return None
        with self._errors("read"):
            row = self._reader.execute("SELECT header FROM entries WHERE id = ?",
                                   ((tip.author_id << SEQ_BITS) | tip.seq,)).fetchone()
        return bytes(row[0]) if row else None

    def batch_since(self, author: bytes, after_seq: int, max_bytes: int) -> dict[str, Any] | None:
        """A 'log.entries' message of author's entries after after_seq, ending at the first
        signed head at or past max_bytes (or the newest head); None if we have nothing.
        Served from the newest entries kept in memory when they hold the range (recent.py:
        a live push), else read from SQLite; the same bytes either way."""
        tip = self._tips.get(author)
        if tip is None or tip.seq <= after_seq:
            return None
        held = self.recent.batch(author, after_seq, tip.seq, max_bytes)
        if held is None:
            return self.stored_batch_since(author, after_seq, max_bytes)
        headers, bodies, head_seq, sig = held
        return batch_message(author, headers, bodies, Head(head_seq, blake2b_256(headers[-1]), sig))

    def stored_batch_since(self, author: bytes, after_seq: int, max_bytes: int
                           ) -> dict[str, Any] | None:
        """batch_since read from SQLite, whatever memory holds."""
        tip = self._tips.get(author)
        if tip is None or tip.seq <= after_seq:
            return None
        base = tip.author_id << SEQ_BITS
        with self._errors("read"):
            heads = self._reader.execute(
                "SELECT id, sig FROM heads WHERE id > ? AND id <= ? ORDER BY id LIMIT 4096",
                (base | after_seq, base | tip.seq)).fetchall()
            if not heads:
                raise StoreError(f"no signed head after entry {after_seq} of an author")
            rows = self._reader.execute(
                "SELECT e.id, e.header, b.body FROM entries e LEFT JOIN bodies b ON b.id = e.id "
                "WHERE e.id > ? AND e.id <= ? ORDER BY e.id",
                (base | after_seq, heads[-1][0]))
            headers: list[bytes] = []
            bodies: list[bytes | None] = []
            size = 0
            cut = (0, 0, 0)  # entries, size, head index at the last boundary
            head_index = 0
            next_head = heads[0][0]
            for entry_id, header, body in rows:
                headers.append(header)
                bodies.append(body)
                size += len(header) + (len(body) if body is not None else 0)
                if entry_id != next_head:
                    continue
                if size > MAX_BATCH_BYTES and cut[0]:
                    break
                cut = (len(headers), size, head_index)
                if size >= max_bytes or head_index + 1 == len(heads):
                    break
                head_index += 1
                next_head = heads[head_index][0]
            rows.close()
        count, _, head_index = cut
        del headers[count:], bodies[count:]
        head_id, sig = heads[head_index]
        head = Head(head_id - base, blake2b_256(headers[-1]), sig)
        return batch_message(author, headers, bodies, head)

    def newest_head(self, author: bytes, *, before_ms: int | None = None) -> Head | None:
        """The newest signed head of author's log we hold (whose entry is dated before
        before_ms, when given: an author's hlc only grows along its log); None if none."""
        tip = self._tips.get(author)
        if tip is None or not tip.seq:
            return None
        base = tip.author_id << SEQ_BITS
        limit = (b"\xff" * 9 if before_ms is None
                 else (min(max(before_ms, 0), (1 << 48) - 1) << 16).to_bytes(8, "big"))
        with self._errors("read"):
            row = self._reader.execute(
                "SELECT h.id, h.sig, e.header FROM heads h JOIN entries e ON e.id = h.id "
                "WHERE h.id > ? AND h.id <= ? AND header_ord(e.header) < ? "
                "ORDER BY h.id DESC LIMIT 1",
                (base, base | tip.seq, limit)).fetchone()
        return Head(row[0] - base, blake2b_256(row[2]), bytes(row[1])) if row else None

    # -- the view --

    def read(self, stream: str, after: bytes, limit: int) -> list[tuple[bytes, str, bytes]]:
        """Up to limit live records of stream after order key `after`: (order, id, body)."""
        stream_id = self._stream_ids.get(stream)
        if stream_id is None:
            return []
        with self._errors("read"):
            return [
                (bytes(order), record_id, bytes(body))
                for order, record_id, body in self._reader.execute(
                    "SELECT r.ord, r.record_id, b.body FROM records r "
                    "JOIN bodies b ON b.id = r.entry_id "
                    "WHERE r.stream_id = ? AND r.ord > ? AND r.live ORDER BY r.ord LIMIT ?",
                    (stream_id, after, limit))
            ]

    def streams(self) -> list[tuple[str, int]]:
        """(stream name, live records) for every stream ever written: O(live records)."""
        with self._errors("read"):
            return [(name, count) for name, count in self._reader.execute(STREAM_COUNTS)]

    def streams_apart(self) -> list[tuple[str, int]]:
        """streams() on a connection of its own, opened and closed here: safe on any
        thread (a worker thread's, so the count does not hold up the trio thread)."""
        with self._errors("read"):
            db = sqlite3.connect(self.path, isolation_level=None)
            try:
                return [(name, count) for name, count in db.execute(STREAM_COUNTS)]
            finally:
                db.close()

    def entry_count(self) -> int:
        with self._errors("read"):
            return int(self._reader.execute("SELECT count(*) FROM entries").fetchone()[0])

    def body_count(self, author: bytes, first: int, last: int) -> int:
        """How many of author's entries first..last still have their body (the backup asks:
        a delete or an overwrite purges the bodies it supersedes)."""
        tip = self._tips.get(author)
        if tip is None:
            return 0
        base = tip.author_id << SEQ_BITS
        with self._errors("read"):
            # The read connection: the write one belongs to whoever holds write_lock (group
            # commit runs on a worker thread).
            return int(self._reader.execute("SELECT count(*) FROM bodies WHERE id BETWEEN ? AND ?",
                                        (base | first, base | last)).fetchone()[0])

    @property
    def purges(self) -> int:
        """Commits that purged bodies since this store was opened (never reset)."""
        return self.purge_log.count

    def purged_since(self, number: int) -> tuple[int, list[tuple[bytes, int, int]] | None]:
        """(purges, the (author, first seq, last seq) runs the purging commits after the
        `number`th purged), or (purges, None) if the journal no longer holds them (purgelog.py)."""
        count, runs = self.purge_log.since(number)
        if runs is None:
            return count, None
        keys = {tip.author_id: key for key, tip in self._tips.items()}
        return count, [(keys[author_id], first, last) for author_id, first, last in runs
                       if author_id in keys]

    def headers(self) -> Iterator[bytes]:
        """Every entry header (tests and tools: the set the view is a function of)."""
        with self._errors("read"):
            for (header,) in self._reader.execute("SELECT header FROM entries ORDER BY id"):
                yield bytes(header)

    # -- circle records and state --

    def circle_records(self) -> list[bytes]:
        with self._errors("read"):
            return [bytes(data) for (data,) in
                    self._reader.execute("SELECT data FROM circle_records ORDER BY id")]

    def get_state(self, key: str) -> bytes | None:
        with self._errors("read"):
            row = self._reader.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None
