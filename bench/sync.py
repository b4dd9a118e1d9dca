"""Benchmark of log sync between two processes over loopback TCP, with same-run baselines.

Process A (this one) holds a pre-generated log and serves meshd's secure channel; process B
(a child) starts with an empty store, connects and syncs. Both run a Store and a LogService;
B prints each commit with a CLOCK_MONOTONIC timestamp (system-wide on Linux, so A can
subtract its own).

1. A new device receives N entries (200-byte bodies) from one peer.
                                     target: 1,000,000 in <= 10 s, receiver peak RSS <= 200 MB
2. 10,000 entries written on A (one bulk write) until B has committed them. target <= 0.5 s
3. Live latency of one entry, write on A to commit on B, p50 and p99.       target p50 <= 10 ms

Baselines: raw SQLite executemany of the same (key, header, body) rows into one table, and
the in-process verify+commit rate without any network.

`--profile FILE` runs B under cProfile until it has the initial N entries and writes the
top functions to FILE, of B's trio thread, of the worker thread that verifies each batch
(LogService.verify_received) and of the writer thread that commits it (commit_verified),
separately (batch n+1 is verified while batch n commits: meshd/net/receivepipe.py).

Run: .venv/bin/python bench/sync.py [--entries N] [--profile FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.net.listener import serve_secure  # noqa: E402
from meshd.net.logsync import LogService  # noqa: E402
from meshd.net.peersync import sync_over  # noqa: E402
from meshd.net.transport import PeerClosed, SecureConnection, connect_secure  # noqa: E402
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair  # noqa: E402
from meshd.store.db import Store  # noqa: E402

BODY_BYTES = 200
PROPAGATE_ENTRIES = 10_000
LIVE_SAMPLES = 300


def wall_ms() -> int:
    return int(time.time() * 1000)


# ---- process B ------------------------------------------------------------------------


class ReceiverProfile:
    """cProfile of B's trio thread, and of the worker threads' verification and commits (a
    profile each, enabled around each call: they run at once, batch n+1 verified while batch
    n commits), until B has `until` entries."""

    def __init__(self, service: LogService, path: Path, until: int) -> None:
        self.path, self.until = path, until
        self.trio_thread = cProfile.Profile()
        self.workers = {"verify": cProfile.Profile(), "commit": cProfile.Profile()}
        self.worker_s = dict.fromkeys(self.workers, 0.0)
        trio_thread = threading.get_ident()

        def wrap(name: str, function: Any) -> Any:
            profile = self.workers[name]

            def profiled(*args: Any) -> Any:
                if threading.get_ident() == trio_thread:  # (a copy, checked inline)
                    return function(*args)
                started = time.perf_counter()
                profile.enable()
                try:
                    return function(*args)
                finally:
                    profile.disable()
                    self.worker_s[name] += time.perf_counter() - started
            return profiled

        service.verify_received = wrap("verify", service.verify_received)  # type: ignore[method-assign]
        service.commit_verified = wrap("commit", service.commit_verified)  # type: ignore[method-assign]
        self.started = time.perf_counter()
        self.trio_thread.enable()

    def check(self, seq: int) -> None:
        if self.until and seq >= self.until:
            self.trio_thread.disable()
            total = time.perf_counter() - self.started
            with self.path.open("w") as out:
                out.write(f"receiver, under cProfile: {seq:,} entries in {total:.2f} s; "
                          f"verifying (worker thread) {self.worker_s['verify']:.2f} s, "
                          f"committing (writer thread) {self.worker_s['commit']:.2f} s\n")
                profiles = [("trio thread", self.trio_thread),
                            *((f"{name} thread", p) for name, p in self.workers.items())]
                for name, profile in profiles:
                    for key in ("tottime", "cumulative"):
                        text = io.StringIO()
                        pstats.Stats(profile, stream=text).sort_stats(key).print_stats(25)
                        out.write(f"\n---- {name}, by {key} ----\n")
                        out.write(text.getvalue().split("\n\n", 1)[-1].rstrip() + "\n")
            self.until = 0


async def receiver(db: Path, port: int, profile_path: str = "", until: int = 0) -> None:
    service = LogService(Store(db), SigningKeyPair(os.urandom(32)), wall_ms)
    profile = ReceiverProfile(service, Path(profile_path), until) if profile_path else None
    out = sys.stdout
    out.write(f"start {time.monotonic()}\n")
    out.flush()
    connection = await connect_secure("127.0.0.1", port, static=DHKeyPair.generate(os.urandom),
                                      authorize=lambda key: True)
    peer = service.peer(connection.send, lambda author: True)

    async def report_commits() -> None:
        # Each commit as it lands (a batch commits after handle() returns: the next one
        # is verified meanwhile).
        generation, seen = 0, 0
        while True:
            generation = await service.changed.wait(generation)
            seq = max(service.version_vector().values(), default=0)
            if seq != seen:
                seen = seq
                usage = resource.getrusage(resource.RUSAGE_SELF)
                out.write(f"c {seq} {time.monotonic()} {usage.ru_maxrss} "
                          f"{usage.ru_utime + usage.ru_stime}\n")
                out.flush()
                if profile is not None:
                    profile.check(seq)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        nursery.start_soon(report_commits)
        try:
            async for message in connection:
                await peer.handle(message)
        except PeerClosed:
            pass
        nursery.cancel_scope.cancel()


# ---- process A ------------------------------------------------------------------------


class Progress:
    """B's reports: wait until B has committed A's entry `seq`."""

    def __init__(self) -> None:
        self.seq = 0
        self.at = 0.0
        self.rss_kib = 0
        self.cpu_s = 0.0  # B's user+sys CPU seconds at its latest report
        self.start = 0.0
        self.history: list[tuple[int, float]] = []
        self._changed = trio.Event()

    def report(self, line: str) -> None:
        fields = line.split()
        if fields[0] == "start":
            self.start = float(fields[1])
            return
        self.seq, self.at, self.rss_kib = int(fields[1]), float(fields[2]), int(fields[3])
        self.cpu_s = float(fields[4])
        self.history.append((self.seq, self.at))
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, seq: int) -> float:
        while self.seq < seq:
            await self._changed.wait()
        return next(at for s, at in self.history if s >= seq)


async def read_reports(stream: trio.abc.ReceiveStream, progress: Progress) -> None:
    buffer = b""
    while data := await stream.receive_some(65536):
        *lines, buffer = (buffer + data).split(b"\n")
        for line in lines:
            progress.report(line.decode())


async def bench(entries: int, directory: Path, profile: str) -> dict[str, float]:
    results: dict[str, float] = {}
    signer = SigningKeyPair(os.urandom(32))
    sender = LogService(Store(directory / "a.db"), signer, wall_ms)
    start = time.perf_counter()
    sender.write_many_nowait(("history", None, os.urandom(BODY_BYTES)) for _ in range(entries))
    results["generate_s"] = time.perf_counter() - start

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handler(connection: SecureConnection) -> None:
        await sync_over(connection, sender, lambda author: True)

    progress = Progress()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_secure, handler, listeners,
                                   static=DHKeyPair.generate(os.urandom),
                                   authorize=lambda key: True))
        process = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--receiver", str(directory / "b.db"), str(port),
             *([profile, str(entries)] if profile else [])],
            stdout=subprocess.PIPE)
        assert process.stdout is not None
        nursery.start_soon(read_reports, process.stdout, progress)

        # 1. initial sync (CPU: B's from its start, so its imports and the handshake too;
        # A's, the sender's, over the same span; less sensitive to load than wall time)
        sender_cpu = _cpu_s()
        done_at = await progress.wait_for(entries)
        results["initial_sender_cpu_s"] = _cpu_s() - sender_cpu
        results["initial_s"] = done_at - progress.start
        results["initial_rss_mb"] = progress.rss_kib / 1024
        results["initial_receiver_cpu_s"] = progress.cpu_s

        # 2. 10,000 entries written on A until committed on B
        target = entries + PROPAGATE_ENTRIES
        started = time.monotonic()
        await sender.write_many(("burst", None, os.urandom(BODY_BYTES))
                                for _ in range(PROPAGATE_ENTRIES))
        results["propagate_write_s"] = time.monotonic() - started
        results["propagate_s"] = await progress.wait_for(target) - started

        # 3. live single entries, one at a time
        latencies = []
        for i in range(LIVE_SAMPLES):
            started = time.monotonic()
            written = await sender.write("live", f"m{i}", os.urandom(BODY_BYTES))
            latencies.append(await progress.wait_for(written["seq"]) - started)
        latencies.sort()
        results["live_p50_ms"] = statistics.median(latencies) * 1000
        results["live_p99_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1000
        results["receiver_peak_rss_mb"] = progress.rss_kib / 1024
        process.kill()
        await process.wait()
        nursery.cancel_scope.cancel()

    results.update(baselines(sender, directory, min(entries, 200_000)))
    return results


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def baselines(sender: LogService, directory: Path, count: int) -> dict[str, float]:
    """Raw SQLite insert of the same rows; in-process verify+commit without a network."""
    rows = []
    after = 0
    while len(rows) < count:
        message = sender.batch_since(sender.author, after, 1 << 20)
        assert message is not None
        for header, body in zip(message["headers"], message["bodies"], strict=True):
            rows.append((after + len(rows) + 1, header, body))
        after = message["head"]["seq"]
        rows = rows[:count]
    db = sqlite3.connect(directory / "raw.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, header BLOB, body BLOB)")
    start = time.perf_counter()
    for i in range(0, len(rows), 1000):
        db.execute("BEGIN")
        db.executemany("INSERT INTO t VALUES (?, ?, ?)", rows[i:i + 1000])
        db.execute("COMMIT")
    raw = len(rows) / (time.perf_counter() - start)

    local = LogService(Store(directory / "c.db"), SigningKeyPair(os.urandom(32)), wall_ms)
    start = time.perf_counter()
    seq = 0
    while seq < count:
        message = sender.batch_since(sender.author, seq, 256 * 1024)
        assert message is not None
        local.ingest(message, lambda author: True)
        seq = message["head"]["seq"]
    in_process = seq / (time.perf_counter() - start)
    return {"raw_sqlite_rows_per_s": raw, "in_process_entries_per_s": in_process}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--profile", default="", help="write B's cProfile of the initial sync here")
    parser.add_argument("--receiver", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        db, port, *profiling = args.receiver
        trio.run(receiver, Path(db), int(port), *(profiling[:1] + [int(x) for x in profiling[1:]]))
        return
    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as directory:
        profile = str(Path(args.profile).resolve()) if args.profile else ""
        r = trio.run(bench, args.entries, Path(directory), profile)
    n = args.entries
    print(f"pre-generate {n:,} entries on A (bulk path): {r['generate_s']:.1f} s")
    print(f"1. receive {n:,} entries of {BODY_BYTES} B: {r['initial_s']:.2f} s "
          f"({n / r['initial_s']:,.0f} entries/s), receiver peak RSS {r['initial_rss_mb']:.0f} MB"
          f"   [target <= 10 s, <= 200 MB for 1,000,000]")
    print(f"   CPU (user+sys) until then: receiver {r['initial_receiver_cpu_s']:.2f} s "
          f"({r['initial_receiver_cpu_s'] / n * 1e6:.1f} us/entry), "
          f"sender {r['initial_sender_cpu_s']:.2f} s; receiver cores busy "
          f"{r['initial_receiver_cpu_s'] / r['initial_s']:.2f} (B's CPU counts from its start)")
    print(f"2. propagate {PROPAGATE_ENTRIES:,} entries A -> committed on B: "
          f"{r['propagate_s'] * 1000:.0f} ms (of which the write on A {r['propagate_write_s'] * 1000:.0f} ms)"
          f"   [target <= 500 ms]")
    print(f"3. live single entry write on A -> commit on B: p50 {r['live_p50_ms']:.2f} ms, "
          f"p99 {r['live_p99_ms']:.2f} ms   [target p50 <= 10 ms]")
    print(f"   receiver peak RSS over the whole run: {r['receiver_peak_rss_mb']:.0f} MB")
    print(f"baseline: raw SQLite executemany of the same rows: {r['raw_sqlite_rows_per_s']:,.0f} rows/s;"
          f" in-process verify+commit (no network): {r['in_process_entries_per_s']:,.0f} entries/s;"
          f" sync over TCP reached {n / r['initial_s'] / r['raw_sqlite_rows_per_s']:.0%} of raw")
    print(json.dumps({k: round(v, 3) for k, v in r.items()}))


if __name__ == "__main__":
    main()
