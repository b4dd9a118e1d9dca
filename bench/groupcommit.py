"""Benchmark of the group commit alone: concurrent local writers in one process, no HTTP.

W writers (default 16) each await LogService.write N times, one record at a time, on a real
SQLite file (synchronous=FULL, as the daemon's local writes). Prints writes/s, writes per
transaction (LogService.group_commit.groups counts the transactions) and the process's CPU
per write. What the local API's concurrent single writes (bench/api_write.py, figure 2) cost
on the store's side, without the HTTP server's share.

With --baseline-tree PATH (e.g. `git archive main | tar -x -C /tmp/base`), the same run with
the code in PATH, alternating with this tree's runs, each in its own process; medians of
--rounds rounds. The machine may be shared: compare the ratios of one run.

Run: .venv/bin/python bench/groupcommit.py [--writers 16] [--writes-per-writer 200] [--baseline-tree PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

TREE = Path(__file__).resolve().parent.parent
BODY_BYTES = 200


async def _writers(directory: Path, writers: int, per_writer: int) -> dict[str, float]:
    from meshd.net.logsync import LogService
    from meshd.store.db import Store
    from tests.protocol.test_log import signer

    logs = LogService(Store(directory / "bench.db"), signer(1), lambda: int(time.time() * 1000))

    async def writer(n: int) -> None:
        for i in range(per_writer):
            await logs.write("many", None, f"{n:04d}-{i:08d}".ljust(BODY_BYTES, "x").encode())

    started, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for n in range(writers):
            nursery.start_soon(writer, n)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    total = writers * per_writer
    logs.store.close()
    return {"writes_per_s": total / elapsed, "writes_per_transaction": total / logs.group_commit.groups,
            "cpu_us_per_write": cpu * 1e6 / total, "load": os.getloadavg()[0]}


def child(writers: int, per_writer: int) -> None:
    """In the tree on sys.path (PYTHONPATH): one run, its figures as JSON on stdout."""
    with tempfile.TemporaryDirectory(prefix="meshd-groupcommit-", dir="/tmp") as directory:
        print(json.dumps(trio.run(_writers, Path(directory), writers, per_writer)))


def run_in(tree: Path, writers: int, per_writer: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, str(TREE / "bench" / "groupcommit.py"), "--child",
                          "--writers", str(writers), "--writes-per-writer", str(per_writer)],
                         env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    figures: dict[str, float] = json.loads(out.splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--writes-per-writer", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.writers, args.writes_per_writer)
        return
    trees = [("this tree", TREE)] + ([("baseline", args.baseline_tree)] if args.baseline_tree else [])
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for _ in range(args.rounds):  # alternating, so both see the same load
        for name, tree in trees:
            runs[name].append(run_in(tree, args.writers, args.writes_per_writer))
            print(f"  {name}: " + ", ".join(f"{k} {v:,.1f}" for k, v in runs[name][-1].items()))
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, m in medians.items():
        print(f"{name}: {args.writers} writers x {args.writes_per_writer}: {m['writes_per_s']:,.0f} writes/s, "
              f"{m['writes_per_transaction']:.1f} writes per transaction, "
              f"CPU {m['cpu_us_per_write']:.1f} us per write (medians of {args.rounds}; load {m['load']:.1f})")
    if args.baseline_tree:
        ours, base = medians["this tree"], medians["baseline"]
        print(f"ratio: {ours['writes_per_s'] / base['writes_per_s']:.2f}x the writes/s, "
              f"{ours['cpu_us_per_write'] / base['cpu_us_per_write']:.0%} of the CPU per write")
    print(json.dumps(medians))


if __name__ == "__main__":
    main()
