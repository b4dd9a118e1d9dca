"""meshd/relay/mailboxes.py over a real SQLite store and a fake relay client: a fetched run
of envelopes costs one durable state commit (the replay tracker and the mailbox cursor
together), not one per envelope, and both are saved before the run is acknowledged (issue
20: on a device catching up, one fsync per envelope on the trio thread)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from meshd.localerrors import LocalErrorBackoff
from meshd.relay import mailboxes as mailboxes_module
from meshd.relay.linkhost import TRACKER_KEY, cursor_key
from meshd.relay.mailboxes import Mailboxes
from meshd.store.db import Store

from .test_logsync import service, wire

SENDER = b"\x02" * 32
MAILBOX = b"m" * 32
RELAY = "relay.test:1"
RUN = 50


class CountingStore(Store):
    """Counts durable commits (each one an fsync)."""

    durable_commits = 0

    @contextmanager
    def _transaction(self, *, durable: bool, doing: str = "write") -> Iterator[None]:
        with super()._transaction(durable=durable, doing=doing):
            yield
        self.durable_commits += durable


class FakeLogs:
    def __init__(self) -> None:
        self.ingested: list[int] = []

    async def receive_message(self, batch: dict[str, Any], allowed: Any) -> int:
        self.ingested.append(batch["seq"])
        return 1

    def version_vector(self) -> dict[bytes, int]:
        return {SENDER: len(self.ingested)}


class FakeClient:
    """Serves RUN envelopes in one fetch answer; records the store's state at each ack."""

    def __init__(self, store: Store, run: int = RUN) -> None:
        self.run = run
        self.address = RELAY
        self.incarnation = None
        self.connects = 1
        self.store = store
        self.acked: list[tuple[int, bytes | None, bytes | None]] = []
        self.done = trio.Event()
        self.session = SimpleNamespace(ack=self._ack, aclose=None)

    async def watch(self, mailbox: bytes) -> Any:
        return SimpleNamespace(wait=trio.sleep_forever, close=lambda: None)

    async def wait_connected(self) -> None:
        pass

    async def fetch(self, mailbox: bytes, after: int, limit: int) -> Any:
        items = [(i, msgpack.packb({"seq": i})) for i in range(after + 1, self.run + 1)][:limit]
        return SimpleNamespace(items=items, more=False)

    async def _ack(self, mailbox: bytes, upto: int) -> None:
        self.acked.append((upto, self.store.get_state(cursor_key(RELAY, MAILBOX)),
                           self.store.get_state(TRACKER_KEY)))
        if upto == self.run:
            self.done.set()


def _daemon(store: Store, logs: FakeLogs) -> Any:
    return SimpleNamespace(
        store=store, logs=logs, is_author_allowed=lambda author: True,
        circle=SimpleNamespace(state=SimpleNamespace(is_member=lambda key: True, removed={})),
        events=SimpleNamespace(publish=lambda *args, **fields: None),
        presence=SimpleNamespace(relay_letter=lambda sender, relay: None),
        count_error=lambda reason: None)


@pytest.fixture
def plain_envelopes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Envelopes as plain msgpack from SENDER (opening them is tested in tests/protocol)."""

    def open_envelope(envelope: bytes, **kwargs: Any) -> Any:
        seq = msgpack.unpackb(envelope)["seq"]
        return SimpleNamespace(sender=SENDER, seq=seq,
                               payload={"t": "log.entries", "author": SENDER, "seq": seq})

    monkeypatch.setattr(mailboxes_module, "open_envelope", open_envelope)


@pytest.mark.usefixtures("plain_envelopes")
async def test_a_fetched_run_costs_one_durable_commit_saved_before_its_ack(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "m.db")
    logs = FakeLogs()
    health = SimpleNamespace(hole=lambda *a: None, filled=lambda *a: None, misbehaved=lambda *a: None)
    mailboxes = Mailboxes(_daemon(store, logs), SimpleNamespace(), health, LocalErrorBackoff(),
                          lambda relay: None)
    client = FakeClient(store)
    before = store.durable_commits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mailboxes._drain_one, client, MAILBOX)
        await client.done.wait()
        nursery.cancel_scope.cancel()
    assert logs.ingested == list(range(1, RUN + 1))  # every envelope applied, in order
    assert store.durable_commits - before == 1  # the tracker and the cursor, together
    upto, cursor, tracker = client.acked[-1]
    assert upto == RUN and cursor == str(RUN).encode()  # saved before the ack...
    assert tracker is not None
    assert msgpack.unpackb(tracker, strict_map_key=False) == {SENDER: [RUN, []]}  # ...with it


async def test_an_ingest_waiting_on_the_store_lock_leaves_the_trio_thread_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fetched log batch is verified and committed off the trio thread (issue 20): while
    the store's write lock is held elsewhere (a purge, a checkpoint step), the batch's
    commit waits in a worker thread and every other trio task keeps running."""
    sender, receiver = service(tmp_path, 1), service(tmp_path, 2)
    await sender.write("notes", "a", b"hello")
    message = wire(sender.batch_since(sender.author, 0, 1 << 20) or {})
    monkeypatch.setattr(mailboxes_module, "open_envelope", lambda envelope, **kwargs: SimpleNamespace(
        sender=sender.author, seq=msgpack.unpackb(envelope)["seq"], payload=message))
    health = SimpleNamespace(hole=lambda *a: None, filled=lambda *a: None, misbehaved=lambda *a: None)
    mailboxes = Mailboxes(_daemon(receiver.store, receiver), SimpleNamespace(), health,
                          LocalErrorBackoff(), lambda relay: None)
    client = FakeClient(receiver.store, run=1)
    held, progressed = threading.Event(), threading.Event()
    released_after_progress: list[bool] = []

    def hold_the_write_lock() -> None:
        with receiver.store.write_lock:
            held.set()
            # Released once a trio task ran while the ingest waits (the timeout only ends a
            # run of code that blocks the trio thread: the assertion below then fails).
            released_after_progress.append(progressed.wait(timeout=10))

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    held.wait()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailboxes._drain_one, client, MAILBOX)
            # Every task blocked: the drain waits for the worker thread, which waits for the lock.
            await trio.testing.wait_all_tasks_blocked()
            progressed.set()
            await client.done.wait()
            nursery.cancel_scope.cancel()
    finally:
        progressed.set()
        holder.join()
    assert released_after_progress == [True]
    assert receiver.read("notes")["records"][0]["body"] == b"hello"  # committed, then acked
    assert client.acked[-1][:2] == (1, b"1")
    receiver.store.close()
    sender.store.close()


class CancelledOnceLogs(FakeLogs):
    """The first batch's receive waits (as trio.to_thread.run_sync checkpoints before its
    thread starts) until the drain is cancelled: nothing of it committed."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = trio.Event()

    async def receive_message(self, batch: dict[str, Any], allowed: Any) -> int:
        if not self.waiting.is_set():
            self.waiting.set()
            await trio.sleep_forever()
        return await super().receive_message(batch, allowed)


@pytest.mark.usefixtures("plain_envelopes")
async def test_an_envelope_whose_apply_was_cancelled_is_applied_when_fetched_again(tmp_path: Path) -> None:
    """A drain cancelled (a new epoch's mailbox set) while a batch waits to be committed:
    the tracker forgets the acceptance, so the envelope, fetched again, is no copy."""
    store = Store(tmp_path / "m.db")
    logs = CancelledOnceLogs()
    health = SimpleNamespace(hole=lambda *a: None, filled=lambda *a: None, misbehaved=lambda *a: None)
    mailboxes = Mailboxes(_daemon(store, logs), SimpleNamespace(), health, LocalErrorBackoff(),
                          lambda relay: None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mailboxes._drain_one, FakeClient(store), MAILBOX)
        await logs.waiting.wait()
        nursery.cancel_scope.cancel()
    client = FakeClient(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mailboxes._drain_one, client, MAILBOX)
        await client.done.wait()
        nursery.cancel_scope.cancel()
    assert logs.ingested == list(range(1, RUN + 1))
    store.close()


class LockedAfterRunLogs(FakeLogs):
    """Once the run's last envelope is applied, another thread takes the store's write lock
    (the group commit's writer, a purge) and keeps it until a trio task ran meanwhile."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.held, self.progressed = threading.Event(), threading.Event()
        self.released_after_progress: list[bool] = []
        self.holder: threading.Thread | None = None
        self.locked = trio.Event()

    async def receive_message(self, batch: dict[str, Any], allowed: Any) -> int:
        count = await super().receive_message(batch, allowed)
        if batch["seq"] == RUN:
            def hold() -> None:
                with self.store.write_lock:
                    self.held.set()
                    # The timeout only ends a run of code blocking the trio thread.
                    self.released_after_progress.append(self.progressed.wait(timeout=10))

            self.holder = threading.Thread(target=hold)
            self.holder.start()
            self.held.wait()
            self.locked.set()
        return count


@pytest.mark.usefixtures("plain_envelopes")
async def test_the_cursor_save_waiting_on_the_store_lock_leaves_the_trio_thread_serving(
        tmp_path: Path) -> None:
    """The tracker and cursor are saved (one durable commit, an fsync) before the ack, under
    the store's write lock: main saved them on the trio thread, which stalled the event loop
    for as long as another thread held that lock (a commit, its checkpoint at the WAL's hard
    bound). Now the save runs in a worker thread, still in order and before the ack."""
    store = Store(tmp_path / "m.db")
    logs = LockedAfterRunLogs(store)
    health = SimpleNamespace(hole=lambda *a: None, filled=lambda *a: None, misbehaved=lambda *a: None)
    mailboxes = Mailboxes(_daemon(store, logs), SimpleNamespace(), health, LocalErrorBackoff(),
                          lambda relay: None)
    client = FakeClient(store)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailboxes._drain_one, client, MAILBOX)
            await logs.locked.wait()
            await trio.testing.wait_all_tasks_blocked()  # the save waits in its thread
            logs.progressed.set()
            await client.done.wait()
            nursery.cancel_scope.cancel()
    finally:
        logs.progressed.set()
        if logs.holder is not None:
            logs.holder.join()
    assert logs.released_after_progress == [True]
    upto, cursor, tracker = client.acked[-1]
    assert upto == RUN and cursor == str(RUN).encode() and tracker is not None  # saved, then acked
    store.close()
