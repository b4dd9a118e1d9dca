"""WAL checkpoints off the committing connection: a checkpointer thread, and a hard WAL bound.

Why. SQLite's automatic checkpoint runs inside COMMIT on the connection that commits: every
~1,000 pages that COMMIT copies the WAL into the database file and fsyncs it, which measured
7.7-19.6 µs per entry of a bulk commit against 2.5-4.4 µs without it. The store turns the write
connection's automatic checkpoint off (wal_autocheckpoint=0) and checkpoints here instead.

How the WAL stays bounded (issue 20 requires a bounded daemon WAL):
- The store's journal_size_limit is `soft_bytes`, so when the log restarts its file is cut back
  to that size: the file grows past soft_bytes only while the current log holds more than that.
- After each commit the writer looks at the WAL file's size (one stat). Past soft_bytes it wakes
  the checkpointer thread, which runs a PASSIVE checkpoint on its own connection (it copies
  frames while the writer goes on appending, and never blocks it); once every frame is copied,
  the writer's next transaction restarts the log from its start.
- Past hard_bytes (the checkpointer fell behind, or a reader holds old frames) the writer
  checkpoints itself with RESTART before its commit returns: it waits for a running checkpoint
  (the shared checkpoint lock; checkpoints never wait for readers, so that is their copying
  only) but not for readers: it holds the store's write lock, which the trio thread takes to
  commit (the relay mailbox path), so a wait for a reader's snapshot would stall the event
  loop. A reader still in the WAL: the next commit tries again (a reader that begins after
  the frames are all copied does not read the WAL, and does not hold the restart up). So
  the WAL file never exceeds hard_bytes plus one transaction's pages while readers let the
  log restart (the store's reads are single statements).
- When no commit has come for idle_s after one did, the checkpointer empties the WAL: it
  copies the frames (PASSIVE, without the store's write lock), then takes that lock only if
  it is free and no commit came meanwhile, and TRUNCATEs without waiting for readers: the
  trio thread commits under that lock (the relay mailbox path), so a checkpoint waiting for a
  reader's snapshot there would stall the event loop. A reader still in the WAL: it tries
  again after another idle spell.

Only one checkpoint runs at a time: `lock` is held for every checkpoint by this thread, by the
writer's own, and by Store.purge(), which takes the store's write lock first (the order is
always write lock, then checkpoint lock); Store.purge() never waits for readers either.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from ..quietlog import QuietLogger

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

# A PASSIVE checkpoint is asked for once the WAL file passes this (where SQLite's automatic
# checkpoint would run: 1,000 pages of 4 KiB; the soak holds the daemon's WAL to 8 MB); also
# the store's journal_size_limit.
WAL_SOFT_BYTES = 4 * 1024 * 1024
# Past this the writer checkpoints itself (plus at most one transaction's pages).
WAL_HARD_BYTES = 16 * 1024 * 1024
# No commit for this long after one: empty the WAL.
IDLE_S = 5.0
# The writer's busy timeout, restored after its own checkpoint (which waits for no reader).
BUSY_TIMEOUT_MS = 5000


class Checkpointer:
    """A thread with its own connection that checkpoints the WAL of the database at `path`.
    Started by the first committed(); stop() ends it and closes its connection."""

    def __init__(self, path: Path, *, lock: threading.Lock, write_lock: threading.RLock,
                 idle_s: float | None = None) -> None:
        self._path = path
        self.lock = lock
        self._write_lock = write_lock
        self._idle_s = IDLE_S if idle_s is None else idle_s
        self._cond = threading.Condition()
        self._wanted = False  # a commit passed the soft bound since the last checkpoint
        self._dirty = False  # a commit since the last TRUNCATE
        self._last = 0.0  # when the last commit came (monotonic)
        self._stopping = False
        self._running = False  # a checkpoint the writer asked for is under way
        self._thread: threading.Thread | None = None
        self.checkpoints = 0  # checkpoints this thread ran (tests, bench)
        self.truncates = 0  # of which, TRUNCATEs after an idle spell
        # The last failure (logged): a checkpoint's sqlite3.Error, or the thread not starting.
        self.error: sqlite3.Error | RuntimeError | None = None

    def committed(self, *, over_soft: bool) -> None:
        """Called by the writer after each commit (under the store's write lock). Never
        raises: the transaction is committed, and its caller must hear so (Store._bound_wal)."""
        with self._cond:
            if self._stopping:
                return
            first, self._dirty = not self._dirty, True
            self._last = time.monotonic()
            if over_soft:
                self._wanted = True
            if over_soft or first:  # the thread may be waiting with no timer
                self._cond.notify_all()
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="meshd-checkpoint", daemon=True)
                try:
                    thread.start()
                except RuntimeError as err:  # the process's thread limit: after a COMMIT, so
                    # never raised (the commit stands); the hard bound holds, the next commit retries
                    self.error = err
                    quiet.warning(("checkpoint", str(err)), "no WAL checkpointer thread: %s", err)
                else:
                    self._thread = thread

    def drain(self) -> None:
        """Wait until the checkpoint the last commits asked for has run (tests, bench)."""
        with self._cond:
            while (self._wanted or self._running) and not self._stopping and self._thread:
                self._cond.wait()

    def wait_truncated(self, count: int = 1) -> None:
        """Wait until `count` idle TRUNCATEs have run (tests)."""
        with self._cond:
            while self.truncates < count and not self._stopping and self._thread:
                self._cond.wait()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            # Never waits for readers (PASSIVE does not; the idle TRUNCATE holds the store's
            # write lock, and gives up at once rather than wait under it).
            db.execute("PRAGMA busy_timeout=0")
        except sqlite3.Error as err:  # then only the writer's hard bound checkpoints
            self.error = err
            quiet.warning(("checkpoint", str(err)), "no WAL checkpointer: %s", err)
            self._ended()
            return
        try:
            while True:
                with self._cond:
                    while not (self._wanted or self._stopping):
                        if not self._dirty:
                            self._cond.wait()  # no timer while nothing was written
                            continue
                        remaining = self._last + self._idle_s - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    if self._stopping:
                        return
                    passive, self._wanted = self._wanted, False
                    self._running = passive
                if passive:
                    self._checkpoint(db, "PASSIVE")
                    with self._cond:
                        self._running = False
                        self._cond.notify_all()
                else:
                    self._truncate(db)
        finally:
            db.close()
            self._ended()

    def _truncate(self, db: sqlite3.Connection) -> None:
        """No commit for idle_s: empty the WAL, never waiting for readers under the write lock."""
        with self._cond:
            last = self._last
        self._checkpoint(db, "PASSIVE")  # the copying, with no lock a writer takes
        if not self._write_lock.acquire(blocking=False):
            with self._cond:  # a writer holds the lock: not idle after all
                self._last = time.monotonic()
            return
        try:
            with self._cond:
                if self._last != last:  # a commit came meanwhile: not idle after all
                    return
                self._dirty = False
            emptied = self._checkpoint(db, "TRUNCATE")
            if not emptied:  # a reader in the WAL (or the disk): again after an idle spell
                with self._cond:
                    self._dirty, self._last = True, time.monotonic()
        finally:
            self._write_lock.release()
        with self._cond:
            self.truncates += 1
            self._cond.notify_all()

    def _ended(self) -> None:
        with self._cond:
            self._stopping = True  # committed() stops asking; drain() stops waiting
            self._running = False
            self._cond.notify_all()

    def _checkpoint(self, db: sqlite3.Connection, mode: str) -> bool:
        """One checkpoint; False if it could not finish (readers: busy; or the disk: logged)."""
        try:
            with self.lock:
                busy = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
        except sqlite3.Error as err:  # the disk; the writer's hard bound still holds
            self.error = err
            quiet.warning(("checkpoint", str(err)), "WAL checkpoint (%s) failed: %s", mode, err)
            return False
        self.checkpoints += 1
        return not busy


def restart(db: sqlite3.Connection, lock: threading.Lock) -> bool:
    """The writer's own checkpoint at the hard bound, on its connection (under the store's
    write lock): RESTART, so that its next transaction starts the log afresh. Waits for a
    checkpoint under way (`lock`), never for readers (the trio thread may be waiting for the
    write lock); False if it could not finish (a reader in the WAL, or the disk failed:
    logged), and the next commit tries again."""
    try:
        return checkpoint_now(db, lock, "RESTART")
    except sqlite3.Error as err:
        quiet.warning(("checkpoint", str(err)), "WAL checkpoint at the hard bound failed: %s", err)
        return False


def checkpoint_now(db: sqlite3.Connection, lock: threading.Lock, mode: str) -> bool:
    """A checkpoint on the writer's connection (under the store's write lock): waits for one
    under way (`lock`), never for readers; False if a reader still reads frames it must keep
    (it copied what it could). Raises sqlite3.Error."""
    with lock:
        db.execute("PRAGMA busy_timeout=0")
        try:
            busy = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
        finally:
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return not busy


def wal_bytes(path: Path) -> int:
    """The size of the database's WAL file (0 if there is none). Raises OSError."""
    try:
        return os.stat(f"{path}-wal").st_size
    except FileNotFoundError:
        return 0


def measured_wal_bytes(path: Path) -> int | None:
    """wal_bytes() after a COMMIT, where nothing may raise (the caller must hear that its
    committed transaction is committed: told otherwise, the group commit would commit its
    writes again): None, logged, if the file cannot be measured (the next commit tries again)."""
    try:
        return wal_bytes(path)
    except OSError as err:
        quiet.warning(("checkpoint", "stat", err.errno), "cannot measure the WAL (%s): it is "
                      "not bounded at this commit", err)
        return None
