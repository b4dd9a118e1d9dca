"""A removed member's entries past its removal point: refused on receipt ('past-removal', not
fatal to the connection), cut off a batch that spans the point, dropped from the store when
the removal arrives later; sync between a device that still holds them and one that cut them
does not stall or loop (protocol/logs.md, "A removed member's entries")."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from meshd.net.logsync import LogService
from meshd.protocol.entry import Head
from meshd.protocol.log import (
    CLEAR,
    PUT,
    ZERO_HASH,
    Batch,
    EntryRejected,
    Write,
    compose_batch,
    verify_batch,
)
from meshd.store.db import Store, StoreError

from ..protocol.test_log import allow_all, signer
from .test_logsync import Link, wait_until

WALL_MS = 1_700_000_000_000
THIEF = signer(66)
THIEF_KEY = bytes(THIEF.public)


def service(path: Path, seed: int) -> LogService:
    return LogService(Store(path), signer(seed), lambda: WALL_MS)


def thief_log() -> tuple[Batch, Head]:
    """The thief's log: a put that counts (entry 1), then a clear and garbage, as one batch
    with one head (at 3); and the cutoff at entry 1."""
    good = compose_batch(THIEF, 0, ZERO_HASH, 0, WALL_MS, [Write("notes", "t", PUT, b"ok")])
    bad = compose_batch(THIEF, 1, good.last_hash, good.max_hlc, WALL_MS + 3_600_000,
                        [Write("chat", "", CLEAR), Write("chat", "g", PUT, b"garbage")])
    batch = Batch(THIEF_KEY, good.headers + bad.headers, good.bodies + bad.bodies, bad.heads[-1])
    return batch, good.heads[-1]


def test_a_batch_past_the_cutoff_is_refused_and_one_across_it_is_cut(tmp_path: Path) -> None:
    batch, cutoff = thief_log()
    a = service(tmp_path / "a.db", 1)
    a.write_nowait("chat", "m", b"mine")
    a.cutoff_of = {THIEF_KEY: cutoff}.get
    assert a.ingest_batch(batch, allow_all) == 1  # entry 1 only, ending at the cutoff head
    assert a.store.tip(THIEF_KEY) == (1, cutoff.hash)
    assert [r["body"] for r in a.read("chat")["records"]] == [b"mine"]  # no clear, no garbage
    assert a.ingest_batch(batch, allow_all) == 0  # again: nothing new counts
    past = Batch(THIEF_KEY, batch.headers[1:], batch.bodies[1:], batch.head)
    with pytest.raises(EntryRejected) as err:
        a.ingest_batch(past, allow_all)
    assert err.value.reason == "past-removal"


def test_a_removal_that_arrives_later_drops_what_was_stored(tmp_path: Path) -> None:
    batch, cutoff = thief_log()
    store = Store(tmp_path / "a.db")
    store.commit_batch(verify_batch(batch, 0, ZERO_HASH, allow_all), durable=True)
    a = LogService(store, signer(1), lambda: WALL_MS)  # its clock adopts the thief's
    a.write_nowait("chat", "m", b"written after the clear")
    assert [r["body"] for r in a.read("chat")["records"]] == [b"garbage", b"written after the clear"]
    generation = a.changed.generation
    assert a.apply_cutoffs({THIEF_KEY: cutoff}) == [THIEF_KEY]
    assert a.changed.generation > generation  # peers are woken: the vector changed
    assert [r["body"] for r in a.read("chat")["records"]] == [b"written after the clear"]
    assert [r["body"] for r in a.read("notes")["records"]] == [b"ok"]
    assert a.apply_cutoffs({THIEF_KEY: cutoff}) == []


async def test_a_peer_still_holding_them_neither_stalls_nor_loops(tmp_path: Path) -> None:
    """b has not learnt of the removal: it offers the thief's whole log once; a keeps what
    counts, refuses the rest, and expects nothing more of it (no 'stalled')."""
    batch, cutoff = thief_log()
    a = service(tmp_path / "a.db", 1)
    a.cutoff_of = {THIEF_KEY: cutoff}.get
    store = Store(tmp_path / "b.db")
    store.commit_batch(verify_batch(batch, 0, ZERO_HASH, allow_all), durable=True)
    b = LogService(store, signer(2), lambda: WALL_MS)  # b writes after the clear
    b.write_nowait("chat", "m", b"from b")
    link = Link(a, b)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            link.start(nursery)
            while not (a.version_vector().get(b.author) == 1
                       and a.version_vector().get(THIEF_KEY) == 1 and link.a.behind == 0):
                await trio.testing.wait_all_tasks_blocked()
            # Everything idle, nothing more expected: the stall deadline is off.
            await trio.testing.wait_all_tasks_blocked()
            assert link.a.behind == 0
            thief_batches = [m for m in link.sent["b"] if m.get("t") == "log.entries"
                             and m["author"] == THIEF_KEY]
            assert len(thief_batches) == 1  # offered once, not again
            nursery.cancel_scope.cancel()
    assert [r["body"] for r in a.read("chat")["records"]] == [b"from b"]


def test_a_device_never_drops_its_own_entries(tmp_path: Path) -> None:
    """Removed with a cutoff (by a thief, say, before the words settle it), a device keeps its
    own log: should the removal stop counting, what others dropped flows back from it."""
    a = service(tmp_path / "a.db", 1)
    for i in range(3):
        a.write_nowait("chat", f"m{i}", b"mine")
    head = a.store.newest_head(a.author)
    assert head is not None and head.seq == 3
    assert a.apply_cutoffs({a.author: Head(0, ZERO_HASH, bytes(64))}) == []
    assert a.store.tip(a.author)[0] == 3 and len(a.read("chat")["records"]) == 3


def test_entries_dropped_under_a_cutoff_that_stops_counting_come_back(tmp_path: Path) -> None:
    batch, cutoff = thief_log()
    a = service(tmp_path / "a.db", 1)
    a.cutoff_of = {THIEF_KEY: cutoff}.get
    a.ingest_batch(batch, allow_all)
    assert a.store.tip(THIEF_KEY)[0] == 1
    a.cutoff_of = lambda _author: None  # the removal no longer counts
    assert a.ingest_batch(batch, allow_all) == 2
    assert [r["body"] for r in a.read("chat")["records"]] == [b"garbage"]


def test_a_disk_error_while_dropping_is_logged_not_raised(tmp_path: Path, caplog) -> None:
    batch, cutoff = thief_log()
    a = service(tmp_path / "a.db", 1)
    a.ingest_batch(batch, allow_all)

    def full(_author: bytes, _cutoff: Head) -> bool:
        raise StoreError("database or disk is full")

    a.store.cut_author = full  # type: ignore[method-assign]
    assert a.apply_cutoffs({THIEF_KEY: cutoff}) == []
    assert "could not drop" in caplog.text


async def test_a_changed_cutoff_is_applied_in_the_writer_thread(tmp_path: Path) -> None:
    batch, cutoff = thief_log()
    a = service(tmp_path / "a.db", 1)
    a.ingest_batch(batch, allow_all)
    async with trio.open_nursery() as nursery:
        a.cutoffs_changed({THIEF_KEY: cutoff}, nursery)
        assert a.store.tip(THIEF_KEY)[0] == 3  # not on the calling (trio) thread
        await wait_until(lambda: a.store.tip(THIEF_KEY)[0] == 1, a)
    assert [r["body"] for r in a.read("chat")["records"]] == []


async def test_a_removal_between_verification_and_commit_still_cuts(tmp_path: Path) -> None:
    """A received batch is verified (against the cutoff of that moment), then committed in
    another thread (receivepipe.py). A removal that arrives in between finds nothing past its
    point in the store to drop, so the commit must apply it: main committed the batch with
    the cutoff read before it, and the entries past the removal point stayed, counted."""
    from meshd.net.receivepipe import ReceivePipeline

    batch, cutoff = thief_log()
    a = service(tmp_path / "a.db", 1)
    cutoffs: dict[bytes, Head] = {}
    a.cutoff_of = cutoffs.get
    failures: list[BaseException] = []
    pipeline = ReceivePipeline(a, lambda _batch, _count: None, failures.append)
    a.store.write_lock.acquire()  # the writer thread is busy: the commit waits for it
    try:
        await pipeline.receive(batch, allow_all)  # verified with no cutoff; its commit waits
        cutoffs[THIEF_KEY] = cutoff  # the removal arrives (the circle changed)
        assert a.apply_cutoffs(cutoffs) == []  # nothing of it stored yet: nothing to drop
    finally:
        a.store.write_lock.release()
    with trio.fail_after(30):  # only reached when the code under test hangs
        await pipeline.drain()
    assert failures == []
    assert a.store.tip(THIEF_KEY) == (1, cutoff.hash)  # main: (3, ...), past the removal
