"""LogService and PeerSync under trio: writes, reads, live push, forwarding, backpressure,
rejected input, and a stalled peer (MockClock via autojump_clock)."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from meshd.net.logsync import LogService
from meshd.net.peersync import PeerSync
from meshd.net.transport import PeerClosed, SecureConnection
from meshd.protocol.log import (
    MAX_BODY_BYTES,
    Batch,
    EntryRejected,
    InvalidRequest,
    sign_head,
)
from meshd.store.db import Store

from ..protocol.test_log import allow_all, signer
from .test_transport import connected_pair

WALL_MS = 1_700_000_000_000


def service(tmp_path: Path, seed: int) -> LogService:
    ticks = itertools.count()
    return LogService(Store(tmp_path / f"{seed}.db"), signer(seed),
                      lambda: WALL_MS + next(ticks))


def wire(message: dict[str, Any]) -> dict[str, Any]:
    decoded: dict[str, Any] = msgpack.unpackb(msgpack.packb(message, use_bin_type=True),
                                              raw=False, strict_map_key=True)
    return decoded


class Link:
    """Two services' PeerSyncs joined by memory channels (both directions decoded)."""

    def __init__(self, a: LogService, b: LogService, *, a_allows: Callable[[bytes], bool] = allow_all,
                 b_allows: Callable[[bytes], bool] = allow_all, **options: Any) -> None:
        self.to_b, self._from_a = trio.open_memory_channel[dict[str, Any]](math.inf)
        self.to_a, self._from_b = trio.open_memory_channel[dict[str, Any]](math.inf)
        self.sent: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        self.a = a.peer(self._sender("a", self.to_b), a_allows, name="a", **options)
        self.b = b.peer(self._sender("b", self.to_a), b_allows, name="b", **options)

    def _sender(self, name: str, channel: trio.MemorySendChannel[dict[str, Any]]) -> Any:
        async def send(message: dict[str, Any]) -> None:
            self.sent[name].append(message)
            await channel.send(wire(message))
        return send

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.a.run)
        nursery.start_soon(self.b.run)
        nursery.start_soon(self._pump, self._from_a, self.b)
        nursery.start_soon(self._pump, self._from_b, self.a)

    @staticmethod
    async def _pump(channel: trio.MemoryReceiveChannel[dict[str, Any]], peer: PeerSync) -> None:
        async for message in channel:
            await peer.handle(message)


async def wait_until(condition: Callable[[], bool], *services: LogService) -> None:
    """Until condition() holds, re-checked after every commit of any of services."""

    async def next_commit(service: LogService, seen: int, cancel_scope: trio.CancelScope) -> None:
        await service.changed.wait(seen)
        cancel_scope.cancel()

    with trio.fail_after(10):
        while True:
            seen = [service.changed.generation for service in services]
            if condition():
                return
            async with trio.open_nursery() as nursery:
                for service, generation in zip(services, seen, strict=True):
                    nursery.start_soon(next_commit, service, generation, nursery.cancel_scope)


def view(service: LogService, stream: str) -> list[tuple[str, bytes]]:
    return [(r["id"], r["body"]) for r in service.read(stream, limit=1000)["records"]]


# ---- the service -----------------------------------------------------------------------


async def test_write_read_delete_clear(tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    first = await logs.write("chat", None, b"hello")
    assert first["seq"] == 1 and first["stream"] == "chat" and first["id"]
    await logs.write("chat", "m2", b"v1")
    await logs.write("chat", "m2", b"v2")
    await logs.write("chat", "m3", b"bye")
    assert view(logs, "chat") == [(first["id"], b"hello"), ("m2", b"v2"), ("m3", b"bye")]
    await logs.delete("chat", "m3")
    assert [r for r, _ in view(logs, "chat")] == [first["id"], "m2"]
    await logs.clear("chat")
    await logs.write("chat", "m4", b"new")
    assert view(logs, "chat") == [("m4", b"new")]
    assert logs.streams() == [{"stream": "chat", "records": 1}]
    assert logs.version_vector() == {logs.author: 7}


async def test_a_write_is_committed_when_it_returns(tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    await logs.write("chat", "m", b"saved")
    other = Store(tmp_path / "1.db")  # a second connection sees it: it is in the file
    assert other.read("chat", b"", 10)[0][2] == b"saved"


async def test_reads_page_with_a_cursor(tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    for i in range(5):
        await logs.write("s", f"r{i}", b"x")
    page = logs.read("s", limit=2)
    ids = [r["id"] for r in page["records"]]
    while page["next"]:
        page = logs.read("s", after=page["next"], limit=2)
        ids += [r["id"] for r in page["records"]]
    assert ids == [f"r{i}" for i in range(5)]
    with pytest.raises(InvalidRequest):
        logs.read("s", after="not hex")


async def test_invalid_writes_are_refused(tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    with pytest.raises(InvalidRequest):
        await logs.write("s", "r", bytes(MAX_BODY_BYTES + 1))
    with pytest.raises(InvalidRequest):
        await logs.write("", "r", b"x")
    assert logs.version_vector() == {}


async def test_the_clock_resumes_past_the_stored_log(tmp_path: Path) -> None:
    logs = service(tmp_path, 1)
    await logs.write("s", "r", b"x")
    last = logs.read("s")["records"][0]["hlc"]
    logs.store.close()
    again = LogService(Store(tmp_path / "1.db"), signer(1), lambda: 0)  # a clock far behind
    assert (await again.write("s", "q", b"y"))["hlc"] > last


# ---- sync between services -------------------------------------------------------------


async def test_two_devices_converge_and_then_push_live(tmp_path: Path) -> None:
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    a.write_many_nowait(("s", f"a{i}", bytes(100)) for i in range(500))
    b.write_many_nowait(("s", f"b{i}", bytes(100)) for i in range(300))
    link = Link(a, b, batch_bytes=8000)
    async with trio.open_nursery() as nursery:
        link.start(nursery)
        await wait_until(lambda: a.version_vector() == b.version_vector(), a, b)
        assert view(a, "s") == view(b, "s") and len(view(a, "s")) == 800
        assert link.a.behind == link.b.behind == 0
        written = await a.write("s", "live", b"now")
        await wait_until(lambda: b.version_vector().get(a.author) == written["seq"], b)
        assert ("live", b"now") in view(b, "s")
        nursery.cancel_scope.cancel()
    # Nothing was sent twice or echoed back: each side sent each entry once.
    sent_by_a = sum(len(m["headers"]) for m in link.sent["a"] if m["t"] == "log.entries")
    sent_by_b = sum(len(m["headers"]) for m in link.sent["b"] if m["t"] == "log.entries")
    assert (sent_by_a, sent_by_b) == (501, 300)


async def test_received_batches_commit_in_the_writer_thread(tmp_path: Path) -> None:
    """The receiver verifies and commits a peer's batches in the group commit's writer thread,
    never on the trio thread (which keeps serving the API, channels and timers meanwhile)."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    a.write_many_nowait((("s", f"a{i}", bytes(100)) for i in range(300)), chunk_entries=50)
    trio_thread = threading.get_ident()
    committed_on: list[int] = []
    commit_batch = b.store.commit_batch

    def recording(batch: Any, *, durable: bool) -> None:
        committed_on.append(threading.get_ident())
        commit_batch(batch, durable=durable)

    b.store.commit_batch = recording  # type: ignore[method-assign]
    link = Link(a, b, batch_bytes=8000)
    async with trio.open_nursery() as nursery:
        link.start(nursery)
        await wait_until(lambda: b.version_vector().get(a.author) == 300, b)
        nursery.cancel_scope.cancel()
    assert len(committed_on) > 1  # several batches, each committed...
    assert trio_thread not in committed_on  # ...off the trio thread
    assert len(view(b, "s")) == 300


async def test_entries_are_forwarded_to_a_third_device(tmp_path: Path) -> None:
    a, b, c = service(tmp_path, 1), service(tmp_path, 2), service(tmp_path, 3)
    async with trio.open_nursery() as nursery:
        Link(a, b).start(nursery)
        Link(b, c).start(nursery)
        await a.write("s", "r", b"from a")
        await wait_until(lambda: c.version_vector().get(a.author) == 1, c)
        assert view(c, "s") == [("r", b"from a")]
        nursery.cancel_scope.cancel()


async def test_a_reconnect_resumes_without_resending(tmp_path: Path) -> None:
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    a.write_many_nowait(("s", None, bytes(200)) for _ in range(2000))
    link = Link(a, b, batch_bytes=4000)
    async with trio.open_nursery() as nursery:
        link.start(nursery)
        await wait_until(lambda: b.version_vector().get(a.author, 0) >= 500, b)
        nursery.cancel_scope.cancel()  # the connection drops mid-sync
    have = b.version_vector()[a.author]
    second = Link(a, b, batch_bytes=4000)
    async with trio.open_nursery() as nursery:
        second.start(nursery)
        await wait_until(lambda: b.version_vector().get(a.author) == 2000, b)
        nursery.cancel_scope.cancel()
    resent = [m for m in second.sent["a"] if m["t"] == "log.entries"]
    assert Batch.from_message(resent[0]).headers[0] != Batch.from_message(
        link.sent["a"][2]).headers[0]
    assert sum(len(m["headers"]) for m in resent) == 2000 - have


async def test_the_sender_respects_the_receivers_credit(tmp_path: Path) -> None:
    a = service(tmp_path, 1)
    # Small write batches: a signed head every 8 entries, so batches can end anywhere.
    a.write_many_nowait((("s", None, bytes(1000)) for _ in range(2000)), chunk_entries=8)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    peer = a.peer(send, allow_all, batch_bytes=10_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        await peer.handle({"t": "log.hello", "vector": {}})
        await peer.handle({"t": "log.credit", "bytes": 100_000})  # and never refilled
        await trio.testing.wait_all_tasks_blocked()
        in_flight = sum(Batch.from_message(m).size for m in sent if m["t"] == "log.entries")
        assert 100_000 <= in_flight < 100_000 + 20_000
        await peer.handle({"t": "log.credit", "bytes": 50_000})
        await trio.testing.wait_all_tasks_blocked()
        in_flight = sum(Batch.from_message(m).size for m in sent if m["t"] == "log.entries")
        assert 150_000 <= in_flight < 150_000 + 20_000
        nursery.cancel_scope.cancel()


async def test_handling_a_message_never_waits_on_sending(tmp_path: Path) -> None:
    """The task that reads a connection hands each message to handle(); a peer that stops
    reading must not stop it. handle() verifies what arrived, and it commits, while every
    send is stuck (what it calls for is sent by run())."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    for i in range(3):
        await a.write("s", f"r{i}", b"x")
    batch = a.batch_since(a.author, 0, 1 << 20)
    assert batch is not None
    stuck = trio.Event()

    async def send(message: dict[str, Any]) -> None:
        stuck.set()
        await trio.sleep_forever()  # the peer reads nothing: our send buffer is full

    peer = b.peer(send, allow_all)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        await stuck.wait()  # run() is blocked sending its hello
        with trio.fail_after(5):
            await peer.handle({"t": "log.hello", "vector": {}})
            await peer.handle(wire(batch))
            await peer.drain()  # its commit (which runs after handle() returns)
        assert b.version_vector()[a.author] == 3
        nursery.cancel_scope.cancel()


# ---- bad input -------------------------------------------------------------------------


async def _receiving_peer(tmp_path: Path, allows: Callable[[bytes], bool] = allow_all
                          ) -> tuple[LogService, PeerSync]:
    b = service(tmp_path, 3)

    async def send(message: dict[str, Any]) -> None:
        pass

    peer = b.peer(send, allows)
    await peer.handle({"t": "log.hello", "vector": {}})
    return b, peer


async def _batch_from(tmp_path: Path, count: int = 3) -> dict[str, Any]:
    a = service(tmp_path, 1)
    for i in range(count):
        await a.write("s", f"r{i}", b"x")
    message = a.batch_since(a.author, 0, 1 << 20)
    assert message is not None
    return wire(message)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda m: m["head"].update(sig=bytes(64)), "bad-signature"),
        (lambda m: m["headers"].pop(1), "malformed"),
        (lambda m: m.update(headers=m["headers"][1:], bodies=m["bodies"][1:]), "gap"),
        (lambda m: m["bodies"].__setitem__(0, b"y"), "bad-body"),
        (lambda m: m.update(author="me"), "malformed"),
        (lambda m: m.update(bodies=7), "malformed"),
    ],
)
async def test_bad_batches_are_rejected_and_nothing_is_committed(
    tmp_path: Path, tamper: Callable[[dict[str, Any]], None], reason: str
) -> None:
    message = await _batch_from(tmp_path)
    tamper(message)
    b, peer = await _receiving_peer(tmp_path)
    with pytest.raises(EntryRejected) as caught:
        await peer.handle(message)
    assert caught.value.reason == reason
    assert b.version_vector() == {} and b.store.entry_count() == 0


async def test_a_broken_chain_is_rejected_over_sync(tmp_path: Path) -> None:
    message = await _batch_from(tmp_path)
    fields = msgpack.unpackb(message["headers"][1])
    fields[3] = bytes(32)
    message["headers"][1] = msgpack.packb(fields, use_bin_type=True)
    b, peer = await _receiving_peer(tmp_path)
    with pytest.raises(EntryRejected) as caught:
        await peer.handle(message)
    assert caught.value.reason == "broken-chain"
    assert b.store.entry_count() == 0


async def test_an_author_outside_the_circle_is_rejected_over_sync(tmp_path: Path) -> None:
    message = await _batch_from(tmp_path)
    b, peer = await _receiving_peer(tmp_path, allows=lambda author: author != message["author"])
    with pytest.raises(EntryRejected) as caught:
        await peer.handle(message)
    assert caught.value.reason == "unknown-author"


async def test_an_oversized_body_is_rejected_over_sync(tmp_path: Path) -> None:
    me = signer(1)
    body = bytes(MAX_BODY_BYTES + 1)
    from meshd.protocol.crypto import blake2b_256
    from meshd.protocol.log import ZERO_HASH, encode_header, entry_hash

    header = encode_header(bytes(me.public), 1, ZERO_HASH, 1, "s", "r", "put",
                           blake2b_256(body), len(body))
    batch = Batch(bytes(me.public), [header], [body], sign_head(me, 1, entry_hash(header)))
    b, peer = await _receiving_peer(tmp_path)
    with pytest.raises(EntryRejected) as caught:
        await peer.handle(wire(batch.to_message()))
    assert caught.value.reason == "oversized"


async def test_a_peer_that_claims_entries_and_sends_nothing_is_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    b = service(tmp_path, 2)

    async def send(message: dict[str, Any]) -> None:
        pass

    peer = b.peer(send, allow_all, stall_timeout_s=5.0)
    started = trio.current_time()
    await peer.handle({"t": "log.hello", "vector": {bytes(signer(1).public): 10}})
    assert peer.behind == 10
    with pytest.raises(EntryRejected) as caught:
        await peer.run()
    assert caught.value.reason == "stalled"
    assert 5.0 <= trio.current_time() - started < 6.0


async def test_a_rejected_peer_leaves_the_service_working(tmp_path: Path) -> None:
    a, b = service(tmp_path, 1), service(tmp_path, 2)

    async def send(message: dict[str, Any]) -> None:
        pass

    bad = b.peer(send, allow_all)
    await bad.handle({"t": "log.hello", "vector": {}})
    with pytest.raises(EntryRejected):
        await bad.handle({"t": "log.entries", "author": b"x"})
    async with trio.open_nursery() as nursery:
        Link(a, b).start(nursery)
        await a.write("s", "r", b"fine")
        await wait_until(lambda: b.version_vector().get(a.author) == 1, b)
        nursery.cancel_scope.cancel()


# ---- over the real secure channel ------------------------------------------------------


async def test_sync_over_a_secure_connection(tmp_path: Path) -> None:
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    a.write_many_nowait(("s", None, bytes(200)) for _ in range(3000))
    conn_a, conn_b = await connected_pair(*trio.testing.memory_stream_pair())

    async def serve(logs: LogService, connection: SecureConnection) -> None:
        peer = logs.peer(connection.send, allow_all)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.run)
            try:
                async for message in connection:
                    if message["t"].startswith("log."):
                        await peer.handle(message)
            except PeerClosed:
                pass
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, a, conn_a)
        nursery.start_soon(serve, b, conn_b)
        await wait_until(lambda: b.version_vector() == a.version_vector(), b)
        nursery.cancel_scope.cancel()
    assert b.streams() == [{"stream": "s", "records": 3000}]


async def test_a_burst_is_committed_in_chunks_and_reaches_the_peer(tmp_path: Path) -> None:
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    link = Link(a, b)
    async with trio.open_nursery() as nursery:
        link.start(nursery)
        total = await a.write_many((("s", None, bytes(50)) for _ in range(3000)),
                                   chunk_entries=1000)
        assert total == 3000
        await wait_until(lambda: b.version_vector().get(a.author) == 3000, b)
        nursery.cancel_scope.cancel()
    # Each chunk was its own signed commit, so the peer could be sent each as it landed.
    heads = [m["head"]["seq"] for m in link.sent["a"] if m["t"] == "log.entries"]
    assert heads[-1] == 3000 and all(seq % 1000 == 0 or seq == 3000 for seq in heads)


# ---- per-message costs (counted, never timed) ---------------------------------------------


async def test_a_peer_sync_rebuilds_its_vector_only_when_it_changed(tmp_path: Path) -> None:
    """PeerSync's filtered version vector is rebuilt once per commit (or circle change), not
    several times per message handled or per pass of its loop."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    rebuilds = {"a": 0, "b": 0}

    def counting(name: str, svc: LogService) -> None:
        vector = svc.version_vector

        def counted() -> dict[bytes, int]:
            rebuilds[name] += 1
            return vector()
        svc.version_vector = counted  # type: ignore[method-assign]

    counting("a", a)
    counting("b", b)
    link = Link(a, b)
    async with trio.open_nursery() as nursery:
        link.start(nursery)
        for i in range(20):
            await a.write("s", f"a{i}", bytes(100))
            await b.write("s", f"b{i}", bytes(100))
        await wait_until(lambda: a.store.version_vector() == b.store.version_vector(), a, b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # One rebuild per commit at most, plus the first (main: 3-5 per pass of the loop).
    assert 0 < rebuilds["a"] <= a.changed.generation + 1
    assert 0 < rebuilds["b"] <= b.changed.generation + 1


async def test_a_circle_change_rebuilds_the_vector(tmp_path: Path) -> None:
    """Who may author is part of the filtered vector: a circle change is a new version."""
    a = service(tmp_path, 1)
    a.write_many_nowait([("s", "r", b"x")])
    allowed = {a.author: False}

    async def send(_message: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()

    peer = a.peer(send, lambda author: allowed[author])
    assert peer.behind == 0 and peer._vector() == {}
    allowed[a.author] = True
    a.circle_changed()
    assert peer._vector() == {a.author: 1}


async def test_a_batch_holding_nothing_new_needs_no_worker_thread(tmp_path: Path) -> None:
    """A copy of entries we already hold (forwarded while they reached us another way) is
    checked on the trio thread: no hop to the writer thread, no lock, nothing committed."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    a.write_many_nowait(("s", f"a{i}", bytes(100)) for i in range(5))
    batch = Batch.from_message(wire(a.batch_since(a.author, 0, 1 << 20) or {}))
    hops = 0
    verify_and_commit = b._verify_and_commit

    def counted(*args: Any) -> int:
        nonlocal hops
        hops += 1
        return verify_and_commit(*args)

    b._verify_and_commit = counted  # type: ignore[method-assign]
    assert await b.receive(batch, allow_all) == 5
    generation = b.changed.generation
    assert await b.receive(batch, allow_all) == 0
    assert hops == 1  # main: 2
    assert b.changed.generation == generation  # nothing committed, nobody woken
    # Still checked as the writer thread would: an author outside the circle is refused.
    with pytest.raises(EntryRejected) as refused:
        await b.receive(batch, lambda _author: False)
    assert refused.value.reason == "unknown-author" and hops == 1


async def test_entries_from_a_peer_do_not_wake_its_own_sync_loop(tmp_path: Path) -> None:
    """A batch (or log.have) from a peer only says what it holds: the PeerSync that received
    it has nothing to send back, so its loop does not run a pass per batch (one wake-up per
    burst of work, not per message)."""
    a, b = service(tmp_path, 1), service(tmp_path, 2)
    link = Link(a, b)
    passes = 0
    deadline = link.a._session.deadline

    def counted(vector: Any) -> float:
        nonlocal passes
        passes += 1
        return deadline(vector)

    link.a._session.deadline = counted  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        link.start(nursery)
        await trio.testing.wait_all_tasks_blocked()
        before = passes
        for i in range(30):
            await b.write("s", f"b{i}", bytes(100))
        await wait_until(lambda: a.version_vector().get(b.author) == 30, a)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert link.a.entries_received == 30
    assert passes - before <= 2  # main: a pass per batch received (30)
