"""The relay's one storage writer: group commit in a worker thread.

Writes go through one writer task that batches every deposit waiting at that moment into a
single transaction in a worker thread, so the event loop keeps serving while the storage
syncs, and a batch costs one fsync however many devices deposited. A deposit is answered
relay.ok only after its transaction committed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import trio

from .storage import NewEnvelope, RelayStorage

T = TypeVar("T")


@dataclass(eq=False)
class Pending:
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None
    on_done: Callable[[Pending], None] | None = None  # called in trio, instead of a waiter


class GroupCommitWriter:
    """The one writer: runs storage writes in a worker thread, batching deposits."""

    def __init__(self, storage: RelayStorage) -> None:
        self._storage = storage
        self._deposits: list[tuple[NewEnvelope, Pending]] = []  # in arrival order
        self._operations: list[tuple[Callable[[], Any], Pending]] = []
        self._wakeup = trio.Event()
        self.batches = 0

    def deposit_nowait(self, item: NewEnvelope, on_done: Callable[[Pending], None]) -> None:
        """Queue a deposit; on_done(pending) runs once it is committed (result: its id)
        or failed (error). No task per deposit: the relay's hot path."""
        self._deposits.append((item, Pending(on_done=on_done)))
        self._wakeup.set()

    async def run(self, operation: Callable[[], T]) -> T:
        pending = Pending()
        self._operations.append((operation, pending))
        self._wakeup.set()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[no-any-return]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self._commit()

    async def _commit(self) -> None:
        # A method of its own so that nothing of the batch (a segment's bytes in an operation)
        # stays referenced while the writer waits for the next (issue 20).
        deposits, self._deposits = self._deposits, []
        operations, self._operations = self._operations, []
        # Not cancellable: a write in flight finishes, then its waiters learn the result.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._apply, deposits, operations)
        self.batches += 1
        for _, pending in deposits + operations:  # type: ignore[operator, unused-ignore]
            pending.done.set()
            if pending.on_done is not None:
                pending.on_done(pending)

    def _apply(self, deposits: list[tuple[NewEnvelope, Pending]],
               operations: list[tuple[Callable[[], Any], Pending]]) -> None:
        # Runs in the worker thread. Exceptions are handed to the waiting task, which
        # raises them: a storage failure fails that request, never silently.
        if deposits:
            try:
                results = self._storage.add_envelopes([item for item, _ in deposits])
                for (_, pending), result in zip(deposits, results, strict=True):
                    pending.result = result
            except Exception as err:  # noqa: BLE001 - re-raised in each waiting task
                for _, pending in deposits:
                    pending.error = err
        for operation, pending in operations:
            try:
                pending.result = operation()
            except Exception as err:  # noqa: BLE001 - re-raised in the waiting task
                pending.error = err
