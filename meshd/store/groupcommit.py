"""Group commit of local writes, off the trio thread.

Theory of operation. Every local change (an app's put, delete or clear, one record or a
batch of them) is submitted as a unit. Units that arrive while a commit is in progress
queue up, and the next commit takes all of them together (up to MAX_GROUP_ENTRIES): one
composition (entries signed by one head at the end of the group, plus the spacing heads the
log requires), one transaction, one fsync. Each submitter is answered only after the
transaction holding its unit has committed, with synchronous=FULL (Store's local-write
durability), so an acknowledged write survives power loss.

The writer thread. No background task, and no thread once nothing has been queued for
LINGER_S (see Gathering): a submitter that finds no writer thread running starts one. It first yields once to the trio scheduler,
so every task already runnable (a burst of requests read in the same pass of the event
loop) queues its unit and the burst shares the first transaction; it then takes the group
and starts the thread with it. The thread commits that group and then, by itself, every
group that queued meanwhile, until no unit comes: the trio thread is no step of the
commit loop. Each committed group is handed back to the trio thread (run_sync_soon, in
commit order), which runs `committed` and wakes the group's submitters while the thread is
already committing the next group. The queue is shared with the thread under a lock.

Gathering. An fsync costs about the same for one write as for sixteen, so a group should
not leave without the writers that are about to join it. Through the API, the sixteen
writers of a group are answered together but send their next writes one after another
(the trio thread answers and reads them in turn): taken as they came, the first one back
would get a transaction of its own and the other fifteen would queue behind its fsync
(groups of 1, 2, 3... and the writers split into cohorts). So between groups the writer
thread waits until as many units are queued as the larger of the last two groups held
(the writers recently active), but at most gather_s(last commit's duration): by default
that duration, capped at MAX_GATHER_S, so waiting for company never costs a write more
than the fsync it saves; the bound runs from the first unit of the group. A lone writer
never waits (its next unit is all that is expected). An idle writer thread lingers
LINGER_S for a unit before it stops (that delays no unit: the first one wakes it), so a
busy writer does not start a thread per group.

Cancellation: a submitted unit is committed or refused as a whole even if its submitter is
cancelled (its wait cannot be cancelled, as a shielded one, and only ever lasts as long as
the commits ahead of it and one gather bound), so a cancelled request never leaves its write half-known.

Failure: if a group's transaction fails, each unit of it is retried alone, so one unit
that cannot be stored (a full disk that a smaller write still fits in) does not fail the
others; a unit that fails alone gets the exception, and nothing of it was committed. An
error that is not an Exception (a bug, or the interpreter going down) answers every unit
not yet answered with CommitInterrupted and is raised on the trio thread, which ends the
run (trio.TrioInternalError wrapping it): the writer thread is gone, so writes must stop.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import outcome
import trio

from ..protocol.log import Write

MAX_GROUP_ENTRIES = 20_000
MAX_GATHER_S = 0.002  # the longest a group waits for the writers expected to join it
LINGER_S = 0.05  # how long an idle writer thread waits for a unit before it stops


def default_gather_s(last_commit_s: float) -> float:
    """How long the next group may wait for company: about one commit, capped."""
    return min(last_commit_s, MAX_GATHER_S)


T = TypeVar("T")


class CommitInterrupted(Exception):
    """The writer thread stopped while this write's group was committing or queued; it may
    or may not be durable (as for a write in flight when power fails)."""


@dataclass(eq=False)
class _Unit(Generic[T]):
    writes: Sequence[Write]
    task: trio.lowlevel.Task | None = None  # its submitter, while that waits for the answer
    done: bool = False
    result: tuple[T, int] | None = None
    error: Exception | None = None


def _refuse_cancel(_raise_cancel: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


class GroupCommit(Generic[T]):
    """Commits units of writes in groups. `commit` runs in the writer thread and turns a
    flat list of writes into one durable transaction, returning a value that `committed`
    sees and that each unit's answer carries (on the trio thread, after the commit)."""

    def __init__(
        self,
        commit: Callable[[list[Write]], T],
        committed: Callable[[T], None],
        *,
        max_group_entries: int = MAX_GROUP_ENTRIES,
        gather_s: Callable[[float], float] = default_gather_s,
        linger_s: float = LINGER_S,
        commit_units: Callable[[list[Sequence[Write]]], T] | None = None,
    ) -> None:
        self._commit = commit
        # Given, it commits a group as its units' sequences, in order, instead of `commit`
        # of one flat list: a unit (a PutRun of thousands of puts) is not walked here.
        self._commit_units = commit_units
        self._committed = committed
        self._max = max_group_entries
        self._gather_s = gather_s
        self._linger_s = linger_s
        self._lock = threading.Lock()  # guards _queue, _running, _current and _gathering
        self._arrived = threading.Condition(self._lock)  # the units gathered for are queued
        self._wake_at = 0  # while the writer thread waits: the queue length it waits for (else 0)
        self._recent = (0, 0)  # units in the last two groups (the writer thread's own)
        self._queue: deque[_Unit[T]] = deque()
        self._queued_entries = 0  # writes in _queue
        self._running = False  # a writer thread is running or about to start
        self._current: list[_Unit[T]] = []  # the group the writer thread is committing
        # Received batches (LogService.receive) and cuts commit one at a time under this, in
        # their own worker thread; the store's write_lock orders them with the writer thread.
        self.limiter = trio.CapacityLimiter(1)
        self.groups = 0  # transactions committed (tests and metrics)
        self.units = 0  # units acknowledged
        self.threads = 0  # writer threads started (tests: a busy writer keeps its thread)

    async def submit(self, writes: Sequence[Write]) -> tuple[T, int]:
        """Commit writes (already checked by the caller) in the next group; returns the
        group's commit value and the index of this unit's first write in it. Raises what
        the commit raised when the unit fails alone."""
        unit: _Unit[T] = _Unit(writes)
        with self._lock:
            self._queue.append(unit)
            self._queued_entries += len(writes)
            start, self._running = not self._running, True
            if self._wake_at and self._gathered():
                self._arrived.notify()  # (once per group, not per unit: notify is not free)
        if start:
            await trio.lowlevel.cancel_shielded_checkpoint()  # let a burst queue up
            with self._lock:
                first = self._take()
            token = trio.lowlevel.current_trio_token()
            self.threads += 1
            trio.lowlevel.start_thread_soon(
                lambda: self._write(first, token),
                lambda result: self._stopped(result, token), name="meshd group commit")
        if not unit.done:  # (answers come from run_sync_soon: never before this first wait)
            # A wait that cancellation cannot end, as a shielded one (and cheaper: this is
            # per request): the unit is answered whatever happens to its submitter.
            unit.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(_refuse_cancel)
        if unit.error is not None:
            raise unit.error
        assert unit.result is not None
        return unit.result

    def _take(self) -> list[_Unit[T]]:
        """The next group, oldest first (called holding _lock)."""
        group: list[_Unit[T]] = []
        size = 0
        while self._queue and (not group or size + len(self._queue[0].writes) <= self._max):
            unit = self._queue.popleft()
            self._queued_entries -= len(unit.writes)
            group.append(unit)
            size += len(unit.writes)
        self._current = group
        return group

    # -- the writer thread --

    def _write(self, group: list[_Unit[T]], token: trio.lowlevel.TrioToken) -> None:
        """Commit group, then every group queued meanwhile (gathered: see the module
        comment), until no unit comes for linger_s."""
        while True:
            started = time.perf_counter()
            self._run_group(group, token)
            bound = self._gather_s(time.perf_counter() - started)
            self._recent = (self._recent[1], len(group))
            with self._lock:
                if not self._queue:  # idle: costs no unit anything, saves a thread start
                    self._wait_for(1, self._linger_s)
                    if not self._queue:
                        self._running, self._current = False, []
                        return
                self._wait_for(max(self._recent), bound)  # from the first unit queued
                group = self._take()

    def _gathered(self) -> bool:
        """The queue holds the units waited for, or a full group (called holding _lock)."""
        return len(self._queue) >= self._wake_at or self._queued_entries >= self._max

    def _wait_for(self, units: int, bound: float) -> None:
        """Wait (holding _lock, which the wait releases) until that many units are queued,
        or a full group, for at most bound seconds."""
        self._wake_at = units
        try:
            deadline = time.monotonic() + bound
            while not self._gathered():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._arrived.wait(left)
        finally:
            self._wake_at = 0

    def _run_group(self, group: list[_Unit[T]], token: trio.lowlevel.TrioToken) -> None:
        try:
            if self._commit_units is not None:
                value = self._commit_units([unit.writes for unit in group])
            else:
                value = self._commit([write for unit in group for write in unit.writes])
        except Exception as err:  # noqa: BLE001 - the unit gets it, or each is retried alone
            if len(group) == 1:
                token.run_sync_soon(self._refuse, group[0], err)
                return
            for unit in group:  # isolate the unit that cannot be stored
                self._run_group([unit], token)
            return
        token.run_sync_soon(self._answer, group, value)

    def _stopped(self, result: outcome.Outcome[None], token: trio.lowlevel.TrioToken) -> None:
        """The writer thread ended (in that thread). An error here is a bug or the end of
        the process: the units it left are answered, and the error is raised in trio."""
        if isinstance(result, outcome.Error):
            with self._lock:
                left = [*self._current, *self._queue]
                self._queue.clear()
                self._queued_entries = 0
                self._running, self._current = False, []
            token.run_sync_soon(self._interrupted, left, result.error)

    # -- back on the trio thread --

    def _answer(self, group: list[_Unit[T]], value: T) -> None:
        self.groups += 1
        try:
            self._committed(value)
        finally:  # (a bug raising there crashes trio: the units, waiting uncancellably, must
            # still be answered, or the run hangs for good instead of ending)
            offset = 0
            for unit in group:
                self._finish(unit, (value, offset), None)
                offset += len(unit.writes)

    def _refuse(self, unit: _Unit[T], error: Exception) -> None:
        self._finish(unit, None, error)

    def _interrupted(self, left: list[_Unit[T]], error: BaseException) -> None:
        for unit in left:
            if not unit.done:
                self._finish(unit, None, CommitInterrupted("the group commit was interrupted"))
        raise error

    def _finish(self, unit: _Unit[T], result: tuple[T, int] | None, error: Exception | None) -> None:
        unit.result, unit.error, unit.done = result, error, True
        self.units += result is not None
        if unit.task is not None:
            trio.lowlevel.reschedule(unit.task)
            unit.task = None
