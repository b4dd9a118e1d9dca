"""The store's maintenance: the WAL purge after deletes, integrity check, vacuum (db.py's Store
is the one subclass; it owns the write connection and the locks these take; reads.py's
StoreReads is the base)."""

from __future__ import annotations

import sqlite3
import threading

from .checkpoint import Checkpointer, checkpoint_now
from .reads import StoreReads


class StoreMaintenance(StoreReads):
    """Maintenance on the write connection, under the store's write lock. Every method raises
    StoreError subclasses, never sqlite3's."""

    _db: sqlite3.Connection
    write_lock: threading.RLock
    checkpointer: Checkpointer
    purge_pending: bool

    def _bound_wal(self) -> None:
        raise NotImplementedError  # Store's

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
