"""meshd/store/purge.py over a real SQLite store: a purge within the debounce after a commit that
purged, one per burst, and one at start for what a crash left in the WAL."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from functools import partial
from pathlib import Path

import trio
import trio.testing

from meshd.net.logsync import CommitSignal
from meshd.protocol.log import DELETE, PUT, Write
from meshd.store.db import Store, StoreError
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
        await purger.wait_purged(1)  # the start-up purge
        assert purger.purges == 1 and not store.purge_pending
        for n in range(3):  # a burst: each commit wakes the purger
            write(store, [Write("s", str(n), DELETE)])
            changed.fire()
        assert holding(tmp_path, secrets[0])  # the database file: its page not yet replaced
        start = trio.current_time()
        await purger.wait_purged(2)
        assert trio.current_time() - start >= PURGE_DEBOUNCE_S  # the burst shared the debounce
        await trio.sleep(PURGE_DEBOUNCE_S * 2)
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
        await purger.wait_purged(1)
        assert holding(crashed, secret) == []
        nursery.cancel_scope.cancel()
    reopened.close()


async def test_a_reader_in_the_wal_never_holds_the_event_loop_and_the_purge_still_lands(
        tmp_path: Path) -> None:
    """Store.purge() used to wait for readers (SQLite's busy timeout, 5 s) on the trio thread,
    then fail and wait 5 s more (issue 20). Now each try runs in a worker thread and never
    waits: a reader holding an old snapshot holds up only the purge, which lands once the
    reader is done."""
    store = Store(tmp_path / "m.db")
    secret = b"SECRET-" + os.urandom(8).hex().encode()
    write(store, [Write("s", "x", PUT, secret * 10)])
    write(store, [Write("s", "x", DELETE)])
    reader = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM bodies").fetchone()  # a snapshot in the WAL
    tries: list[tuple[bool, object]] = []  # (on the trio thread, what it answered)
    held_up = trio.Event()
    purge = store.purge

    def watched() -> bool:
        on_loop = threading.current_thread() is threading.main_thread()
        done = False
        try:
            done = purge()
        except StoreError as err:  # (main waited 5 s on the trio thread, then raised)
            tries.append((on_loop, err))
            raise
        else:
            tries.append((on_loop, done))
        finally:
            if not done:
                (held_up.set if on_loop else partial(trio.from_thread.run_sync, held_up.set))()
        return done

    store.purge = watched  # type: ignore[method-assign]
    purger = Purger(store, CommitSignal(), debounce_s=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(purger.run)
        await held_up.wait()  # a try the reader held up...
        assert purger.purges == 0 and holding(tmp_path, secret)
        reader.execute("COMMIT")  # ...and the trio thread is free to end the read
        await purger.wait_purged(1)
        assert holding(tmp_path, secret) == []
        nursery.cancel_scope.cancel()
    assert purger.held_up == len(tries) - 1 >= 1
    assert tries[-1] == (False, True)
    assert all(not on_loop and type(done) is bool for on_loop, done in tries), tries
    reader.close()
    store.close()
