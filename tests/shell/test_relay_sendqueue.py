"""The relay's send queue: a device that stops reading never stalls the reading of requests.

Each connection has a bounded queue of frames and one task that sends them; the task that
reads a connection's requests only queues answers. A device that keeps sending requests but
reads nothing is closed once its queue is full, rather than blocking the relay's reader on a
write it cannot finish (which also stopped it reading that connection's frames). The queue
is bounded in bytes too: a device pipelining large reads waits for its answers (the relay
stops reading its requests while they hold MAX_QUEUED_BYTES) and gets every one of them.
"""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from meshd.net.transport import CONNECTION_ERRORS, SecureConnection, open_secure_connection
from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.relaycodes import SEGMENT_ID_BYTES
from meshd.relay.connection import MAX_QUEUED_BYTES, MAX_QUEUED_FRAMES
from meshd.relay.server import RelayServer
from meshd.relay.storage import DATABASE_FILE, SQLiteRelayStorage

from ..protocol.harness import seeded_rng
from .test_relay import make_circle


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RelayServer]:
    # The relay verifies registrations in worker threads; under the mock clock a thread's
    # run looks idle, so the clock would jump past the connections' silence timers before
    # the answer. Verify inline here.
    async def inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    storage = SQLiteRelayStorage(tmp_path / DATABASE_FILE)
    yield RelayServer(storage, DHKeyPair.generate(seeded_rng(7)))
    storage.close()


async def _registered(server: RelayServer, nursery: trio.Nursery, stream: trio.abc.Stream,
                      client: trio.abc.Stream, dh: DHKeyPair, records: list[bytes]) -> SecureConnection:
    nursery.start_soon(server.handle_stream, stream)
    connection = await open_secure_connection(client, initiator=True, static=dh,
                                              authorize=lambda key: True)
    await connection.send({"t": "relay.register", "rid": 1, "records": records})
    assert (await connection.receive())["t"] == "relay.registered"
    return connection


async def test_a_device_that_stops_reading_is_closed_when_its_queue_fills_not_waited_for(
    server: RelayServer, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    circle, m, _ = make_circle("alice", "bob")
    server.storage.save_circle_records(circle.circle_id, circle.records())
    box = bytes(32)
    # Lockstep: a write completes only once the other side read it, so a device that
    # reads nothing stalls the relay's first write to it at once.
    alice_side, alice_server = trio.testing.lockstep_stream_pair()
    bob_side, bob_server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        alice = await _registered(server, nursery, alice_server, alice_side, m["alice"].dh,
                                  circle.records())
        bob = await _registered(server, nursery, bob_server, bob_side, m["bob"].dh,
                                circle.records())
        # Alice sends requests and reads no answer. Every request the relay reads is one
        # more answer queued; a relay that answers from its reading task reads one or two,
        # then stops reading her until its send times out.
        read_by_relay = 0
        try:
            for rid in range(2, 2 + 4 * MAX_QUEUED_FRAMES):
                await alice.send({"t": "relay.fetch", "rid": rid, "mailbox": box, "after": 0})
                read_by_relay += 1
        except CONNECTION_ERRORS:
            pass  # the relay closed her connection
        # The relay read everything she sent until her queue was full, then closed her.
        assert read_by_relay >= MAX_QUEUED_FRAMES
        assert read_by_relay < 4 * MAX_QUEUED_FRAMES
        # Bob is served all along.
        await bob.send({"t": "relay.fetch", "rid": 2, "mailbox": box, "after": 0})
        answer = await bob.receive()
        assert (answer["t"], answer["rid"]) == ("relay.envelopes", 2)
        nursery.cancel_scope.cancel()
    assert any("send queue full" in r.getMessage() for r in caplog.records)


async def test_a_device_pipelining_large_reads_is_answered_in_bounded_memory_and_in_full(
    server: RelayServer,
) -> None:
    circle, m, _ = make_circle("alice", "bob")
    server.storage.save_circle_records(circle.circle_id, circle.records())
    size, count = 1024 * 1024, 32  # 32 MiB of answers, far under MAX_QUEUED_FRAMES frames
    segment_id = bytes(range(SEGMENT_ID_BYTES))
    server.storage.put_segment(circle.circle_id, segment_id, bytes([7]) * size)
    box = bytes(32)
    alice_side, alice_server = trio.testing.lockstep_stream_pair()  # she reads nothing yet
    bob_side, bob_server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        alice = await _registered(server, nursery, alice_server, alice_side, m["alice"].dh,
                                  circle.records())
        bob = await _registered(server, nursery, bob_server, bob_side, m["bob"].dh,
                                circle.records())

        async def send_requests() -> None:
            for rid in range(2, 2 + count):
                await alice.send({"t": "relay.segment_get", "rid": rid, "id": segment_id})

        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            nursery.start_soon(send_requests)
            # Quiet: the relay read what it would of her requests and waits on her reading.
            await trio.testing.wait_all_tasks_blocked()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # What the relay holds for her: the bound, plus the answer it is writing and the one
        # it queued last (each 1 MiB, and the frame being written is encrypted). Without a
        # byte bound it held every answer she asked for.
        assert held - before < MAX_QUEUED_BYTES + 4 * size, (held - before) / size
        # Bob is served meanwhile.
        await bob.send({"t": "relay.fetch", "rid": 2, "mailbox": box, "after": 0})
        answer = await bob.receive()
        assert (answer["t"], answer["rid"]) == ("relay.envelopes", 2)
        # She reads at last, and gets every answer, in order.
        for rid in range(2, 2 + count):
            answer = await alice.receive()
            assert (answer["t"], answer["rid"], answer["blob"]) == ("relay.segment", rid, bytes([7]) * size)
        nursery.cancel_scope.cancel()


def test_relay_md_states_the_send_queue_and_the_deposit_retry_as_the_code_does() -> None:
    from meshd.relay.deposits import DEPOSIT_RETRY_CAP_S, DEPOSIT_RETRY_S
    from meshd.relay.requests import MAX_DEPOSITS_IN_FLIGHT

    spec = " ".join((Path(__file__).parents[2] / "protocol" / "relay.md").read_text().split())
    assert f"At most {MAX_QUEUED_FRAMES} frames" in spec
    assert f"while its queued answers hold {MAX_QUEUED_BYTES // 2**20} MiB or more" in spec
    assert f"pauses while {MAX_DEPOSITS_IN_FLIGHT} of its deposits wait for their commit" in spec
    assert (f"after a pause of {DEPOSIT_RETRY_S:g} s, doubling after each round that again left "
            f"something, up to {DEPOSIT_RETRY_CAP_S:g} s") in spec
