"""Deleted means gone from disk: purge the store's WAL soon after a commit that deleted bodies.

A delete, a clear or a superseding put removes bodies in its own transaction, and
secure_delete overwrites them in the pages it writes; but the WAL keeps the page images from
before, until a checkpoint. Purger hears of every commit (local or from a peer or relay; a
listener of the commit signal, so a commit that purged nothing wakes no task), and once one
has purged bodies (Store.purge_pending) it checkpoints with TRUNCATE at most
PURGE_DEBOUNCE_S later, so a burst of deletes costs one checkpoint. It also purges once at
start, for a purge a crash interrupted. The bound is protocol/logs.md's "Purge on disk".

The checkpoint runs in a worker thread and never waits for a reader (Store.purge): it used to
wait up to SQLite's busy timeout (5 s) on the trio thread while a reader held an old snapshot
(issue 20). A reader still in the WAL: it is tried again PURGE_BUSY_RETRY_S later (each try
copies what it can), so the purge lands as soon as the reader is done.
"""

from __future__ import annotations

import logging

import trio

from ..net.commitsignal import CommitSignal
from ..quietlog import QuietLogger
from .db import Store, StoreError

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

PURGE_DEBOUNCE_S = 1.0
# A purge that failed (the disk) is tried again after this long.
PURGE_RETRY_S = 5.0
# A purge a reader held up (it still reads old frames) is tried again after this long.
PURGE_BUSY_RETRY_S = 0.05
# A purge held up this long is logged (the bound of protocol/logs.md is 2 s).
PURGE_LATE_S = 2.0


class Purger:
    def __init__(self, store: Store, changed: CommitSignal, *,
                 debounce_s: float = PURGE_DEBOUNCE_S) -> None:
        self._store = store
        self._changed = changed
        self._debounce_s = debounce_s
        self.purges = 0  # completed purges (tests, status)
        self.held_up = 0  # tries a reader held up (tests)
        self._purged = trio.Event()  # set at each purge (wait_purged)
        self._pending = trio.Event()  # set by a commit that left bodies to purge

    async def wait_purged(self, count: int) -> None:
        """Until `count` purges have completed (tests)."""
        while self.purges < count:
            await self._purged.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._store.purge_pending = True  # whatever a crash left in the WAL
        undo = self._changed.listen(self._committed)  # not a wake-up per commit (issue 20)
        task_status.started()
        try:
            while True:
                if self._store.purge_pending:
                    await trio.sleep(self._debounce_s)  # later deletes of the burst share it
                    if not await self._purge():
                        await trio.sleep(PURGE_RETRY_S)
                        continue
                if not self._store.purge_pending:  # (else a commit during the purge purged)
                    self._pending = trio.Event()
                    await self._pending.wait()
        finally:
            undo()

    def _committed(self) -> None:
        if self._store.purge_pending:
            self._pending.set()

    async def _purge(self) -> bool:
        """One purge, tried again while readers hold it up; False if the disk failed."""
        started = trio.current_time()
        while True:
            try:
                done = await trio.to_thread.run_sync(self._store.purge)
            except StoreError as err:
                quiet.warning(("purge", str(err)), "could not purge deleted data from the WAL: %s", err)
                return False
            if done:
                break
            self.held_up += 1
            if trio.current_time() - started > PURGE_LATE_S:
                quiet.warning(("purge", "late"), "purging deleted data from the WAL is late: "
                              "a reader still reads it")
            await trio.sleep(PURGE_BUSY_RETRY_S)
        self.purges += 1
        self._purged.set()
        self._purged = trio.Event()
        return True
