"""What the relay and a session hold while idle after large requests and answers (issue 20).

Each connection's reading task kept its last request (a 4 MiB segment_put) while it waited
for the next, its sending task kept the last batch of answers it sent (a segment, a 4 MiB
fetch page) while it waited for more, and the one storage writer kept its last batch: memory
sized by the largest frames, held for as long as a connection stayed idle. Counted with
tracemalloc once every task is blocked (trio.testing.wait_all_tasks_blocked), never by a clock.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio.testing

from meshd.protocol.relay import Limits

from .test_relay import make_circle, running_relay, session

MiB = 1 << 20
# Held in all, relay and both sessions, between requests whatever was sent: small state only.
HELD_BOUND = MiB // 2


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start(8)
    try:
        yield
    finally:
        tracemalloc.stop()


async def held() -> int:
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.mark.parametrize("count", [1, 3])
async def test_idle_connections_hold_no_request_or_answer(tmp_path: Path, traced: None,
                                                          count: int) -> None:
    circle, m, _ = make_circle("alice", "bob")
    async with running_relay(tmp_path / "relay", limits=Limits(quota_bytes=64 * MiB)) as relay, \
            session(relay, m["alice"], circle) as alice, session(relay, m["bob"], circle) as bob:
        await alice.segment_put(b"\xff" * 16, b"warm")
        assert await bob.segment_get(b"\xff" * 16) == b"warm"
        base = await held()
        for n in range(count):
            blob = os.urandom(MiB)
            await alice.segment_put(bytes([n]) * 16, blob)
            assert await bob.segment_get(bytes([n]) * 16) == blob
            del blob
        grown = await held() - base
        if grown >= HELD_BOUND:  # say what holds it
            snapshot = tracemalloc.take_snapshot()
            print("\n".join(f"{s}\n  " + "\n  ".join(s.traceback.format())
                             for s in snapshot.statistics("traceback")[:3]))
        assert grown < HELD_BOUND
