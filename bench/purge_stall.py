"""Benchmark: how long the event loop stalls while a reader holds up the WAL purge (issue 20).

A reader (another thread, as the stream counts or a tool reading the database) holds a
snapshot in the WAL for --hold seconds while a delete's purge is due. meshd/store/purge.py used
to checkpoint on the trio thread with SQLite's busy timeout (5 s): the loop stalled until the
reader let go. This prints the longest gap a 5 ms ticker task on the trio thread saw, and when
the purge landed, for the code of each tree given (new and baseline alternating, same run).

Run: .venv/bin/python bench/purge_stall.py [--hold 0.5] [--rounds 3] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TICK_S = 0.005


def child(tree: Path, hold_s: float) -> dict[str, float]:
    sys.path.insert(0, str(tree))
    import trio

    import meshd
    from meshd.net.logsync import CommitSignal, LogService
    from meshd.protocol.crypto import SigningKeyPair
    from meshd.store.db import Store
    from meshd.store.purge import Purger
    assert Path(meshd.__file__).resolve().is_relative_to(tree.resolve()), meshd.__file__

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "meshd.db"
        store = Store(path)
        logs = LogService(store, SigningKeyPair(os.urandom(32)), lambda: int(time.time() * 1000))
        logs.write_many_nowait([("s", f"r{i}", os.urandom(2000)) for i in range(200)])
        store.purge()  # the WAL empty: the purge measured is the delete's
        reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM bodies").fetchone()  # a snapshot in the WAL
        out: dict[str, float] = {}

        async def main() -> None:
            await logs.delete("s", "r1")
            purger = Purger(store, CommitSignal(), debounce_s=0)
            started = time.perf_counter()
            released = threading.Timer(hold_s, lambda: reader.execute("COMMIT"))
            gap = 0.0
            released.start()
            async with trio.open_nursery() as nursery:
                last = time.perf_counter()
                nursery.start_soon(purger.run)  # its first try runs at the ticker's first sleep
                while purger.purges < 1:  # (a poll: the baseline has no event to wait on)
                    await trio.sleep(TICK_S)
                    now = time.perf_counter()
                    gap = max(gap, now - last - TICK_S)
                    last = now
                out["purged_s"] = time.perf_counter() - started
                nursery.cancel_scope.cancel()
            released.join()
            out["stall_ms"] = gap * 1000

        trio.run(main)
        reader.close()
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hold", type=float, default=0.5, help="seconds the reader holds the WAL")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.hold)))
        return
    trees = [("new", HERE.parent)] + ([("base", args.baseline_tree)] if args.baseline_tree else [])
    print(f"purge stall: a reader holds the WAL {args.hold} s while a delete's purge is due; "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'tree':6} {'loop stall ms':>14} {'purged after s':>15}")
    for _ in range(args.rounds):
        for name, tree in trees:
            result = subprocess.run([sys.executable, __file__, "--child", str(tree), "--hold",
                                     str(args.hold)], capture_output=True, text=True, check=True)
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{name:6} {figures['stall_ms']:14.1f} {figures['purged_s']:15.3f}  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
