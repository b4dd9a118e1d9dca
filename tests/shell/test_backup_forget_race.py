"""A relay found to be a new incarnation (Backups.forget) is started again from version 0,
and "an upload still running for the old incarnation writes nothing more".

Since the ledger writes of an upload run in a worker thread (backup.py's _stored and
_set_pending, off the trio thread), the upload's check of state.forgotten and its write could
be split by forget(): the reset wrote version 0, then the old upload wrote its version over it.
The next upload then took the new incarnation's version 0 for a rollback (relay.misbehaved,
and no upload until the relay's version passed the stale one).

The test holds the upload's worker thread right at its ledger write, runs forget() (in a
thread of its own, standing in for the trio thread, which would otherwise wait for the store's
write lock in the test's place), and lets the upload go on once forget() finished or waits for
the store's write lock: no sleeps, either order is forced."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

import trio

from meshd.backup import Backups
from meshd.backupstate import VERSION_KEY, BackupLedger
from meshd.protocol.relay import SEGMENT_ID_BYTES

from .test_backup_leaks import ADDRESS, FakeRelay, Host, host  # noqa: F401  (host: a fixture)


class WatchedLock:
    """The store's write lock, calling `contended` when a thread has to wait for it."""

    def __init__(self, lock: threading.RLock, contended: Callable[[], None]) -> None:
        self._lock = lock
        self._contended = contended

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if not blocking:
            return False
        self._contended()
        return self._lock.acquire(True, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


async def test_an_upload_of_the_old_incarnation_writes_no_version_over_the_reset(host: Host) -> None:  # noqa: F811
    relay = FakeRelay()
    backups = Backups(host, lambda *_: None)
    token = trio.lowlevel.current_trio_token()
    at_write = trio.Event()  # the upload's worker thread is at its version write
    forgotten = trio.Event()  # forget() finished, or waits for the store's write lock
    go_on = threading.Event()
    forgetting = threading.Event()
    held = [False]
    store = host.store
    real_set_state = store.set_state

    def set_state(key: str, value: bytes) -> None:
        if key == VERSION_KEY.format(ADDRESS) and not held[0] and not forgetting.is_set():
            held[0] = True
            trio.from_thread.run_sync(at_write.set)
            go_on.wait()
        real_set_state(key, value)

    def contended() -> None:
        if forgetting.is_set():
            token.run_sync_soon(forgotten.set)

    store.set_state = set_state  # type: ignore[method-assign]
    store.write_lock = WatchedLock(store.write_lock, contended)  # type: ignore[assignment]
    uploaded: list[bool] = []

    async def upload() -> None:
        uploaded.append(await backups.upload(ADDRESS, relay))  # type: ignore[arg-type]

    def forget() -> None:
        forgetting.set()
        backups.forget(ADDRESS)  # the relay came back wiped: a new incarnation

    async def forget_then_signal() -> None:
        await trio.to_thread.run_sync(forget)
        forgotten.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upload)
        await at_write.wait()
        nursery.start_soon(forget_then_signal)
        await forgotten.wait()
        go_on.set()
    assert uploaded == [True] and relay.stored is not None  # stored at the old incarnation
    again = BackupLedger(store, SEGMENT_ID_BYTES).load(ADDRESS)
    assert again.version == 0, "the old incarnation's upload wrote its version over the reset"
    assert again.pending == set()
