"""How the relay's trio loop should call the (blocking) PostgreSQL storage: measured.

64 trio tasks each read a mailbox (envelopes_after, 10 envelopes of 300 B) as a subscriber
push does, while a ticker task measures how late the event loop runs (what every other
connection of the relay would feel). Three ways, same run, same database:

  inline      call the storage in the event loop's thread (as the SQLite backend does)
  threads-1   trio.to_thread.run_sync with CapacityLimiter(1)
  threads-N   trio.to_thread.run_sync with CapacityLimiter(N) (N = the relay's MAX_READ_THREADS)

Run: .venv/bin/python bench/relay_pg_threads.py [DSN]   (no DSN: a throwaway server)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshd.relay.postgres import PostgresRelayStorage  # noqa: E402
from meshd.relay.server import MAX_READ_THREADS  # noqa: E402
from meshd.relay.storage import NewEnvelope  # noqa: E402

TASKS = 64
READS = 3_000
CIRCLE = os.urandom(32)


async def measure(read: Callable[[], Any], runner: str, limiter: trio.CapacityLimiter) -> tuple[float, float]:
    """Reads per second and the event loop's p99 lag (ms) meanwhile."""
    remaining = iter(range(READS))
    lags: list[float] = []
    done = trio.Event()

    async def ticker() -> None:
        while not done.is_set():
            start = trio.current_time()
            await trio.sleep(0.001)
            lags.append(trio.current_time() - start - 0.001)

    async def reader() -> None:
        for _ in remaining:
            if runner == "inline":
                read()
                await trio.lowlevel.checkpoint()
            else:
                await trio.to_thread.run_sync(read, limiter=limiter)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        start = time.perf_counter()
        async with trio.open_nursery() as readers:
            for _ in range(TASKS):
                readers.start_soon(reader)
        elapsed = time.perf_counter() - start
        done.set()
    return READS / elapsed, statistics.quantiles(lags, n=100)[98] * 1e3


async def bench(dsn: str) -> None:
    storage = PostgresRelayStorage(dsn, pool_size=MAX_READ_THREADS + 1)
    mailbox = os.urandom(32)
    storage.add_envelopes([NewEnvelope(CIRCLE, mailbox, os.urandom(300), 2e9) for _ in range(10)])

    def read() -> Any:
        return storage.envelopes_after(CIRCLE, mailbox, 0, now=0, limit=64, max_bytes=1 << 20)

    try:
        for name, runner, size in (("inline", "inline", 1), ("threads-1", "thread", 1),
                                   (f"threads-{MAX_READ_THREADS}", "thread", MAX_READ_THREADS)):
            rate, lag = await measure(read, runner, trio.CapacityLimiter(size))
            print(f"{name:>10}: {rate:,.0f} reads/s, event-loop lag p99 {lag:.2f} ms")
    finally:
        storage.close()


def main() -> None:
    if len(sys.argv) > 1:
        trio.run(bench, sys.argv[1])
        return
    from tests.postgres import postgres_server

    with postgres_server() as server:
        trio.run(bench, server.new_database())


if __name__ == "__main__":
    main()
