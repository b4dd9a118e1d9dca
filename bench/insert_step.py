"""The store's insert step alone: rows/s of executemany against the set-based inserts
(meshd/store/bulk.py), alternating in one run, at 1,000 and 10,000 rows per commit.

A row is one entry: its header (~150 B) into entries and its 200 B body into bodies, the
two inserts Store.commit_batch makes per entry (the view's statements are left out: they
are the same in both). Each commit is one transaction (synchronous=NORMAL, as a received
batch). Measured with no other thread, and with another Python thread busy (as the receive pipeline's
verifier is during a catch-up: executemany's per-row GIL release and retake then waits on
it). Best of --rounds, alternating the two ways each round.

Run: .venv/bin/python bench/insert_step.py [--rows N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.store.bulk import insert_rows  # noqa: E402
from meshd.store.db import Store  # noqa: E402
from meshd.store.schema import STREAM_DIGITS  # noqa: E402

Inserter = Callable[[sqlite3.Connection, int, Sequence[bytes], Sequence[bytes | None], bytes, bytes],
                    None]


def executemany_rows(db: sqlite3.Connection, first: int, headers: Sequence[bytes],
                     bodies: Sequence[bytes | None], stream_digits: bytes, ops: bytes) -> None:
    """The inserts as commit_batch made them before bulk.py (all puts: rows zipped in C)."""
    count = len(headers)
    stream_ids = [int(stream_digits[i:i + STREAM_DIGITS])
                  for i in range(0, len(stream_digits), STREAM_DIGITS)]
    db.executemany("INSERT INTO bodies(id, body) VALUES (?, ?)",
                   zip(range(first, first + count), bodies, strict=True))
    db.executemany("INSERT INTO entries(id, header, stream_id, op) VALUES (?, ?, ?, ?)",
                   zip(range(first, first + count), headers, stream_ids, ops, strict=True))


def run(insert: Inserter, per_commit: int, total: int, busy: bool) -> float:
    """Rows/s of total rows in commits of per_commit, into a fresh store."""
    commits = max(1, total // per_commit)
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory) / "m.db")
        db = store._db
        headers = [os.urandom(150) for _ in range(per_commit)]
        bodies: list[bytes | None] = [os.urandom(200) for _ in range(per_commit)]
        digits = b"%019d" % 1 * per_commit
        ops = bytes(per_commit)
        stop = threading.Event()

        def burn() -> None:
            x = 0
            while not stop.is_set():
                for i in range(2000):
                    x += i * i

        thread = threading.Thread(target=burn) if busy else None
        if thread:
            thread.start()
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            first = 1
            started = time.perf_counter()
            for _ in range(commits):
                db.execute("BEGIN IMMEDIATE")
                insert(db, first, headers, bodies, digits, ops)
                db.execute("COMMIT")
                first += per_commit
            elapsed = time.perf_counter() - started
        finally:
            stop.set()
            if thread:
                thread.join()
            store.close()
    return commits * per_commit / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    for busy in (False, True):
        for per_commit in (1_000, 10_000):
            best = {"executemany": 0.0, "set-based": 0.0}
            for _ in range(args.rounds):
                for name, insert in (("executemany", executemany_rows), ("set-based", insert_rows)):
                    best[name] = max(best[name], run(insert, per_commit, args.rows, busy))
            label = "another thread busy" if busy else "no other thread"
            print(f"{label:>20}, {per_commit:>6,} rows/commit: executemany {best['executemany']:>9,.0f} "
                  f"rows/s, set-based {best['set-based']:>9,.0f} rows/s, "
                  f"ratio {best['set-based'] / best['executemany']:.2f}x")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
