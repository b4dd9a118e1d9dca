"""meshd/store/purge.py over a real SQLite store: a purge within the debounce after a commit that
purged, one per burst, and one at start for what a crash left in the WAL."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import trio
import trio.testing

from meshd.net.logsync import CommitSignal
from meshd.protocol.log import DELETE, PUT, Write
from meshd.store.db import Store
from meshd.store.purge import PURGE_DEBOUNCE_S, Purger

from .test_store import write


def holding(directory: Path, needle: bytes) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if needle in p.read_bytes())


async def test_a_burst_of_deletes_is_purged_once_within_the_debounce(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    store = Store(tmp_path / "m.db")
    secrets = [b"SECRET-" + os.urandom(8).hex().encode() for _ in range(3)]
    for n, secret in enumerate(secrets):
        write(store, [Write("s", str(n), PUT, secret * 10)])
    changed = CommitSignal()
    purger = Purger(store, changed)
    async with trio.open_nursery() as nursery:
        await nursery.start(purger.run)
        await trio.sleep(PURGE_DEBOUNCE_S * 2)  # mock clock: the start-up purge is done
        assert purger.purges == 1 and not store.purge_pending
        for n in range(3):  # a burst: each commit wakes the purger
            write(store, [Write("s", str(n), DELETE)])
            changed.fire()
        assert holding(tmp_path, secrets[0])  # the database file: its page not yet replaced
        await trio.sleep(PURGE_DEBOUNCE_S)
        await trio.testing.wait_all_tasks_blocked()
        assert purger.purges == 2  # one for the burst
        assert all(holding(tmp_path, s) == [] for s in secrets)
        write(store, [Write("s", "new", PUT, b"nothing purged")])
        changed.fire()
        await trio.sleep(PURGE_DEBOUNCE_S * 2)
        assert purger.purges == 2  # a commit that purged nothing costs no checkpoint
        nursery.cancel_scope.cancel()
    store.close()


async def test_what_a_crash_left_in_the_wal_is_purged_at_start(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    live.mkdir()
    store = Store(live / "m.db")
    secret = b"SECRET-" + os.urandom(8).hex().encode()
    write(store, [Write("s", "x", PUT, secret * 10)])
    write(store, [Write("s", "x", DELETE)])
    shutil.copytree(live, crashed)  # the files as kill -9 leaves them: the WAL not purged
    store.close()
    assert "m.db-wal" in holding(crashed, secret)
    reopened = Store(crashed / "m.db")
    purger = Purger(reopened, CommitSignal())
    async with trio.open_nursery() as nursery:
        await nursery.start(purger.run)
        await trio.sleep(PURGE_DEBOUNCE_S)
        await trio.testing.wait_all_tasks_blocked()
        assert purger.purges == 1
        assert holding(crashed, secret) == []
        nursery.cancel_scope.cancel()
    reopened.close()
