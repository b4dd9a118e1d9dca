"""`bench/relay.py --database`: the relay on PostgreSQL, 1, 2 and 3 processes on one
database, beside the SQLite backend in the same run.

Each relay is a real `meshd relay` process (rate limit lifted); the devices run in this
process. Throughput: 8 sender connections x 32 deposits in flight, spread round-robin over
the relay's processes, one subscriber on the first process (so with 2 or 3 processes most
deliveries cross processes through LISTEN/NOTIFY). Latency: one deposit at a time, sender
on the last process and subscriber on the first (across processes), and both on one process.

Targets: PostgreSQL with one process >= 50% of SQLite's deposit rate; cross-process push
p50 <= 20 ms. `--database start` runs a throwaway PostgreSQL server (tests/postgres.py);
otherwise pass a DSN of an empty database you own (its relay tables are created).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relayload import ENVELOPE_BYTES, deposit_concurrently, push_latencies  # noqa: E402

from meshd.protocol.circle import Circle  # noqa: E402
from meshd.protocol.crypto import DHKeyPair  # noqa: E402
from meshd.relay.session import open_relay_session  # noqa: E402


def start_relay(state_dir: str, database: str | None) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "meshd.relay.command", "--state-dir", state_dir,
               "--listen", "127.0.0.1:0", "--rate", "1e9", "--burst", "1e9",
               "--quota-bytes", str(2**40), "--log-level", "warning"]
    if database is not None:
        command += ["--database", database]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    address = process.stdout.readline().strip()
    if not address:
        raise RuntimeError(f"relay exited with {process.wait()}")
    return process, address


async def throughput(addresses: list[str], circle: Circle, sender: DHKeyPair,
                     recipient: DHKeyPair, count: int) -> tuple[float, float]:
    """Deposits/s committed over all addresses, and envelopes/s delivered to a subscriber
    on the first address."""
    mailbox = os.urandom(32)
    envelopes = [os.urandom(ENVELOPE_BYTES) for _ in range(count)]
    delivered = 0
    all_delivered = trio.Event()

    def on_push(frame: Any) -> None:
        nonlocal delivered
        delivered += len(frame.items)
        if delivered >= count:
            all_delivered.set()

    async with open_relay_session(addresses[0], recipient, circle.records(),
                                  on_push=on_push) as reader:
        await reader.subscribe(mailbox)
        start, deposited = await deposit_concurrently(addresses, circle, sender, mailbox, envelopes)
        with trio.fail_after(120):
            await all_delivered.wait()
        return count / deposited, count / (time.perf_counter() - start)


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1e3:.2f} ms"


async def run(dsn: str, circle: Circle, sender: DHKeyPair, recipient: DHKeyPair,
              quick: bool) -> None:
    count = 3_000 if quick else 20_000
    samples = 100 if quick else 500
    with tempfile.TemporaryDirectory() as sqlite_dir, tempfile.TemporaryDirectory() as pg_dir, \
            ExitStack() as processes:

        def started(state_dir: str, database: str | None) -> str:
            process, address = start_relay(state_dir, database)
            processes.callback(lambda: (process.terminate(), process.wait(timeout=30)))
            return address

        sqlite = started(sqlite_dir, None)
        pg = [started(pg_dir, dsn)]
        base_rate, base_delivered = await throughput([sqlite], circle, sender, recipient, count)
        print(f"SQLite, 1 process: {base_rate:,.0f} deposits/s, {base_delivered:,.0f} "
              f"delivered/s ({count:,} x {ENVELOPE_BYTES} B)   (baseline)")
        rates = {}
        for processes_count in (1, 2, 3):
            while len(pg) < processes_count:
                pg.append(started(pg_dir, dsn))
            rate, delivered = await throughput(pg, circle, sender, recipient, count)
            rates[processes_count] = rate
            target = "   target >= 50% of SQLite" if processes_count == 1 else ""
            print(f"PostgreSQL, {processes_count} process{'es' if processes_count > 1 else ''}: "
                  f"{rate:,.0f} deposits/s ({rate / base_rate:.0%} of SQLite), "
                  f"{delivered:,.0f} delivered/s{target}")
        sqlite_push = await push_latencies(sqlite, sqlite, circle, sender, recipient, samples)
        same = await push_latencies(pg[0], pg[0], circle, sender, recipient, samples)
        across = await push_latencies(pg[-1], pg[0], circle, sender, recipient, samples)
        print(f"push across processes (deposit at 3, subscriber at 1): {ms(across)}, "
              f"p99 {statistics.quantiles(across, n=100)[98] * 1e3:.2f} ms (n={samples})"
              "   target p50 <= 20 ms")
        print(f"   baselines: PostgreSQL one process {ms(same)}; SQLite {ms(sqlite_push)}")


async def bench_database(database: str, circle: Circle, sender: DHKeyPair,
                         recipient: DHKeyPair, quick: bool) -> None:
    if database != "start":
        await run(database, circle, sender, recipient, quick)
        return
    from tests.postgres import postgres_server, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"--database start: {reason}")
    with postgres_server() as server:
        print(f"throwaway PostgreSQL server in {server.root} (unix socket, fsync on)")
        await run(server.new_database(), circle, sender, recipient, quick)
