"""Group commit of local writes (meshd/store/groupcommit.py through LogService), on a real SQLite file.

SQLite's trace callback shows what the write connection really executed, and on which
thread: so these tests count transactions, see the synchronous level in force at each local
COMMIT, and hold a COMMIT open to prove the trio thread keeps running meanwhile.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from meshd.net.logsync import LogService, checked_write
from meshd.protocol.log import MAX_BODY_BYTES, PUT, InvalidRequest, PutRun, Write
from meshd.store.db import StoreFull

from ..protocol.test_log import allow_all
from .test_logsync import service

HOLD_LIMIT_S = 10.0  # only a guard against a hang: the tests wait on events, never on time


def trace(logs: LogService, hook: Callable[[str], None] | None = None) -> list[tuple[str, int]]:
    """Every statement the write connection runs from now on, with the thread that ran it."""
    statements: list[tuple[str, int]] = []

    def record(statement: str) -> None:
        statements.append((statement, threading.get_ident()))
        if hook is not None:
            hook(statement)

    logs.store._db.set_trace_callback(record)  # noqa: SLF001 - what SQLite really executed
    return statements


def committed_entries(path: Path) -> int:
    """What another process would find in the file: committed data only."""
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM entries").fetchone()[0])


async def test_concurrent_writes_share_one_transaction_and_are_acknowledged_once_durable(
        tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    statements = trace(logs)
    acknowledged: list[tuple[int, int]] = []  # (seq, entries committed in the file by then)

    async def writer(i: int) -> None:
        result = await logs.write("chat", None, f"message {i}".encode())
        acknowledged.append((result["seq"], committed_entries(logs.store.path)))

    async with trio.open_nursery() as nursery:
        for i in range(16):
            nursery.start_soon(writer, i)

    commits = [s for s, _ in statements if s == "COMMIT"]
    # Submitted together (as requests read in one pass of the event loop are): one
    # transaction, not the first writer alone and the other fifteen after it.
    assert len(commits) == 1 and logs.group_commit.groups == 1
    assert sorted(seq for seq, _ in acknowledged) == list(range(1, 17))
    assert all(entries >= seq for seq, entries in acknowledged)  # durable before the answer
    assert len(logs.read("chat", limit=100)["records"]) == 16


async def test_local_commits_run_with_synchronous_full_even_after_a_normal_sync_commit(
        tmp_path: Path) -> None:
    """Pinned: an acknowledged local write survives power loss (protocol/api.md, store.py)."""
    logs, peer = service(tmp_path, 1), service(tmp_path, 2)
    await peer.write("chat", None, b"from the peer")
    statements = trace(logs)
    assert logs.ingest(peer.batch_since(peer.author, 0, 1 << 20), allow_all) == 1  # NORMAL
    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(logs.write, "chat", None, f"local {i}".encode())
    await logs.delete("chat", "gone")

    level = "?"
    levels_at_commit = []
    for statement, _ in statements:
        if statement.startswith("PRAGMA synchronous="):
            level = statement.split("=", 1)[1]
        elif statement == "COMMIT":
            levels_at_commit.append(level)
    assert levels_at_commit[0] == "NORMAL"  # the received batch
    assert levels_at_commit[1:] and set(levels_at_commit[1:]) == {"FULL"}  # every local one
    assert logs.store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # noqa: SLF001 (FULL)


async def test_the_trio_thread_keeps_running_and_reading_while_a_commit_is_in_progress(
        tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    await logs.write("chat", "before", b"committed earlier")
    in_commit, release = threading.Event(), threading.Event()

    def hold_commit(statement: str) -> None:
        if statement == "COMMIT" and not release.is_set():
            in_commit.set()
            release.wait(HOLD_LIMIT_S)

    statements = trace(logs, hold_commit)
    seen_during_commit: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(logs.write, "chat", "held", b"being committed")
        await trio.to_thread.run_sync(in_commit.wait, HOLD_LIMIT_S)
        # The COMMIT is stalled in the writer thread; this task runs and reads meanwhile.
        seen_during_commit = [r["id"] for r in logs.read("chat")["records"]]
        release.set()
    assert seen_during_commit == ["before"]  # a read sees committed data only
    assert [r["id"] for r in logs.read("chat")["records"]] == ["before", "held"]
    commit_threads = {thread for statement, thread in statements if statement == "COMMIT"}
    assert commit_threads and threading.get_ident() not in commit_threads


async def test_the_writer_thread_commits_the_next_group_without_waiting_for_the_trio_thread(
        tmp_path: Path) -> None:
    """Units that queued during a commit are committed next by the writer thread itself: the
    trio thread answering the previous group (or busy with anything else) is no step of the
    commit loop."""
    logs = service(tmp_path, 1)
    in_commit, release, second_begun = threading.Event(), threading.Event(), threading.Event()
    begins = 0

    def hook(statement: str) -> None:
        nonlocal begins
        if statement == "BEGIN IMMEDIATE":
            begins += 1
            if begins == 2:
                second_begun.set()
        elif statement == "COMMIT" and not release.is_set():
            in_commit.set()
            release.wait(HOLD_LIMIT_S)

    trace(logs, hook)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(logs.write, "chat", "first", b"1")
        await trio.to_thread.run_sync(in_commit.wait, HOLD_LIMIT_S)
        nursery.start_soon(logs.write, "chat", "second", b"2")
        nursery.start_soon(logs.write, "chat", "third", b"3")
        await trio.testing.wait_all_tasks_blocked()  # both queued behind the held commit
        release.set()
        # The trio thread is blocked here (a synchronous wait, on purpose): the second group
        # must begin all the same. HOLD_LIMIT_S only bounds the wait if it never does.
        begun = second_begun.wait(HOLD_LIMIT_S)
    assert begun
    assert logs.group_commit.groups == 2  # the two queued units shared the second
    assert sorted(r["id"] for r in logs.read("chat")["records"]) == ["first", "second", "third"]


async def test_a_unit_that_cannot_be_stored_fails_alone(tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    await logs.write("chat", "first", b"fits")
    logs.store.set_max_pages(logs.store.page_count() + 8)
    results: dict[str, object] = {}

    async def attempt(name: str, writes: list[tuple[str, bytes]]) -> None:
        try:
            results[name] = await logs.submit(
                [checked_write(PUT, "chat", rid, body) for rid, body in writes])
        except StoreFull as err:
            results[name] = err

    in_commit, release = threading.Event(), threading.Event()

    def hold_commit(statement: str) -> None:
        if statement == "COMMIT" and not release.is_set():
            in_commit.set()
            release.wait(HOLD_LIMIT_S)

    trace(logs, hold_commit)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempt, "leader", [("small-1", b"x")])
        await trio.to_thread.run_sync(in_commit.wait, HOLD_LIMIT_S)  # small-1 is committing
        nursery.start_soon(attempt, "huge", [(f"big-{i}", bytes(60_000)) for i in range(20)])
        nursery.start_soon(attempt, "small", [("small-2", b"y")])
        await trio.testing.wait_all_tasks_blocked()  # both queued behind it
        release.set()
    assert isinstance(results["huge"], StoreFull)
    assert isinstance(results["leader"], list) and isinstance(results["small"], list)
    ids = [r["id"] for r in logs.read("chat")["records"]]
    assert ids == ["first", "small-1", "small-2"]
    assert logs.group_commit.groups == 3  # first, small-1, then small-2 retried alone


async def test_a_cancelled_writer_still_gets_its_write_committed_and_the_queue_moves_on(
        tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(logs.write, "chat", "a", b"1")
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()  # cancelled before it even starts waiting
            result = await logs.write("chat", "b", b"2")
        nursery.start_soon(logs.write, "chat", "c", b"3")
    # Submitted means answered: the wait for its group is shielded, so the cancelled caller
    # still learns that its write is durable instead of leaving it unknown.
    assert result["id"] == "b" and result["seq"] == 2
    await logs.write("chat", "d", b"4")
    assert [r["id"] for r in logs.read("chat")["records"]] == ["a", "b", "c", "d"]


async def test_a_bad_write_is_refused_before_it_can_join_a_group(tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    with pytest.raises(InvalidRequest):
        await logs.write("x" * 300, None, b"stream name too long")
    with pytest.raises(InvalidRequest):
        await logs.delete("chat", "")
    with pytest.raises(InvalidRequest):  # a plain Write is checked too; only CheckedWrite skips it
        await logs.submit([Write("chat", "r", PUT, bytes(MAX_BODY_BYTES + 1))])
    assert logs.group_commit.groups == 0


async def test_a_put_run_joins_a_group_as_one_unit_that_the_group_commit_does_not_walk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch request's puts (a PutRun) share a transaction with single writes submitted
    with them, and reach the composition as the PutRun itself: no Write
    per entry is made for them on any thread (PutRun's own iteration would make them)."""
    logs = service(tmp_path, 1)
    statements = trace(logs)
    walked: list[int] = []
    real_iter = PutRun.__iter__

    def spy_iter(self: PutRun) -> Iterator[Write]:
        walked.append(len(self))
        return real_iter(self)
    monkeypatch.setattr(PutRun, "__iter__", spy_iter)
    bodies = [b"%d" % i for i in range(500)]
    answers: dict[str, object] = {}

    async def single(name: str) -> None:
        answers[name] = await logs.write("chat", name, b"one")

    async def run() -> None:
        answers["run"] = await logs.submit_ids(PutRun("bulk", bodies))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(single, "before")
        nursery.start_soon(run)
        nursery.start_soon(single, "after")
    assert [s for s, _ in statements].count("COMMIT") == 1 and walked == []
    ids = answers["run"]
    assert isinstance(ids, list)
    first = ids[0][1]  # the run's entries are consecutive, the singles' around them
    assert [seq for _, seq in ids] == list(range(first, first + 500))
    singles = {answers[name]["seq"] for name in ("before", "after")}  # type: ignore[index]
    assert singles | {seq for _, seq in ids} == set(range(1, 503))
    stored = logs.read("bulk", limit=1000)["records"]
    assert [(r["id"], r["seq"], r["body"]) for r in stored] == [
        (record_id, seq, body) for (record_id, seq), body in zip(ids, bodies, strict=True)]
