"""The store's maintenance: the WAL purge after deletes, integrity check, vacuum (db.py's Store
is the one subclass; it owns the write connection and the locks these take; reads.py's
StoreReads is the base)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from .checkpoint import Checkpointer, checkpoint_now, measured_wal_bytes
from .reads import StoreReads

# What a small transaction may add to the WAL beyond 4x its payload (B-tree and index pages).
WAL_ROOM_BYTES = 256 * 1024


class StoreMaintenance(StoreReads):
    """Maintenance on the write connection, under the store's write lock. Every method raises
    StoreError subclasses, never sqlite3's."""

    _db: sqlite3.Connection
    write_lock: threading.RLock
    checkpointer: Checkpointer
    purge_pending: bool
    path: Path
    _wal_hard: int

    def _bound_wal(self) -> None:
        raise NotImplementedError  # Store's

    def wal_has_room(self, nbytes: int) -> bool:
        """Whether a commit of about nbytes leaves the WAL under its hard bound, so that its
        _bound_wal cannot wait for a checkpoint under way (the caller holds write_lock: no
        other commit grows the WAL meanwhile)."""
        size = measured_wal_bytes(self.path)
        return size is not None and size + 4 * nbytes + WAL_ROOM_BYTES <= self._wal_hard

    def purge(self) -> bool:
        """Drop every old page image from the WAL: a TRUNCATE checkpoint copies the pages
        (deleted bodies already overwritten, secure_delete) into the database file and empties
        the WAL. Never waits for a reader (whoever waits for the write lock would wait too):
        False if one still reads the WAL, and the caller tries again soon (purge.py). Raises
        StoreError if the disk failed."""
        with self.write_lock, self._errors("purge"):
            if not checkpoint_now(self._db, self.checkpointer.lock, "TRUNCATE"):
                return False
            self.purge_pending = False  # under the lock: a commit that purges comes after
        return True

    def integrity_check(self) -> str:
        """'ok', or SQLite's description of the damage."""
        with self.write_lock, self._errors("check integrity"):
            rows = self._db.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(row[0]) for row in rows)

    def vacuum(self) -> None:
        """Rewrite the file: reclaims space, and no freed page keeps purged bytes."""
        with self.write_lock, self._errors("vacuum"):
            self._db.execute("VACUUM")
            self._bound_wal()

    def set_max_pages(self, pages: int) -> None:
        """Cap the database size (tests use this to simulate a full disk)."""
        with self.write_lock, self._errors("configure"):
            self._db.execute(f"PRAGMA max_page_count={int(pages)}")

    def page_count(self) -> int:
        with self.write_lock, self._errors("read"):
            return int(self._db.execute("PRAGMA page_count").fetchone()[0])
