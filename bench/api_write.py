"""Benchmark of writes through the local API of a real daemon, with same-run baselines.

The daemon is a real `meshd run` process (tests/integration/daemons.py: loopback, no mDNS);
the clients talk HTTP/1.1 over its unix socket.

1. Batch writes: N entries of 200 B through POST /v1/batch (Client.import_lines, ~1 MiB
   requests, as `meshctl import` sends them), entries/s from the first request to the last
   answer (every entry durable).           target >= 50,000 entries/s and >= 25% of raw
   Baseline: raw SQLite executemany of the same rows (key, stream, id, body) into one table
   (WAL, synchronous=FULL, one transaction per 4,000 rows, like the batch requests),
   alternating with the API runs, and with --baseline-tree PATH the same batches against a
   daemon running the code in PATH; medians of --rounds rounds.
2. 16 concurrent single-entry writers: each a keep-alive connection posting one record at a
   time to POST /v1/streams/{s}/records; writes/s over all, and the latency of each request.
   Meanwhile one more connection sends GET /v1/status back to back (figure 3: how long the
   API keeps a read waiting under write load); with --probe-interval-ms MS it waits MS between
   probes instead, so the probe measures reads without being a 17th client at full speed that
   takes its share of the API's thread from the writers (figure 2).
                                           target >= 5,000 writes/s, p50 <= 5 ms
4. The same 16 writers and probe (as --probe-interval-ms says), each request on a new
   connection (opened, one request, closed): what a client without keep-alive costs the
   server (its accept loop, the connection's task and checks), daemon CPU per request.
   Baselines: one writer alone on the same daemon (what grouping buys), raw SQLite one
   transaction per row (synchronous=FULL), and, with --baseline-tree PATH, the same 16
   writers against a daemon running the code in PATH (e.g. an export of main), alternating
   with this tree's runs; medians of --rounds rounds. The bench's own CPU per write (its
   clients, one process) is printed next to the daemon's, to show what limits the figure.

The machine may be shared: figures are for this run only; compare the ratios.

Run: .venv/bin/python bench/api_write.py [--entries N] [--writes-per-writer N] [--baseline-tree PATH]
     [--batch-only]  (figure 1 alone) [--probe-interval-ms MS]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.api.client import Client  # noqa: E402
from tests.integration.daemons import DaemonProcess  # noqa: E402

BODY_BYTES = 200
WRITERS = 16
RAW_CHUNK = 4000

TARGET_BATCH_PER_S = 50_000
TARGET_BATCH_RATIO = 0.25
TARGET_WRITES_PER_S = 5_000
TARGET_P50_MS = 5.0


def body(i: int) -> str:
    return f"{i:08d}" + "x" * (BODY_BYTES - 8)


# ---- 1. batch ---------------------------------------------------------------------------


def batch_writes(socket_path: Path, entries: int, pid: int) -> tuple[float, float]:
    """(entries/s, the daemon's CPU microseconds per entry)."""
    client = Client(socket_path, timeout=120)
    lines = [json.dumps({"body": body(i)}).encode() for i in range(entries)]
    started, cpu = time.perf_counter(), cpu_seconds(pid)
    result = client.import_lines(lines, "batch")
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
    assert result["written"] == entries and not result["failed"], result
    return entries / elapsed, cpu * 1e6 / entries


def raw_executemany(directory: Path, entries: int, *, per_row: bool = False) -> float:
    path = directory / ("raw-rows.db" if per_row else "raw.db")
    path.unlink(missing_ok=True)
    Path(f"{path}-wal").unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, stream TEXT, record_id TEXT, body BLOB)")
    rows = [(i + 1, "batch", f"b{i:08d}", body(i).encode()) for i in range(entries)]
    chunk = 1 if per_row else RAW_CHUNK
    started = time.perf_counter()
    for i in range(0, len(rows), chunk):
        db.execute("BEGIN")
        db.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows[i:i + chunk])
        db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    return entries / elapsed


# ---- 2. concurrent single writes ---------------------------------------------------------


class KeepAlive:
    """One HTTP/1.1 keep-alive connection posting records; minimal parsing, no h11, so the
    client costs little next to the server it measures."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def post(self, target: str, payload: bytes) -> int:
        return await self.call("POST", target, payload)

    async def call(self, method: str, target: str, payload: bytes = b"") -> int:
        await self.stream.send_all(
            f"{method} {target} HTTP/1.1\r\nHost: meshd\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += await self.stream.receive_some(65536)
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(self.buffer) < length:
            self.buffer += await self.stream.receive_some(65536)
        self.buffer = self.buffer[length:]
        return status


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's threads (/proc/PID/task/*/schedstat, in ns): CPU spent, however
    loaded the machine is. (trio keeps its worker threads alive between jobs, so no thread
    ends, taking its count with it, during a run.)"""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a worker thread that just ended
    return total / 1e9


def main_thread_seconds(pid: int) -> float:
    """CPU time of the process's main thread: the daemon's trio thread, where the API's HTTP,
    routing and JSON run (the group commit's writer thread is another task)."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9


async def concurrent_writes(socket_path: Path, writers: int, per_writer: int,
                            stream: str, pid: int, probe_interval_s: float = 0.0,
                            new_connections: bool = False) -> dict[str, float]:
    latencies: list[float] = []

    async def call(connection: KeepAlive | None, method: str, target: str, payload: bytes = b"") -> int:
        if connection is not None:
            return await connection.call(method, target, payload)
        async with await trio.open_unix_socket(str(socket_path)) as fresh:  # figure 4
            return await KeepAlive(fresh).call(method, target, payload)

    async def writer(n: int) -> None:
        connection = None if new_connections else KeepAlive(await trio.open_unix_socket(str(socket_path)))
        async with connection.stream if connection else contextlib.nullcontext():
            for i in range(per_writer):
                payload = json.dumps({"body": body(n * per_writer + i)}).encode()
                started = time.perf_counter()
                status = await call(connection, "POST", f"/v1/streams/{stream}/records", payload)
                latencies.append(time.perf_counter() - started)
                assert status == 201, status

    probes: list[float] = []

    async def prober(done: trio.Event) -> None:
        """GET /v1/status back to back while the writers run: how long a read waits."""
        connection = None if new_connections else KeepAlive(await trio.open_unix_socket(str(socket_path)))
        async with connection.stream if connection else contextlib.nullcontext():
            while not done.is_set():
                started = time.perf_counter()
                assert await call(connection, "GET", "/v1/status") == 200
                probes.append(time.perf_counter() - started)
                if probe_interval_s:
                    await trio.sleep(probe_interval_s)

    started, cpu, main_cpu = time.perf_counter(), cpu_seconds(pid), main_thread_seconds(pid)
    client_cpu = time.process_time()
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prober, done)
        async with trio.open_nursery() as writers_nursery:
            for n in range(writers):
                writers_nursery.start_soon(writer, n)
        done.set()
    elapsed = time.perf_counter() - started
    client_cpu = time.process_time() - client_cpu
    cpu, main_cpu = cpu_seconds(pid) - cpu, main_thread_seconds(pid) - main_cpu
    latencies.sort()
    probes.sort()
    return {"writes_per_s": len(latencies) / elapsed,
            "daemon_cpu_ms_per_write": cpu * 1000 / len(latencies),
            "daemon_trio_thread_cpu_ms_per_write": main_cpu * 1000 / len(latencies),
            "client_cpu_ms_per_write": client_cpu * 1000 / len(latencies),
            "status_probes": len(probes),
            "daemon_cpu_ms_per_request": cpu * 1000 / (len(latencies) + len(probes)),
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
            "status_p50_ms": statistics.median(probes) * 1000,
            "status_p99_ms": probes[max(0, int(len(probes) * 0.99) - 1)] * 1000}


# ---- the run ------------------------------------------------------------------------------


async def start_daemon(root: Path, name: str, tree: Path | None = None) -> DaemonProcess:
    daemon = DaemonProcess(root, name, discovery=False, log_level="warning")
    saved, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    if tree is not None:  # the baseline daemon imports meshd from that tree: `python -m`
        os.environ["PYTHONPATH"] = str(tree)  # puts its working directory first on the path,
        os.chdir(tree)  # so that must be the tree too, not a checkout it was started from
    try:
        await daemon.start()
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return daemon


def daemon_pid(daemon: DaemonProcess) -> int:
    assert daemon.process is not None
    return daemon.process.pid


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


async def batch_figures(args: argparse.Namespace, directory: Path, r: dict[str, float]) -> None:
    daemon = await start_daemon(directory, "batch")
    base = await start_daemon(directory, "base-batch", args.baseline_tree) if args.baseline_tree else None
    try:
        batch, raw, base_batch = [], [], []
        for _ in range(args.rounds):  # alternating, so both see the same load
            batch.append(await trio.to_thread.run_sync(batch_writes, daemon.socket_path, args.entries,
                                                       daemon_pid(daemon)))
            raw.append(raw_executemany(directory, args.entries))
            if base is not None:
                base_batch.append(await trio.to_thread.run_sync(batch_writes, base.socket_path,
                                                                args.entries, daemon_pid(base)))
        r["batch_entries_per_s"] = statistics.median(rate for rate, _ in batch)
        r["batch_daemon_cpu_us_per_entry"] = statistics.median(cpu for _, cpu in batch)
        r["raw_executemany_rows_per_s"] = statistics.median(raw)
        if base_batch:
            r["baseline_batch_entries_per_s"] = statistics.median(rate for rate, _ in base_batch)
            r["baseline_batch_daemon_cpu_us_per_entry"] = statistics.median(cpu for _, cpu in base_batch)
    finally:
        daemon.kill()
        if base is not None:
            base.kill()


async def bench(args: argparse.Namespace, directory: Path) -> dict[str, float]:
    r: dict[str, float] = {}
    if not args.writers_only:
        await batch_figures(args, directory, r)
    if args.batch_only:
        return r
    # Fresh daemons for single writes, so neither starts with a bigger database.
    daemon = await start_daemon(directory, "meshd")
    baseline = await start_daemon(directory, "baseline", args.baseline_tree) if args.baseline_tree else None
    try:
        ours, theirs, alone, per_row, fresh, base_fresh = [], [], [], [], [], []
        probe_s = args.probe_interval_ms / 1000
        for _ in range(args.rounds):
            ours.append(await concurrent_writes(daemon.socket_path, WRITERS, args.writes_per_writer, "many",
                                                daemon_pid(daemon), probe_s))
            if baseline is not None:
                theirs.append(await concurrent_writes(baseline.socket_path, WRITERS,
                                                      args.writes_per_writer, "many",
                                                      daemon_pid(baseline), probe_s))
            fresh.append(await concurrent_writes(daemon.socket_path, WRITERS, max(1, args.writes_per_writer // 2),
                                                 "fresh", daemon_pid(daemon), probe_s, True))
            if baseline is not None:
                base_fresh.append(await concurrent_writes(baseline.socket_path, WRITERS,
                                                          max(1, args.writes_per_writer // 2), "fresh",
                                                          daemon_pid(baseline), probe_s, True))
            alone.append(await concurrent_writes(daemon.socket_path, 1, args.writes_per_writer * 2, "alone",
                                                 daemon_pid(daemon), probe_s))
            per_row.append(raw_executemany(directory, min(args.writes_per_writer * 4, 2000), per_row=True))
        r.update({f"concurrent_{k}": v for k, v in median_of(ours).items()})
        r.update({f"one_writer_{k}": v for k, v in median_of(alone).items()})
        r["raw_row_per_transaction_per_s"] = statistics.median(per_row)
        if theirs:
            r.update({f"baseline_concurrent_{k}": v for k, v in median_of(theirs).items()})
        r.update({f"fresh_{k}": v for k, v in median_of(fresh).items()})
        if base_fresh:
            r.update({f"baseline_fresh_{k}": v for k, v in median_of(base_fresh).items()})
    finally:
        daemon.kill()
        if baseline is not None:
            baseline.kill()
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000, help="entries for the batch test")
    parser.add_argument("--writes-per-writer", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="a meshd source tree (e.g. `git archive main`) to run as a baseline daemon")
    parser.add_argument("--batch-only", action="store_true", help="run figure 1 only")
    parser.add_argument("--writers-only", action="store_true", help="run figures 2 and 3 only")
    parser.add_argument("--probe-interval-ms", type=float, default=0.0,
                        help="pause between GET /v1/status probes (default 0: back to back)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshd-bench-", dir="/tmp") as directory:
        r = trio.run(bench, args, Path(directory))
    if not args.writers_only:
        print_batch(args, r)
    if args.batch_only:
        print(json.dumps({k: round(v, 3) for k, v in r.items()}))
        return
    print_writers(args, r)


def print_batch(args: argparse.Namespace, r: dict[str, float]) -> None:
    batch, raw = r["batch_entries_per_s"], r["raw_executemany_rows_per_s"]
    print(f"1. batch writes through the API: {batch:,.0f} entries/s "
          f"(target >= {TARGET_BATCH_PER_S:,}); raw SQLite executemany of the same rows "
          f"{raw:,.0f} rows/s; ratio {batch / raw:.1%} (target >= {TARGET_BATCH_RATIO:.0%})")
    if "baseline_batch_entries_per_s" in r:
        base = r["baseline_batch_entries_per_s"]
        print(f"   baseline: the same batches against {args.baseline_tree}: {base:,.0f} entries/s "
              f"({base / raw:.1%} of raw): this tree is {batch / base:.2f}x")
    print(f"   daemon CPU per entry: {r['batch_daemon_cpu_us_per_entry']:.1f} us")
    if "baseline_batch_daemon_cpu_us_per_entry" in r:
        print(f"   baseline: the same against {args.baseline_tree}: "
              f"{r['baseline_batch_daemon_cpu_us_per_entry']:.1f} us")


def print_writers(args: argparse.Namespace, r: dict[str, float]) -> None:
    probing = (f"a GET /v1/status every {args.probe_interval_ms:g} ms" if args.probe_interval_ms
               else "GET /v1/status back to back")
    print(f"2. {WRITERS} concurrent single-entry writers: {r['concurrent_writes_per_s']:,.0f} writes/s "
          f"(target >= {TARGET_WRITES_PER_S:,}), p50 {r['concurrent_p50_ms']:.2f} ms "
          f"(target <= {TARGET_P50_MS}), p99 {r['concurrent_p99_ms']:.2f} ms; "
          f"meanwhile {probing}: {r['concurrent_status_probes']:,.0f} probes")
    print(f"   baseline: one writer alone {r['one_writer_writes_per_s']:,.0f} writes/s "
          f"(p50 {r['one_writer_p50_ms']:.2f} ms): {WRITERS} writers are "
          f"{r['concurrent_writes_per_s'] / r['one_writer_writes_per_s']:.1f}x")
    print(f"   baseline: raw SQLite, one transaction per row (synchronous=FULL): "
          f"{r['raw_row_per_transaction_per_s']:,.0f} rows/s")
    if "baseline_concurrent_writes_per_s" in r:
        print(f"   baseline: the same {WRITERS} writers against {args.baseline_tree}: "
              f"{r['baseline_concurrent_writes_per_s']:,.0f} writes/s, p50 "
              f"{r['baseline_concurrent_p50_ms']:.2f} ms: this tree is "
              f"{r['concurrent_writes_per_s'] / r['baseline_concurrent_writes_per_s']:.1f}x")
    print(f"   daemon CPU per write (all of its CPU, status probes included, over the writes): "
          f"{r['concurrent_daemon_cpu_ms_per_write']:.3f} ms, of which its trio thread (HTTP, "
          f"routing, JSON) {r['concurrent_daemon_trio_thread_cpu_ms_per_write']:.3f} ms")
    if "baseline_concurrent_daemon_cpu_ms_per_write" in r:
        print(f"   baseline: the same against {args.baseline_tree}: "
              f"{r['baseline_concurrent_daemon_cpu_ms_per_write']:.3f} ms, of which "
              f"{r['baseline_concurrent_daemon_trio_thread_cpu_ms_per_write']:.3f} ms "
              f"({r['baseline_concurrent_status_probes']:,.0f} probes)")
    print(f"   the bench's own CPU per write (its {WRITERS} clients and the probe, one process): "
          f"{r['concurrent_client_cpu_ms_per_write']:.3f} ms (next to the daemon's: the clients "
          f"are not what limits the figure unless this is comparable)")
    print(f"   daemon CPU per request (writes and status probes; CPU time, unlike wall time "
          f"not inflated by other load): {r['concurrent_daemon_cpu_ms_per_request']:.3f} ms")
    if "baseline_concurrent_daemon_cpu_ms_per_request" in r:
        base_cpu = r["baseline_concurrent_daemon_cpu_ms_per_request"]
        print(f"   baseline: the same against {args.baseline_tree}: {base_cpu:.3f} ms: this tree "
              f"uses {r['concurrent_daemon_cpu_ms_per_request'] / base_cpu:.0%} of it")
    print(f"3. GET /v1/status latency while the {WRITERS} writers run: p50 "
          f"{r['concurrent_status_p50_ms']:.2f} ms, p99 {r['concurrent_status_p99_ms']:.2f} ms")
    if "baseline_concurrent_status_p50_ms" in r:
        print(f"   baseline: the same against {args.baseline_tree}: p50 "
              f"{r['baseline_concurrent_status_p50_ms']:.2f} ms, p99 "
              f"{r['baseline_concurrent_status_p99_ms']:.2f} ms")
    print(f"4. the same, each request on a new connection: {r['fresh_writes_per_s']:,.0f} writes/s, p50 "
          f"{r['fresh_p50_ms']:.2f} ms, {r['fresh_status_probes']:,.0f} probes; daemon CPU per request "
          f"{r['fresh_daemon_cpu_ms_per_request']:.3f} ms (trio thread, per write: "
          f"{r['fresh_daemon_trio_thread_cpu_ms_per_write']:.3f} ms)")
    if "baseline_fresh_writes_per_s" in r:
        print(f"   baseline: the same against {args.baseline_tree}: {r['baseline_fresh_writes_per_s']:,.0f} "
              f"writes/s, p50 {r['baseline_fresh_p50_ms']:.2f} ms; daemon CPU per request "
              f"{r['baseline_fresh_daemon_cpu_ms_per_request']:.3f} ms: this tree uses "
              f"{r['fresh_daemon_cpu_ms_per_request'] / r['baseline_fresh_daemon_cpu_ms_per_request']:.0%} of it")
    print(json.dumps({k: round(v, 3) for k, v in r.items()}))


if __name__ == "__main__":
    main()
