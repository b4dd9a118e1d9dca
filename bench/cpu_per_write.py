"""CPU per write of a steady write load against logs of different sizes (issue 20).

The daemon's CPU at a constant write rate must not grow with the size of its log. This
measures, in one run, the CPU (all threads of the process: time.process_time) that a steady
load costs per write against a log prefilled with 0, 100,000 and 400,000 entries: rounds of
ROUND_WRITES local writes through the group commit (LogService.write), the same entries
synced to a second device holding the same log (batch_since, then receive: verify and commit
in a worker thread), and one relay backup upload per round (meshd/backup.py against an
in-memory relay, as the backup loop does every few seconds at 20 writes/s), with
DELETES deletes every 10 rounds (they purge bodies). Phases are timed apart: write, sync,
backup. The backup's first upload of the prefilled log is made before measuring.

With --baseline-tree DIR (for example `git archive main | tar -x -C DIR`), each measurement
is also made with DIR's code, alternating new and baseline, on copies of the same prefilled
stores, so the figures compare at the same moment on a shared machine.

Run: .venv/bin/python bench/cpu_per_write.py [--sizes 0,100000,400000] [--rounds 60]
     [--baseline-tree /tmp/base] [--repeat 2] [--deletes 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
ROUND_WRITES = 40
DELETES = 4
BODY = 1000
FILL_BODY = 200
STREAMS = 4


def fill(path: Path, entries: int) -> float:
    """A store holding `entries` puts of alice's (the same identity in every child)."""
    from meshd.net.logsync import LogService
    from meshd.store.db import Store
    from tests.shell.test_relay import make_circle

    _, members, _ = make_circle("alice", "bob")
    store = Store(path)
    began = time.perf_counter()
    try:
        logs = LogService(store, members["alice"].signer, lambda: int(time.time() * 1000))
        body = b"f" * FILL_BODY
        logs.write_many_nowait(((f"s{i % STREAMS}", f"fill{i}", body) for i in range(entries)),
                               chunk_entries=20_000)
    finally:
        store.close()
    return time.perf_counter() - began


async def child(db: Path, rounds: int, deletes: int) -> dict[str, float]:
    from meshd.backup import Backups
    from meshd.identity import DeviceIdentity
    from meshd.net.logsync import LogService
    from meshd.protocol.log import Batch
    from meshd.protocol.sync import BATCH_BYTES
    from meshd.store.db import Store
    from tests.shell.test_backup_chain import CountingRelay
    from tests.shell.test_backup_leaks import ADDRESS, Host
    from tests.shell.test_relay import make_circle

    circle, members, rng = make_circle("alice", "bob")
    alice, bob = members["alice"], members["bob"]
    shutil.copy(db, db.with_name("b.db"))
    store = Store(db)
    logs = LogService(store, alice.signer, lambda: int(time.time() * 1000))
    peer_store = Store(db.with_name("b.db"))
    peer = LogService(peer_store, bob.signer, lambda: int(time.time() * 1000))
    host = Host(circle, DeviceIdentity(alice.signer, alice.dh), store, logs, rng)
    backups = Backups(host, lambda *_: None)
    relay = CountingRelay()
    me = logs.author
    counts = {"body_count": 0}
    body_count = store.body_count

    def counting(author: bytes, first: int, last: int) -> int:
        counts["body_count"] += 1
        return body_count(author, first, last)

    store.body_count = counting  # type: ignore[method-assign]
    began = time.perf_counter()
    while True:  # the first backup of the prefilled log, in rounds of ROUND_BYTES
        assert await backups.upload(ADDRESS, relay), backups.describe(ADDRESS)
        state = backups.state(ADDRESS)
        if state.manifest is not None and state.manifest.covered(me) >= logs.version_vector().get(me, 0):
            break
    first_upload_s = time.perf_counter() - began
    phases = {"write": 0.0, "sync": 0.0, "backup": 0.0}
    counts["body_count"] = 0
    written = 0
    n = 0

    async def one_round(measure: bool) -> None:
        nonlocal written, n
        t0 = time.process_time()
        for _ in range(ROUND_WRITES):
            await logs.write(f"s{n % STREAMS}", f"w{n}", bytes([n % 251]) * BODY)
            n += 1
        if n % (10 * ROUND_WRITES) == 0:
            for i in range(deletes):
                await logs.delete(f"s{(n - 5 * ROUND_WRITES + i) % STREAMS}", f"w{n - 5 * ROUND_WRITES + i}")
        t1 = time.process_time()
        while (have := peer.version_vector().get(me, 0)) < logs.version_vector()[me]:
            message = logs.batch_since(me, have, BATCH_BYTES)
            assert message is not None
            await peer.receive(Batch.from_message(message), lambda _a: True)
        t2 = time.process_time()
        assert await backups.upload(ADDRESS, relay), backups.describe(ADDRESS)
        t3 = time.process_time()
        if measure:
            written += ROUND_WRITES
            phases["write"] += t1 - t0
            phases["sync"] += t2 - t1
            phases["backup"] += t3 - t2

    for _ in range(10):  # warm up: caches, the first cycle of purge checks
        await one_round(False)
    counts["body_count"] = 0
    for _ in range(rounds):
        await one_round(True)
    state = backups.state(ADDRESS)
    assert state.manifest is not None
    out = {f"{k}_us": v / written * 1e6 for k, v in phases.items()}
    out["total_us"] = sum(phases.values()) / written * 1e6
    out["body_counts_per_upload"] = counts["body_count"] / rounds
    out["segments"] = len(state.manifest.segments)
    out["first_upload_s"] = first_upload_s
    store.close()
    peer_store.close()
    return out


def run_child(tree: Path, db: Path, rounds: int, deletes: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, str(HERE / "cpu_per_write.py"), "--child", str(db),
                           "--rounds", str(rounds), "--deletes", str(deletes)], env=env, cwd=tree, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"child failed ({tree}):\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,100000,400000")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--deletes", type=int, default=DELETES, help="deletes every 10 rounds")
    parser.add_argument("--baseline-tree", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(trio.run(child, args.child, args.rounds, args.deletes)))
        return
    sys.path.insert(0, str(HERE.parent))
    trees = [("new", HERE.parent)] + ([("base", args.baseline_tree.resolve())] if args.baseline_tree else [])
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"cpu per write: rounds of {ROUND_WRITES} writes of {BODY} B, synced to a peer, one backup "
          f"upload per round, {args.deletes} deletes every 10 rounds; {args.rounds} rounds measured; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'tree':5} {'entries':>8} {'total us':>9} {'write':>7} {'sync':>7} {'backup':>7} "
          f"{'counts/upl':>10} {'segments':>8} {'1st upl s':>9}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cpuwrite-") as tmp:
        filled = {}
        for size in sizes:
            path = Path(tmp) / f"fill{size}" / "a.db"
            path.parent.mkdir()
            seconds = fill(path, size)
            filled[size] = path
            print(f"# filled {size} entries in {seconds:.1f} s", flush=True)
        for repeat in range(args.repeat):
            for size in sizes:
                order = trees if repeat % 2 == 0 else list(reversed(trees))
                for name, tree in order:
                    work = Path(tmp) / f"run-{name}-{size}-{repeat}"
                    work.mkdir()
                    db = work / "a.db"
                    shutil.copy(filled[size], db)
                    r = run_child(tree, db, args.rounds, args.deletes)
                    shutil.rmtree(work)
                    print(f"{name:5} {size:8d} {r['total_us']:9.0f} {r['write_us']:7.0f} {r['sync_us']:7.0f} "
                          f"{r['backup_us']:7.0f} {r['body_counts_per_upload']:10.1f} {r['segments']:8.0f} "
                          f"{r['first_upload_s']:9.1f}  load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
