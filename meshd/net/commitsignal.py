"""CommitSignal: what tasks and listeners follow the log's commits by (LogService.changed)."""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..containment import report_bug


class CommitSignal:
    """Something to await new commits: `generation` counts them; wait(seen) returns once
    it has moved past `seen`. Listeners (cheap, meant never to raise: one that does is a
    bug, reported, and the others still run) run at each commit on the trio thread:
    bookkeeping, or waking a task only when its own condition holds."""

    def __init__(self) -> None:
        self.generation = 0
        self._event = trio.Event()
        self._listeners: list[Callable[[], None]] = []

    def listen(self, listener: Callable[[], None]) -> Callable[[], None]:  # returns the undo
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def fire(self) -> None:
        self.generation += 1
        for listener in list(self._listeners):
            try:
                listener()
            except Exception as err:  # a bug in a listener must not skip the others nor the
                # waiters, nor reach a group commit's answer (a run_sync_soon callback: an
                # error there crashes trio while the write's unit waits uncancellably)
                report_bug("commit-listener", err)
        self._event.set()
        self._event = trio.Event()

    async def wait(self, seen: int) -> int:
        while self.generation == seen:
            await self._event.wait()
        return self.generation
