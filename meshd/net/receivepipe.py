"""Received batches in a pipeline: batch n+1 is verified while batch n commits.

One connection's batches arrive in order, and each is verified against the chain tip the
batch before it leaves, not the tip on disk: so batch n+1's verification (in a worker
thread) needs only batch n's verification, not its commit, and runs while batch n commits
in the writer thread (SQLite's steps and the WAL writes release the GIL). Depth one: batch
n+1 starts committing once batch n has committed, and the reader waits for that before it
reads batch n+2, so at most three batches are past the socket (one committing, one verified,
one being verified), all within the credit the peer holds (credit comes back only for
committed batches).

Order and integrity: commits happen in arrival order, one at a time. The commit step takes
the store's write lock and checks that the author's tip is still the one the batch was
verified against; if another connection (or a cut) moved it meanwhile, the batch is
verified again against the tip it finds, under the lock, exactly as an unpipelined receive
does. A batch's outcome (its count, or the error that ended the commit) is handed back to
the trio thread in commit order (run_sync_soon), which refills the peer's credit.

A small batch (a live push: INLINE_VERIFY_BYTES) is verified on the trio thread, and
committed there too when the store's write lock is free and the WAL has room (_commit_here):
then there is nothing in flight, and handle() returns with it committed and credited. When
another thread holds the lock it commits in a worker thread as above: the trio thread never
waits for the lock, nor for an fsync (a received batch commits at synchronous=NORMAL).

Failure contract: receive() raises EntryRejected for a batch that fails verification; the
batches before it still commit (drain() waits for them). A commit that fails (StoreError,
or EntryRejected when the re-verification fails) is passed to `failed`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import outcome
import trio

from ..protocol.log import Batch, Head, VerifiedBatch
from ..store.db import Store

# A batch this small (a live push: a few entries) is verified on the trio thread: about
# 60 us for 4 entries of 1 KB (one signature, a few hashes), where the hop to a worker
# thread and back costs about 120 us of CPU across the threads and two task steps
# (bench/results/issue20-cpu-s9-2026-12-03.txt); a catch-up batch (up to BATCH_BYTES) still
# goes to a worker thread, so the trio thread never verifies more than this at once.
INLINE_VERIFY_BYTES = 16 * 1024
INLINE_VERIFY_ENTRIES = 16


class PipelineHost(Protocol):
    """What the pipeline needs of the log service (LogService is the one implementation)."""

    store: Store

    def cutoff_of(self, author: bytes) -> Head | None: ...
    def verify_received(self, batch: Batch, allowed: bool, cutoff: Head | None, seq: int,
                        hash: bytes) -> VerifiedBatch: ...
    def commit_verified(self, batch: Batch, allowed: bool, cutoff: Head | None, seq: int,
                        hash: bytes, verified: VerifiedBatch) -> int: ...


class ReceivePipeline:
    """Verify-then-commit of one connection's batches, verification one batch ahead.
    `done(batch, count)` runs on the trio thread once a batch is committed (count new
    entries; 0 for a batch that held nothing new), in arrival order; `failed(error)` once a
    commit fails (nothing after it commits)."""

    def __init__(self, service: PipelineHost, done: Callable[[Batch, int], None],
                 failed: Callable[[BaseException], None]) -> None:
        self._service = service
        self._done = done
        self._failed = failed
        self._idle = trio.Event()  # set while no commit is in flight
        self._idle.set()
        self._ahead: tuple[bytes, int, bytes] | None = None  # (author, seq, hash) once in flight commits
        self.broken = False  # a commit failed: nothing more is committed
        self.commits_started = 0  # (tests: the order of verification and commits)
        self.inline_commits = 0  # of them, committed on the trio thread (_commit_here)

    async def receive(self, batch: Batch, is_author_allowed: Callable[[bytes], bool]) -> None:
        """Verify batch (in a worker thread, while the batch before it commits; a small one
        here, INLINE_VERIFY_BYTES), then wait for that commit and start batch's own (a small
        one's may be done here: _commit_here). Raises EntryRejected (batch is not committed;
        the batches before it are)."""
        service = self._service
        author = batch.author
        allowed = is_author_allowed(author)  # on the trio thread, where the circle lives
        cutoff = service.cutoff_of(author)
        seq, hash = service.store.tip(author)
        if self._ahead is not None and self._ahead[0] == author and self._ahead[1] > seq:
            seq, hash = self._ahead[1], self._ahead[2]
        if batch.head.seq <= seq:
            # Nothing past the tip (a copy of what reached us another way): checked here,
            # with no thread and no lock, as LogService.receive does.
            service.verify_received(batch, allowed, cutoff, seq, hash)
            if not self._idle.is_set():
                await self._idle.wait()  # credit in order, after the commits before it
            self._done(batch, 0)
            return
        small = batch.size <= INLINE_VERIFY_BYTES and len(batch.headers) <= INLINE_VERIFY_ENTRIES
        if small:
            verified = service.verify_received(batch, allowed, cutoff, seq, hash)
        else:
            verified = await trio.to_thread.run_sync(service.verify_received, batch, allowed,
                                                     cutoff, seq, hash)
        if not self._idle.is_set():  # (no checkpoint when it is: handle() has its own)
            await self._idle.wait()
        if self.broken:
            return  # the commit before it failed: `failed` has ended the connection's sync
        if not len(verified):
            self._done(batch, 0)
            return
        self.commits_started += 1
        commit = partial(service.commit_verified, batch, allowed, cutoff, seq, hash, verified)
        if small and self._commit_here(commit, batch):
            return
        self._idle = trio.Event()
        self._ahead = (author, verified.last_seq, verified.last_hash)
        token = trio.lowlevel.current_trio_token()
        trio.lowlevel.start_thread_soon(commit, partial(self._deliver, token, batch))

    def _commit_here(self, commit: Callable[[], int], batch: Batch) -> bool:
        """Commit a small batch on the trio thread if the store's write lock is free (no
        commit in flight anywhere) and the WAL has room (the commit cannot wait for a
        checkpoint): a commit at synchronous=NORMAL writes the WAL without an fsync, ~0.2 ms
        for a live push, where the hop to a worker thread and back costs more CPU across
        the threads, two wake-ups and a task step. False (nothing done) otherwise: the
        caller commits in a worker thread, so the trio thread never waits for the lock."""
        store = self._service.store
        # Not if this thread holds it already (the lock is reentrant): a task of ours is
        # between reading a tip and committing, a step the lock makes one; a worker thread
        # commits this batch once that task releases it.
        if store.write_lock._is_owned() or not store.write_lock.acquire(blocking=False):  # type: ignore[attr-defined]
            return False
        try:
            if not store.wal_has_room(batch.size):
                return False
            result = outcome.capture(commit)
        finally:
            store.write_lock.release()
        self.inline_commits += 1
        self._finish(batch, result)
        return True

    async def drain(self) -> None:
        """Wait until the batch in flight (if any) has committed and its `done` has run."""
        await self._idle.wait()

    def _deliver(self, token: trio.lowlevel.TrioToken, batch: Batch,
                 result: outcome.Outcome[Any]) -> None:
        # (in the commit's thread)
        try:
            token.run_sync_soon(self._finish, batch, result)
        except trio.RunFinishedError:  # pragma: no cover - the run ended under the commit
            pass

    def _finish(self, batch: Batch, result: outcome.Outcome[Any]) -> None:
        self._ahead = None
        self._idle.set()
        if isinstance(result, outcome.Error):
            self.broken = True
            self._failed(result.error)
        else:
            self._done(batch, result.value)
