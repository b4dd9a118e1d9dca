"""Per-write costs of live sync (issue 20: CPU per daemon in the soak): a small received batch
is verified on the trio thread (receivepipe.py INLINE_VERIFY_BYTES), with no worker-thread hop and no
extra task step, and committed there too when the store's write lock is free; a catch-up batch
still goes to worker threads, and the trio thread never waits for the write lock."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import meshd.net.logsync as logsync
import meshd.net.receivepipe as receivepipe
from meshd.protocol.log import Batch, VerifiedBatch
from meshd.store.db import StoreError

from ..protocol.test_log import allow_all
from .test_logsync import Link, service, wait_until, wire

HANG_GUARD_S = 30  # only reached when the code under test is wrong


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


def record_commit_threads(store: Any) -> list[bool]:
    """Per commit of a received batch: on the trio thread?"""
    on_trio: list[bool] = []
    real_commit = store.commit_batch

    def commit(batch: VerifiedBatch, *, durable: bool) -> None:
        on_trio.append(threading.current_thread() is threading.main_thread())
        real_commit(batch, durable=durable)

    store.commit_batch = commit
    return on_trio


async def test_a_small_received_batch_commits_on_the_trio_thread_when_the_store_is_free(
        tmp_path: Path) -> None:
    """Ten live pushes of one entry, no other writer: each is committed by the time handle()
    returns, on the trio thread, with no worker-thread hop (main: each commit in a worker
    thread, handed back with run_sync_soon; handle() returned before it). Then a catch-up
    batch past the small-batch bound still commits in a worker thread."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    for i in range(10):
        await a.write("s", f"a{i}", bytes(100))
    big = receivepipe.INLINE_VERIFY_ENTRIES + 1
    a.write_many_nowait(("s", f"big{i}", bytes(100)) for i in range(big))
    on_trio = record_commit_threads(b.store)
    peer = b.peer(quiet_send, allow_all)
    committed_at_return: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        await peer.handle({"t": "log.hello", "vector": {}})
        for seq in range(10):
            await peer.handle(wire(a.batch_since(a.author, seq, 150) or {}))
            committed_at_return.append(b.version_vector() == {a.author: seq + 1}
                                       and peer.entries_received == seq + 1)
        await peer.handle(wire(a.batch_since(a.author, 10, 1 << 20) or {}))
        await peer.drain()
        nursery.cancel_scope.cancel()
    assert committed_at_return == [True] * 10  # main: [False] * 10
    assert on_trio == [True] * 10 + [False]  # main: [False] * 11
    assert b.version_vector() == {a.author: 10 + big}
    assert len(b.read("s", limit=100)["records"]) == 10 + big


async def test_a_small_batch_commits_in_a_worker_thread_while_another_holds_the_write_lock(
        tmp_path: Path) -> None:
    """Another thread (the group commit's writer) holds the store's write lock: handle()
    returns without waiting for it (the trio thread never blocks on the lock), the batch
    commits in a worker thread once the lock is free, and its credit comes after."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    await a.write("s", "r", bytes(100))
    on_trio = record_commit_threads(b.store)
    peer = b.peer(quiet_send, allow_all)
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with b.store.write_lock:
            holding.set()
            release.wait(HANG_GUARD_S)

    holder = threading.Thread(target=writer)
    holder.start()
    try:
        assert holding.wait(HANG_GUARD_S)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run)
            await peer.handle({"t": "log.hello", "vector": {}})
            with trio.fail_after(HANG_GUARD_S):  # the trio thread must not wait for the lock
                await peer.handle(wire(a.batch_since(a.author, 0, 1 << 20) or {}))
            assert b.version_vector() == {}  # not committed while the lock is held
            release.set()
            await wait_until(lambda: b.version_vector() == {a.author: 1}, b)
            await peer.drain()
            nursery.cancel_scope.cancel()
    finally:
        release.set()
        holder.join(HANG_GUARD_S)
    assert on_trio == [False]
    assert peer.entries_received == 1


async def test_a_small_batch_commits_in_a_worker_thread_when_the_wal_is_near_its_bound(
        tmp_path: Path) -> None:
    """Past the WAL's room (Store.wal_has_room: the commit might wait for a checkpoint under
    way), a small batch commits in a worker thread, never on the trio thread."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    await a.write("s", "r", bytes(100))
    b.store._wal_hard = 0  # (every commit is past it: the writer checkpoints itself)
    on_trio = record_commit_threads(b.store)
    peer = b.peer(quiet_send, allow_all)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        await peer.handle({"t": "log.hello", "vector": {}})
        await peer.handle(wire(a.batch_since(a.author, 0, 1 << 20) or {}))
        await peer.drain()
        nursery.cancel_scope.cancel()
    assert on_trio == [False]
    assert b.version_vector() == {a.author: 1}


async def test_a_small_batch_whose_commit_fails_on_the_trio_thread_ends_the_sync(
        tmp_path: Path) -> None:
    """The disk fails in a commit made on the trio thread: handle() raises the StoreError
    (nothing of the batch committed, no credit), and so does every later handle()."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    for i in range(2):
        await a.write("s", f"r{i}", bytes(100))

    def commit(_batch: VerifiedBatch, *, durable: bool) -> None:
        raise StoreError("disk full")

    b.store.commit_batch = commit  # type: ignore[method-assign]
    peer = b.peer(quiet_send, allow_all)
    raised = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run)
            await peer.handle({"t": "log.hello", "vector": {}})
            await peer.handle(wire(a.batch_since(a.author, 0, 150) or {}))
            await trio.sleep_forever()  # run() raises it, if handle() did not
    except* StoreError as group:
        raised = list(group.exceptions)
    assert raised
    with pytest.raises(StoreError):
        await peer.handle(wire(a.batch_since(a.author, 1, 150) or {}))
    assert b.version_vector() == {}
    assert peer.entries_received == 0


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.count = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count += 1


async def quiet_send(_message: dict[str, Any]) -> None:
    await trio.lowlevel.checkpoint()
