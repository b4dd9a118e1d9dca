"""Received batches in a pipeline (meshd/net/receivepipe.py): batch n+1 is verified while
batch n commits, commits stay in order, a bad batch refuses only itself, and a commit made
against a tip that moved meanwhile is checked again."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import meshd.net.logsync as logsync
from meshd.net.receivepipe import INLINE_VERIFY_ENTRIES
from meshd.protocol.log import Batch, EntryRejected, VerifiedBatch
from meshd.store.db import StoreError

from ..protocol.test_log import allow_all
from .test_logsync import service, wait_until, wire

HANG_GUARD_S = 30  # only reached when the code under test is wrong
# Entries in a batch past the small-batch bound: verified and committed in worker threads (a
# catch-up batch), the pipelined path; a smaller one may commit on the trio thread
# (test_push_costs.py).
PIPELINED = INLINE_VERIFY_ENTRIES + 1


def batches(sender: logsync.LogService, count: int, budget: int) -> list[dict[str, Any]]:
    sender.write_many_nowait((("s", f"r{i}", bytes(100)) for i in range(count)), chunk_entries=5)
    out: list[dict[str, Any]] = []
    seq = 0
    while (message := sender.batch_since(sender.author, seq, budget)) is not None:
        out.append(wire(message))
        seq = message["head"]["seq"]
    return out


async def quiet_send(_message: dict[str, Any]) -> None:
    await trio.lowlevel.checkpoint()


async def test_the_next_batch_is_verified_while_the_one_before_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batch 2's verification ends while batch 1's commit is still inside the store: the
    commit of batch 1 waits (on an event, in its thread) for batch 2 to be verified, which
    only happens if the reader got batch 2 before batch 1's commit returned (main: it
    verifies and commits one batch at a time, so batch 2 is never read meanwhile)."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    messages = batches(a, 4 * PIPELINED, 300 * PIPELINED)
    assert len(messages) >= 3
    assert all(len(m["headers"]) >= PIPELINED for m in messages)
    second_head = messages[1]["head"]["seq"]
    events: list[str] = []
    second_verified = threading.Event()
    real_verify = logsync.verify_batch

    def verify(batch: Batch, *args: Any, **kwargs: Any) -> VerifiedBatch:
        verified = real_verify(batch, *args, **kwargs)
        events.append(f"verified {batch.head.seq}")
        if batch.head.seq == second_head:
            second_verified.set()
        return verified

    monkeypatch.setattr(logsync, "verify_batch", verify)
    real_commit = b.store.commit_batch
    overlapped: list[bool] = []

    def commit(batch: VerifiedBatch, *, durable: bool) -> None:
        events.append(f"commit {batch.last_seq} starts")
        if not overlapped:  # batch 1: hold its commit until batch 2 is verified
            overlapped.append(second_verified.wait(HANG_GUARD_S))
        real_commit(batch, durable=durable)
        events.append(f"commit {batch.last_seq} ends")

    b.store.commit_batch = commit  # type: ignore[method-assign]
    peer = b.peer(quiet_send, allow_all)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        await peer.handle({"t": "log.hello", "vector": {}})
        for message in messages:
            await peer.handle(message)
        await wait_until(lambda: b.version_vector() == {a.author: 4 * PIPELINED}, b)
        nursery.cancel_scope.cancel()
    assert overlapped == [True]
    first = messages[0]["head"]["seq"]
    assert events.index(f"verified {second_head}") < events.index(f"commit {first} ends")
    # Commits in arrival order, each once, and everything landed.
    commits = [e for e in events if e.startswith("commit") and e.endswith("ends")]
    assert commits == [f"commit {m['head']['seq']} ends" for m in messages]
    assert b.version_vector() == {a.author: 4 * PIPELINED}
    assert peer.entries_received == 4 * PIPELINED


async def test_a_bad_batch_refuses_only_itself(tmp_path: Path) -> None:
    """Batch 2 has a body that does not match its hash: batch 1 (verified, its commit in
    flight when batch 2 is checked) is committed, batch 2 and after are not."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    messages = batches(a, 30, 1500)
    messages[1]["bodies"][0] = b"y"
    peer = b.peer(quiet_send, allow_all)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        await peer.handle({"t": "log.hello", "vector": {}})
        await peer.handle(messages[0])
        with pytest.raises(EntryRejected) as refused:
            await peer.handle(messages[1])
        nursery.cancel_scope.cancel()
    assert refused.value.reason == "bad-body"
    assert b.version_vector() == {a.author: messages[0]["head"]["seq"]}
    assert peer.entries_received == messages[0]["head"]["seq"]


async def test_a_commit_after_the_tip_moved_is_checked_again(tmp_path: Path) -> None:
    """A batch verified against a tip that another connection has moved by the time it
    commits is verified again against the tip found: nothing is committed twice."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    messages = batches(a, 10, 1 << 20)
    batch = Batch.from_message(messages[0])
    verified = b.verify_received(batch, True, None, 0, bytes(32))
    assert b.ingest(messages[0], allow_all) == 10  # another connection got there first
    assert b.commit_verified(batch, True, None, 0, bytes(32), verified) == 0
    assert b.version_vector() == {a.author: 10}
    assert len(b.read("s", limit=100)["records"]) == 10


async def test_a_failed_commit_ends_the_sync(tmp_path: Path) -> None:
    """Our disk fails while a batch commits after handle() returned: the failure is raised
    by the PeerSync (drain, the next handle, or run), not lost with the thread."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    messages = batches(a, 10, 1 << 20)

    def commit(_batch: VerifiedBatch, *, durable: bool) -> None:
        raise StoreError("disk full")

    b.store.commit_batch = commit  # type: ignore[method-assign]
    peer = b.peer(quiet_send, allow_all)
    raised = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run)
            await peer.handle({"t": "log.hello", "vector": {}})
            await peer.handle(messages[0])
            await trio.sleep_forever()  # run() raises it
    except* StoreError:
        raised = True
    assert raised
    with pytest.raises(StoreError):
        await peer.handle({"t": "log.credit", "bytes": 1000})
    assert b.version_vector() == {}


async def test_the_end_of_a_sync_waits_for_the_commit_in_flight(tmp_path: Path) -> None:
    """The connection's tasks are cancelled while a received batch commits (handle() has
    returned): the PeerSync's end waits for that commit, so nothing runs on after the
    session (the daemon may close the store next)."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    messages = batches(a, PIPELINED, 1 << 20)
    cancelled = threading.Event()
    real_commit = b.store.commit_batch

    def commit(batch: VerifiedBatch, *, durable: bool) -> None:
        assert cancelled.wait(HANG_GUARD_S)
        real_commit(batch, durable=durable)

    b.store.commit_batch = commit  # type: ignore[method-assign]
    peer = b.peer(quiet_send, allow_all)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        await peer.handle({"t": "log.hello", "vector": {}})
        await peer.handle(messages[0])
        nursery.cancel_scope.cancel()
        cancelled.set()
    assert b.version_vector() == {a.author: PIPELINED}
