"""Group commit of local writes, off the trio thread.

Theory of operation. Every local change (an app's put, delete or clear, one record or a
batch of them) is submitted as a unit. Units that arrive while a commit is in progress
queue up, and the next commit takes all of them together (up to MAX_GROUP_ENTRIES): one
composition (entries signed by one head at the end of the group, plus the spacing heads the
log requires), one transaction, one fsync. Each submitter is answered only after the
transaction holding its unit has committed, with synchronous=FULL (Store's local-write
durability), so an acknowledged write survives power loss.

No background task: the first submitter that finds nobody committing leads. The leader
runs groups until its own unit is done, then hands leadership to the oldest waiting unit's
submitter, so a leader's latency is bounded by its own group and the one in flight. The
commit itself runs in a worker thread (trio.to_thread) holding the store's write lock;
the trio thread keeps serving the API, channels and timers meanwhile.

Cancellation: a submitted unit is committed or refused as a whole even if its submitter is
cancelled (the wait is shielded, and only ever as long as one commit), so a cancelled
request never leaves its write half-known or a group without a leader.

Failure: if a group's transaction fails, each unit of it is retried alone, so one unit
that cannot be stored (a full disk that a smaller write still fits in) does not fail the
others; a unit that fails alone gets the exception, and nothing of it was committed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from ..protocol.log import Write

MAX_GROUP_ENTRIES = 20_000

T = TypeVar("T")


class CommitInterrupted(Exception):
    """The process stopped while this write's group was committing; it may or may not be
    durable (as for a write in flight when power fails)."""


@dataclass(eq=False)
class _Unit(Generic[T]):
    writes: Sequence[Write]
    wake: trio.Event = field(default_factory=trio.Event)
    done: bool = False
    result: tuple[T, int] | None = None
    error: Exception | None = None


class GroupCommit(Generic[T]):
    """Commits units of writes in groups. `commit` runs in a worker thread and turns a flat
    list of writes into one durable transaction, returning a value that `results` (on the
    trio thread, after the commit) slices into each unit's answer."""

    def __init__(
        self,
        commit: Callable[[list[Write]], T],
        committed: Callable[[T], None],
        *,
        max_group_entries: int = MAX_GROUP_ENTRIES,
    ) -> None:
        self._commit = commit
        self._committed = committed
        self._max = max_group_entries
        self._queue: list[_Unit[T]] = []
        self._leading = False
        # The one writer thread: received batches (LogService.receive) commit under it too.
        self.limiter = trio.CapacityLimiter(1)
        self.groups = 0  # transactions committed (tests and metrics)
        self.units = 0  # units acknowledged

    async def submit(self, writes: Sequence[Write]) -> tuple[T, int]:
        """Commit writes (already checked by the caller) in the next group; returns the
        group's commit value and the index of this unit's first write in it. Raises what
        the commit raised when the unit fails alone."""
        unit: _Unit[T] = _Unit(writes)
        self._queue.append(unit)
        with trio.CancelScope(shield=True):
            if self._leading:
                await unit.wake.wait()  # done, or handed the lead
            else:
                self._leading = True
            if not unit.done:
                try:
                    await self._lead(unit)
                finally:
                    if self._queue:  # the lead passes to the oldest waiting submitter
                        self._queue[0].wake.set()
                    else:
                        self._leading = False
        if unit.error is not None:
            raise unit.error
        assert unit.result is not None
        return unit.result

    async def _lead(self, mine: _Unit[T]) -> None:
        while not mine.done:
            group, size = [], 0
            while self._queue and (not group or size + len(self._queue[0].writes) <= self._max):
                unit = self._queue.pop(0)
                group.append(unit)
                size += len(unit.writes)
            await self._run_group(group)

    async def _run_group(self, group: list[_Unit[T]]) -> None:
        writes = [write for unit in group for write in unit.writes]
        try:
            value = await trio.to_thread.run_sync(self._commit, writes, limiter=self.limiter)
        except BaseException as err:
            if not isinstance(err, Exception):  # the process is going down: answer everyone
                for unit in group:
                    self._finish(unit, None, CommitInterrupted("the commit was interrupted"))
                raise
            if len(group) == 1:
                self._finish(group[0], None, err)
                return
            for unit in group:  # isolate the unit that cannot be stored
                await self._run_group([unit])
            return
        self.groups += 1
        self._committed(value)
        offset = 0
        for unit in group:
            self._finish(unit, (value, offset), None)
            offset += len(unit.writes)

    def _finish(self, unit: _Unit[T], result: tuple[T, int] | None, error: Exception | None) -> None:
        unit.result, unit.error, unit.done = result, error, True
        self.units += result is not None
        unit.wake.set()
