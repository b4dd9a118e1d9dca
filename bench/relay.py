"""Benchmark of the relay, each figure beside a baseline measured in the same run.

The relay runs as its own process (`python -m meshd.relay.command`, one trio thread plus the
SQLite worker thread) with its rate limit lifted; the devices run in this process. The
baseline is a "null relay" process speaking the same frames over the same secure channel but
answering from memory: no storage, no authorisation, no push. Envelopes are 300 random bytes
(the relay never looks inside one).

1. Envelopes per second deposited (answered relay.ok, i.e. committed) and delivered (pushed
   to a subscribed device), 8 connections x 32 requests in flight.   target >= 5,000/s
   Baseline: deposits per second answered by the null relay.
2. Deposit-to-delivery latency to a subscribed device, one at a time.  target p50 <= 20 ms
   Baseline: a request/answer round trip to the null relay.
3. 5,000 concurrent idle device connections (handshaken, registered), the relay's RSS.
                                                                        target <= 500 MB
   Baseline: the relay's RSS before any connection.

Run: .venv/bin/python bench/relay.py [--quick]

With --database (a postgresql:// DSN, or `start` for a throwaway server): the PostgreSQL
backend with 1, 2 and 3 relay processes on one database, beside SQLite in the same run
(bench/relay_database.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relayload import (  # noqa: E402
    ENVELOPE_BYTES,
    deposit_concurrently,
    push_latencies,
)

from meshd.net.transport import SecureConnection, serve_secure  # noqa: E402
from meshd.protocol.circle import Circle
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair  # noqa: E402
from meshd.protocol.records import DeviceInfo
from meshd.relay.command import relay_address  # noqa: E402
from meshd.relay.session import open_relay_session  # noqa: E402

# ---- the null relay (baseline) -------------------------------------------------------


async def null_relay() -> None:
    static = DHKeyPair.generate(os.urandom)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(relay_address("127.0.0.1", listeners[0].socket.getsockname()[1], static.public),
          flush=True)
    counter = iter(range(1, 2**62))

    async def handle(connection: SecureConnection) -> None:
        while True:
            request = await connection.receive()
            if request["t"] == "relay.register":
                await connection.send({"t": "relay.registered", "rid": request["rid"],
                                       "circle": bytes(32), "quota": 0, "used": 0,
                                       "max_envelope": 0, "ttl": 0})
            else:
                await connection.send({"t": "relay.ok", "rid": request["rid"], "id": next(counter)})

    await serve_secure(handle, listeners, static=static, authorize=lambda key: True)


# ---- helpers -------------------------------------------------------------------------


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def start(command: list[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def start_relay(state_dir: str) -> tuple[subprocess.Popen[str], str]:
    return start([sys.executable, "-m", "meshd.relay.command", "--state-dir", state_dir,
                  "--listen", "127.0.0.1:0", "--rate", "1e9", "--burst", "1e9",
                  "--quota-bytes", str(2**40), "--log-level", "warning",
                  # every device here connects from 127.0.0.1, unlike a real relay's
                  "--max-connections-per-source", "1000000"])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def device(name: str) -> tuple[SigningKeyPair, DHKeyPair, DeviceInfo]:
    signer, dh = SigningKeyPair(os.urandom(32)), DHKeyPair.generate(os.urandom)
    return signer, dh, DeviceInfo(bytes(signer.public), bytes(dh.public), name).claimed(signer)


def two_device_circle() -> tuple[Circle, DHKeyPair, DHKeyPair]:
    a_sign, a_dh, a_info = device("sender")
    _, b_dh, b_info = device("recipient")
    circle = Circle.create(a_sign, a_info, os.urandom)
    circle.add_device(a_sign, b_info, os.urandom)
    return circle, a_dh, b_dh


# ---- 1. throughput -------------------------------------------------------------------


async def deposit_rate(address: str, circle: Circle, sender: DHKeyPair, recipient: DHKeyPair | None,
                       count: int) -> tuple[float, float | None]:
    """Deposits/s answered, and (with a recipient) envelopes/s delivered end to end."""
    mailbox = os.urandom(32)
    envelopes = [os.urandom(ENVELOPE_BYTES) for _ in range(count)]
    delivered = 0
    all_delivered = trio.Event()

    def on_push(frame: Any) -> None:
        nonlocal delivered
        delivered += len(frame.items)
        if delivered >= count:
            all_delivered.set()

    async with trio.open_nursery() as nursery:
        if recipient is not None:
            reader_ready = trio.Event()

            async def reader() -> None:
                async with open_relay_session(address, recipient, circle.records(),
                                              on_push=on_push) as session:
                    await session.subscribe(mailbox)
                    reader_ready.set()
                    await all_delivered.wait()

            nursery.start_soon(reader)
            await reader_ready.wait()
        start, deposited = await deposit_concurrently([address], circle, sender, mailbox, envelopes)
        if recipient is None:
            return count / deposited, None
        with trio.fail_after(120):
            await all_delivered.wait()
        return count / deposited, count / (time.perf_counter() - start)


# ---- 2. latency ----------------------------------------------------------------------


async def round_trips(address: str, circle: Circle, sender: DHKeyPair, samples: int) -> list[float]:
    times = []
    async with open_relay_session(address, sender, circle.records()) as session:
        for _ in range(samples):
            start = time.perf_counter()
            await session.deposit(os.urandom(32), os.urandom(ENVELOPE_BYTES))
            times.append(time.perf_counter() - start)
    return times


# ---- 3. idle connections -------------------------------------------------------------


async def hold_idle_connections(address: str, count: int, pid: int) -> tuple[float, float]:
    """Open count registered connections (one single-device circle each); RSS and seconds."""
    devices = []
    for index in range(count):
        signer, dh, info = device(f"d{index}")
        devices.append((dh, Circle.create(signer, info, os.urandom).records()))
    opened = 0
    all_open = trio.Event()
    release = trio.Event()
    limit = trio.Semaphore(256)

    async def hold(dh: DHKeyPair, records: list[bytes]) -> None:
        nonlocal opened
        await limit.acquire()  # a bounded number of handshakes at a time
        async with open_relay_session(address, dh, records):
            limit.release()
            opened += 1
            if opened == count:
                all_open.set()
            await release.wait()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for dh, records in devices:
            nursery.start_soon(hold, dh, records)
        with trio.fail_after(600):
            await all_open.wait()
        elapsed = time.perf_counter() - start
        await trio.sleep(2)  # let the relay settle, then read its memory
        rss = rss_mb(pid)
        release.set()
    return rss, elapsed


# ---- main ----------------------------------------------------------------------------


async def bench(quick: bool) -> None:
    count = 5_000 if quick else 30_000
    idle = 1_000 if quick else 5_000
    files = raise_file_limit()  # inherited by the relay process started below
    circle, sender, recipient = two_device_circle()
    with tempfile.TemporaryDirectory() as state_dir:
        relay, address = start_relay(state_dir)
        null, null_address = start([sys.executable, __file__, "--null-relay"])
        try:
            print(f"relay pid {relay.pid}; devices in this process; RLIMIT_NOFILE {files}")
            baseline_rss = rss_mb(relay.pid)
            null_rate, _ = await deposit_rate(null_address, circle, sender, None, count)
            cpu_before = cpu_seconds(relay.pid)
            wall_before = time.perf_counter()
            deposited, delivered = await deposit_rate(address, circle, sender, recipient, count)
            cpu_share = (cpu_seconds(relay.pid) - cpu_before) / (time.perf_counter() - wall_before)
            assert delivered is not None
            print(f"1. deposits: {deposited:,.0f} envelopes/s committed, {delivered:,.0f}/s "
                  f"delivered end to end ({count:,} x {ENVELOPE_BYTES} B; relay used "
                  f"{cpu_share:.2f} cores)   target >= 5,000/s")
            print(f"   baseline null relay (same frames, no storage): {null_rate:,.0f}/s; "
                  f"relay = {deposited / null_rate:.0%} of it")
            samples = 200 if quick else 1000
            latencies = await push_latencies(address, address, circle, sender, recipient, samples)
            rtts = await round_trips(null_address, circle, sender, samples)
            p50, p99 = statistics.median(latencies), statistics.quantiles(latencies, n=100)[98]
            print(f"2. deposit-to-delivery latency p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms "
                  f"(n={samples})   target p50 <= 20 ms")
            print(f"   baseline null-relay round trip p50 {statistics.median(rtts) * 1e3:.2f} ms")
            rss, seconds = await hold_idle_connections(address, idle, relay.pid)
            print(f"3. {idle:,} idle registered connections held: relay RSS {rss:,.0f} MB "
                  f"({(rss - baseline_rss) * 1024 / idle:,.1f} KB per connection; opened in "
                  f"{seconds:.1f} s)   target <= 500 MB")
            print(f"   baseline relay RSS before any connection: {baseline_rss:,.0f} MB")
        finally:
            for process in (relay, null):
                process.terminate()
                process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--null-relay", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database", metavar="postgresql://...|start",
                        help="measure the PostgreSQL backend, 1-3 processes, beside SQLite")
    args = parser.parse_args()
    if args.null_relay:
        trio.run(null_relay)
    elif args.database:
        from relay_database import bench_database

        raise_file_limit()
        circle, sender, recipient = two_device_circle()
        trio.run(bench_database, args.database, circle, sender, recipient, args.quick)
    else:
        trio.run(bench, args.quick)


if __name__ == "__main__":
    main()
