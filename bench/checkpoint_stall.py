"""How long a synchronous ingest (the relay mailbox path's LogService.ingest, on the trio
thread) waits when a checkpoint meets a reader's snapshot (review s6, item 2).

Each trial: a reader holds a snapshot in the WAL, a checkpoint meets it (idle: the idle
TRUNCATE, idle_s 0; hard: the group commit's writer thread's RESTART at the hard bound), then
one ingest is timed; the reader lets go after it. main's checkpoints waited for the reader
under the store's write lock (up to WRITER_WAIT_MS = 250 ms); this branch's do not wait. The trees are run alternately in child processes in the same run:

    python bench/checkpoint_stall.py [--main DIR] [--rounds 4] [--trials 5]

--main: a tree of main (default: made with `git archive main` into a temporary directory).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import itertools, sqlite3, sys, tempfile, threading, time
from pathlib import Path
from meshd.net.logsync import LogService
from meshd.protocol.log import PUT, Write, compose_batch
from meshd.store import checkpoint
from meshd.store.db import Store
from tests.protocol.test_log import WALL_MS, allow_all, signer

checkpoint.IDLE_S = 0.0
truncating = threading.Event()
real = checkpoint.Checkpointer._checkpoint
def spy(self, db, mode):
    if mode == "TRUNCATE":
        truncating.set()
    return real(self, db, mode)
checkpoint.Checkpointer._checkpoint = spy
author = signer(3)

def from_peer(peer):
    seq, hash = peer.store.tip(bytes(author.public))
    peer.store.commit_batch(compose_batch(author, seq, hash, 0, WALL_MS + seq,
                                          [Write("s", f"r{seq}", PUT, b"x" * 200)]), durable=False)
    return peer.batch_since(bytes(author.public), seq, 1 << 20)

import meshd.store.db as db_module
at_bound = threading.Event()
real_restart = db_module.restart
def restart_spy(db, lock):
    if threading.current_thread() is not threading.main_thread():
        at_bound.set()
    return real_restart(db, lock)
db_module.restart = restart_spy
hard = sys.argv[2] == "hard"
me = signer(5)

def local_write(store):  # the group commit's writer thread
    seq, hash = store.tip(bytes(me.public))
    store.commit_batch(compose_batch(me, seq, hash, 0, WALL_MS + seq,
                                     [Write("s", "local", PUT, b"y")]), durable=True)

for trial in range(int(sys.argv[1])):
    with tempfile.TemporaryDirectory() as d:
        ticks = itertools.count()
        logs = LogService(Store(Path(d) / "a.db"), signer(1), lambda: WALL_MS + next(ticks))
        peer = LogService(Store(Path(d) / "b.db"), signer(2), lambda: WALL_MS + next(ticks))
        reader = sqlite3.connect(Path(d) / "a.db", isolation_level=None)
        writer = None
        if hard:  # no idle checkpoint; every commit from now on past the hard bound
            logs.store.checkpointer._idle_s = 3600.0
            logs.ingest(from_peer(peer), allow_all)
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM entries").fetchone()
            logs.store._wal_hard = 1
            message = from_peer(peer)
            at_bound.clear()
            writer = threading.Thread(target=local_write, args=(logs.store,))
            writer.start()
            at_bound.wait()
        else:
            with logs.store.write_lock:
                truncating.clear()
                logs.ingest(from_peer(peer), allow_all)
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM entries").fetchone()
            message = from_peer(peer)
            truncating.wait()
        start = time.perf_counter()
        logs.ingest(message, allow_all)
        print((time.perf_counter() - start) * 1000, flush=True)
        reader.execute("COMMIT")
        if writer is not None:
            writer.join()
        reader.close()
        logs.store.close()
        peer.store.close()
"""


def run(tree: Path, trials: int, case: str) -> list[float]:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{ROOT}"}  # meshd from tree; tests from here
    out = subprocess.run([sys.executable, "-c", CHILD, str(trials), case], env=env, cwd=tree,
                         check=True, capture_output=True, text=True).stdout
    return [float(line) for line in out.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main", type=Path)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        main_tree = args.main
        if main_tree is None:
            main_tree = Path(directory)
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", "main"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(main_tree)], input=archive, check=True)
        print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds x {args.trials} trials")
        for case, what in (("idle", "the idle TRUNCATE"),
                           ("hard", "the writer thread's RESTART at the hard bound")):
            results: dict[str, list[float]] = {"main": [], "new": []}
            for _ in range(args.rounds):
                results["main"] += run(main_tree, args.trials, case)
                results["new"] += run(ROOT, args.trials, case)
            for name, values in results.items():
                print(f"{name}: ingest while {what} meets a reader: median "
                      f"{statistics.median(values):.2f} ms, max {max(values):.2f} ms "
                      f"({', '.join(f'{v:.1f}' for v in values)})")
            ratio = statistics.median(results["main"]) / statistics.median(results["new"])
            print(f"main/new (medians) {ratio:.0f}x; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
