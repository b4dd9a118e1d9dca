"""Load shapes shared by bench/relay.py and bench/relay_database.py: many deposits in flight
over several connections, and one-at-a-time push latency."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import trio

from meshd.protocol.circle import Circle
from meshd.protocol.crypto import DHKeyPair
from meshd.relay.session import RelaySession, open_relay_session

ENVELOPE_BYTES = 300
CONNECTIONS = 8
IN_FLIGHT = 32


async def deposit_concurrently(addresses: Sequence[str], circle: Circle, sender: DHKeyPair,
                               mailbox: bytes, envelopes: list[bytes]) -> tuple[float, float]:
    """Deposit every envelope over CONNECTIONS sessions (round-robin over addresses), with
    IN_FLIGHT requests each; returns (start, seconds until the last was answered)."""
    async with AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(open_relay_session(
            addresses[n % len(addresses)], sender, circle.records())) for n in range(CONNECTIONS)]
        next_index = iter(range(len(envelopes)))
        start = time.perf_counter()

        async def worker(session: RelaySession) -> None:
            for index in next_index:
                await session.deposit(mailbox, envelopes[index])

        async with trio.open_nursery() as workers:
            for session in sessions:
                for _ in range(IN_FLIGHT):
                    workers.start_soon(worker, session)
        return start, time.perf_counter() - start


async def push_latencies(deposit_at: str, subscribe_at: str, circle: Circle, sender: DHKeyPair,
                         recipient: DHKeyPair, samples: int) -> list[float]:
    """Seconds from a deposit to its push at a subscriber, one deposit at a time."""
    mailbox = os.urandom(32)
    arrived = trio.Event()

    def on_push(frame: Any) -> None:
        arrived.set()

    latencies = []
    async with open_relay_session(subscribe_at, recipient, circle.records(),
                                  on_push=on_push) as bob, \
            open_relay_session(deposit_at, sender, circle.records()) as alice:
        await bob.subscribe(mailbox)
        for _ in range(samples):
            arrived = trio.Event()
            start = time.perf_counter()
            await alice.deposit(mailbox, os.urandom(ENVELOPE_BYTES))
            with trio.fail_after(10):
                await arrived.wait()
            latencies.append(time.perf_counter() - start)
    return latencies
