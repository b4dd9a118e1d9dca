"""Per-write costs of live sync (issue 20: CPU per daemon in the soak): a small received batch
is verified on the trio thread (receivepipe.py INLINE_VERIFY_BYTES), with no worker-thread hop and no
extra task step; a catch-up batch still goes to a worker thread."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import trio
import trio.testing

import meshd.net.logsync as logsync
import meshd.net.receivepipe as receivepipe
from meshd.protocol.log import Batch, VerifiedBatch

from ..protocol.test_log import allow_all
from .test_logsync import Link, service, wire


def entries_sent(link: Link, side: str) -> list[dict[str, Any]]:
    return [m for m in link.sent[side] if m["t"] == "log.entries"]


async def test_a_small_received_batch_is_verified_on_the_trio_thread_in_one_step(
        tmp_path: Path, monkeypatch: Any) -> None:
    """One-entry batches (a live push): verified on the trio thread (main: a worker thread
    each, a thread hop and two more steps of the reading task), and handle() takes one task
    step when no commit is in flight; a batch over INLINE_VERIFY_BYTES still goes to a
    worker thread."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    for i in range(10):
        await a.write("s", f"a{i}", bytes(100))
    big = 2 * getattr(receivepipe, "INLINE_VERIFY_BYTES", 16384) // 1000  # (main has none)
    a.write_many_nowait(("s", f"big{i}", bytes(1000)) for i in range(big))
    threads: list[bool] = []  # per verification: on the trio thread?
    real_verify = logsync.verify_batch

    def verify(batch: Batch, *args: Any, **kwargs: Any) -> VerifiedBatch:
        threads.append(threading.current_thread() is threading.main_thread())
        return real_verify(batch, *args, **kwargs)

    monkeypatch.setattr(logsync, "verify_batch", verify)
    peer = b.peer(quiet_send, allow_all)
    steps = StepCounter()
    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run)
            await peer.handle({"t": "log.hello", "vector": {}})
            per_message: list[int] = []
            for seq in range(10):
                message = wire(a.batch_since(a.author, seq, 150) or {})
                assert len(message["headers"]) == 1
                await peer.drain()  # (no commit in flight: the steady state of a live push)
                await trio.testing.wait_all_tasks_blocked()
                steps.task, steps.count = trio.lowlevel.current_task(), 0
                await peer.handle(message)
                per_message.append(steps.count)
                steps.task = None
            await peer.drain()
            assert b.version_vector() == {a.author: 10}
            await peer.handle(wire(a.batch_since(a.author, 10, 1 << 20) or {}))
            await peer.drain()
            assert b.version_vector() == {a.author: 10 + big}
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert threads == [True] * 10 + [False]  # main: [False] * 11
    assert per_message == [1] * 10  # main: 3 each (the hop's return, the idle wait, the end)


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.count = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count += 1


async def quiet_send(_message: dict[str, Any]) -> None:
    await trio.lowlevel.checkpoint()
