"""Deleted means gone from disk: purge the store's WAL soon after a commit that deleted bodies.

A delete, a clear or a superseding put removes bodies in its own transaction, and
secure_delete overwrites them in the pages it writes; but the WAL keeps the page images from
before, until a checkpoint. Purger waits for commits (local or from a peer or relay), and
once one has purged bodies (Store.purge_pending) it checkpoints with TRUNCATE at most
PURGE_DEBOUNCE_S later, so a burst of deletes costs one checkpoint. It also purges once at
start, for a purge a crash interrupted. The bound is protocol/logs.md's "Purge on disk".
"""

from __future__ import annotations

import logging

import trio

from ..net.logsync import CommitSignal
from ..quietlog import QuietLogger
from .db import Store, StoreError

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

PURGE_DEBOUNCE_S = 1.0
# A purge that failed (the disk) is tried again after this long.
PURGE_RETRY_S = 5.0


class Purger:
    def __init__(self, store: Store, changed: CommitSignal, *,
                 debounce_s: float = PURGE_DEBOUNCE_S) -> None:
        self._store = store
        self._changed = changed
        self._debounce_s = debounce_s
        self.purges = 0  # completed purges (tests, status)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._store.purge_pending = True  # whatever a crash left in the WAL
        seen = self._changed.generation
        task_status.started()
        while True:
            if self._store.purge_pending:
                await trio.sleep(self._debounce_s)  # later deletes of the burst share it
                if not self._purge():
                    await trio.sleep(PURGE_RETRY_S)
                    continue
            seen = await self._changed.wait(seen)

    def _purge(self) -> bool:
        try:
            self._store.purge()
        except StoreError as err:
            quiet.warning(("purge", str(err)), "could not purge deleted data from the WAL: %s", err)
            return False
        self.purges += 1
        return True
