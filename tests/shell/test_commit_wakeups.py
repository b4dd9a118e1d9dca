"""Tasks woken per commit (issue 20): a commit that concerns no follower wakes none of them.

The soak's daemon spent about a third of its trio thread on trio's own scheduling, ~35 task
wake-ups per own write; five tasks waited on LogService.changed and woke at every commit
(the `entries` events, the relay links' deposit/backup nudge, the held-batch release, the
purger, the shared relay list). Bookkeeping is now a listener of the commit signal, and a task
that acts on a commit only now and then is woken by a listener when its own condition holds.
An in-process daemon with a relay link (to a loopback port nothing listens on) and no mDNS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from meshd.config import Config, DiscoveryConfig, ListenAddress
from meshd.daemon import Daemon
from meshd.net.commitsignal import CommitSignal
from meshd.protocol.log import DELETE, PUT, Write
from meshd.relay import shared
from meshd.store.db import Store
from meshd.store.purge import Purger

from .test_store import write

WRITES = 12
NOWHERE_RELAY = "127.0.0.1:9#" + "A" * 43  # the discard port: refused, retried with backoff
OTHER_RELAY = "127.0.0.1:9#" + "B" * 43


@asynccontextmanager
async def running_daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    (tmp_path / "state").mkdir()
    config = Config(state_dir=tmp_path / "state", socket_path=tmp_path / "meshd.sock",
                    listen=ListenAddress("127.0.0.1", 0), pairing_port=0,
                    discovery=DiscoveryConfig(enabled=False), relays=(NOWHERE_RELAY,))
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.stop()


def waiters_at_each_fire(signal: CommitSignal, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many tasks each commit wakes through the signal's event."""
    counts: list[int] = []
    fire = signal.fire

    def counting() -> None:
        counts.append(signal._event.statistics().tasks_waiting)
        fire()

    monkeypatch.setattr(signal, "fire", counting)
    return counts


async def test_plain_writes_wake_no_commit_follower_and_still_do_their_bookkeeping(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_daemon(tmp_path) as daemon:
        assert daemon.relay_links is not None  # the relay followers run
        await trio.testing.wait_all_tasks_blocked()
        backup_nudges = 0

        def nudged(*, prompt: bool = False) -> None:
            nonlocal backup_nudges
            backup_nudges += 1

        monkeypatch.setattr(daemon.relay_links.backup_loop, "changed", nudged)
        counts = waiters_at_each_fire(daemon.logs.changed, monkeypatch)
        async with daemon.events.subscribe(frozenset({"entries"})) as subscription:
            for i in range(WRITES):
                await daemon.logs.write("notes", f"n{i}", b"x" * 100)
                await trio.testing.wait_all_tasks_blocked()
            entries = [event.data for event in subscription.take_all()]
        assert len(counts) == WRITES
        # Was 4: entries events, relay nudge, held, the shared relay list (and the purger);
        # the list's follower (meshd/relay/shared.py) was the last, re-reading it per commit.
        assert max(counts) == 0, counts
        assert backup_nudges == WRITES  # the relay links heard of every commit
        assert [(e["first_seq"], e["last_seq"]) for e in entries] == [
            (i + 1, i + 1) for i in range(WRITES)]
        assert all(e["local"] for e in entries)


async def test_the_shared_relay_list_is_read_again_only_after_a_commit_that_changed_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_daemon(tmp_path) as daemon:
        await trio.testing.wait_all_tasks_blocked()
        reads = 0
        read = shared.read_list  # (shared_relays and the follower read the list through it)

        def counting(logs: object) -> tuple[dict[str, bool], list[str]]:
            nonlocal reads
            reads += 1
            return read(logs)  # type: ignore[arg-type]

        monkeypatch.setattr(shared, "read_list", counting)
        for i in range(WRITES):
            await daemon.logs.write("notes", f"n{i}", b"x" * 100)
            await trio.testing.wait_all_tasks_blocked()
        assert reads == 0  # was one per commit
        links = daemon.relay_links
        assert links is not None and not links.uses(OTHER_RELAY)
        await shared.publish(daemon.logs, OTHER_RELAY, use=True)  # (reads it once itself)
        await trio.testing.wait_all_tasks_blocked()
        assert links.uses(OTHER_RELAY)  # the follower read it again and linked the relay
        assert reads == 2
        await shared.publish(daemon.logs, OTHER_RELAY, use=False)
        await trio.testing.wait_all_tasks_blocked()
        assert not links.uses(OTHER_RELAY)


def test_a_stream_s_count_of_changes_moves_only_with_commits_that_touch_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    try:
        assert store.stream_changes("a") == store.stream_changes("b") == 0
        write(store, [Write("a", "1", PUT, b"x")])
        write(store, [Write("a", "2", PUT, b"x"), Write("b", "1", PUT, b"x")])
        write(store, [Write("c", "1", PUT, b"x")])
        assert (store.stream_changes("a"), store.stream_changes("b"), store.stream_changes("c")) == (2, 1, 1)
    finally:
        store.close()


async def test_the_purger_wakes_only_for_a_commit_that_left_bodies_to_purge(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    store = Store(tmp_path / "m.db")
    changed = CommitSignal()
    purger = Purger(store, changed)
    steps = StepCounter("Purger.run")
    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(purger.run)
            await purger.wait_purged(1)  # the start-up purge
            await trio.testing.wait_all_tasks_blocked()
            before = steps.count
            for n in range(WRITES):  # new records: nothing superseded, nothing to purge
                write(store, [Write("s", str(n), PUT, b"body")])
                changed.fire()
                await trio.testing.wait_all_tasks_blocked()
            assert steps.count == before  # was one step per commit
            write(store, [Write("s", "0", DELETE)])
            changed.fire()
            await purger.wait_purged(2)  # a commit that purged: woken, purged
            assert not store.purge_pending
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.remove_instrument(steps)
        store.close()


class StepCounter(trio.abc.Instrument):
    def __init__(self, name_part: str) -> None:
        self.name_part = name_part
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.name_part in task.name:
            self.count += 1
