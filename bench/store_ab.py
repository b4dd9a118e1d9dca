"""Per-entry cost of the store and of verify_batch, in process, for alternating two trees.

Run it once per tree, alternating (the machine may be shared; compare best-of figures of
the same session):

    (cd TREE && PYTHONPATH=. .venv/bin/python bench/store_ab.py ingest)      # the catch-up
    (cd TREE && PYTHONPATH=. .venv/bin/python bench/store_ab.py local)       # API batch commits
    (cd TREE && PYTHONPATH=. .venv/bin/python bench/store_ab.py verify)      # verify_batch alone
    (cd TREE && PYTHONPATH=. .venv/bin/python bench/store_ab.py checkpoint)  # COMMIT with the
                                                   # checkpoint inline and in its thread

- ingest: N entries of 200 B composed on A, cut into the sync's batches (batch_since, 256 KiB),
  ingested three times into fresh stores (verify + commit, as the receiver's worker thread
  does); wall and CPU seconds each, and the database's bytes per entry.
- local: N puts committed durably in batches of 4,000 (what one ~1 MiB POST /v1/batch commits);
  CPU microseconds per entry inside commit_batch.
- verify: verify_batch of one 763-entry batch, best of 40, CPU microseconds per entry.
- checkpoint (a tree with meshd/store/checkpoint.py only): the ingest with SQLite's automatic
  checkpoint inside COMMIT (wal_autocheckpoint=1000, as main ships) and with the checkpointer
  thread (as this tree ships), alternating, with COMMIT's own time per entry.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The tree measured is the current directory (run from its root), not this file's tree:
# one copy of this script measures both trees of an alternation.
sys.path.insert(0, os.getcwd())

from meshd.net.logsync import LogService, checked_write  # noqa: E402
from meshd.protocol.crypto import SigningKeyPair  # noqa: E402
from meshd.protocol.log import (  # noqa: E402
    PUT,
    ZERO_HASH,
    Batch,
    Write,
    batch_message,
    compose_batch,
    verify_batch,
)
from meshd.store.db import Store  # noqa: E402

BODY_BYTES = 200


def wall_ms() -> int:
    return int(time.time() * 1000)


def batches(sender: LogService, budget: int) -> list[dict[str, Any]]:
    """The sync's batches of sender's log (as bench/catchup_profile.py cuts them)."""
    out: list[dict[str, Any]] = []
    seq = 0
    while (message := sender.batch_since(sender.author, seq, budget)) is not None:
        out.append(message)
        seq = message["head"]["seq"]
    return out


class TimedConnection:
    """A sqlite3 connection whose execute and executemany add up their time per statement."""

    def __init__(self, db: Any, times: collections.Counter[str]) -> None:
        self._db, self._times = db, times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def execute(self, sql: str, *args: Any) -> Any:
        return self._timed(self._db.execute, sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        return self._timed(self._db.executemany, sql, *args)

    def _timed(self, call: Any, sql: str, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(sql, *args)
        finally:
            self._times[" ".join(sql.split())[:60]] += time.perf_counter() - started


def sync_batches(directory: Path, n: int) -> list[dict[str, Any]]:
    sender = LogService(Store(directory / "a.db"), SigningKeyPair(os.urandom(32)), wall_ms)
    sender.write_many_nowait(("history", None, os.urandom(BODY_BYTES)) for _ in range(n))
    return batches(sender, 256 * 1024)


def ingest(directory: Path, n: int) -> None:
    messages = sync_batches(directory, n)
    runs: list[str] = []
    for rep in range(3):
        receiver = LogService(Store(directory / f"r{rep}.db"), SigningKeyPair(os.urandom(32)), wall_ms)
        cpu, wall = time.process_time(), time.perf_counter()
        for message in messages:
            receiver.ingest(message, lambda _author: True)
        runs.append(f"{time.perf_counter() - wall:.2f} s / CPU {time.process_time() - cpu:.2f} s")
    store = Store(directory / "r0.db")
    size = store.page_count() * int(store._db.execute("PRAGMA page_size").fetchone()[0]) / n
    print(f"ingest of {n:,}: " + ", ".join(runs) + f"; database {size:.0f} B per entry")


def local(directory: Path, n: int, chunk: int = 4000) -> None:
    store = Store(directory / "local.db")
    service = LogService(store, SigningKeyPair(os.urandom(32)), lambda: int(time.time() * 1000))
    spent = 0.0
    for start in range(0, n, chunk):
        writes = [checked_write(PUT, "batch", None, (f"{j:08d}" + "x" * 192).encode())
                  for j in range(start, min(n, start + chunk))]
        batch = compose_batch(service._signer, *store.tip(service.author), service._hlc,
                              service._wall_ms(), writes, checked=True)
        cpu = time.process_time()
        store.commit_batch(batch, durable=True)
        spent += time.process_time() - cpu
        service._hlc = batch.max_hlc
    print(f"local durable commits of {chunk:,}: CPU {spent / n * 1e6:.1f} us per entry")


def verify() -> None:
    key = SigningKeyPair(os.urandom(32))
    run = compose_batch(key, 0, ZERO_HASH, 0, 1_700_000_000_000,
                        [Write("history", "", PUT, os.urandom(BODY_BYTES)) for _ in range(763)],
                        head_every_bytes=1 << 30, checked=True)
    batch = Batch.from_message(batch_message(bytes(key.public), run.headers, run.bodies,
                                             run.heads[-1]))
    best = min(_cpu(lambda: verify_batch(batch, 0, ZERO_HASH, lambda _a: True)) for _ in range(40))
    print(f"verify_batch: CPU {best / 763 * 1e6:.2f} us per entry (best of 40, 763 entries)")


def checkpoint(directory: Path, n: int) -> None:
    """Run in a tree with meshd/store/checkpoint.py: 'inline' is SQLite's automatic checkpoint
    in COMMIT (wal_autocheckpoint=1000, the checkpointer never asked), 'thread' the store as
    shipped (the checkpointer thread; CPU counts both threads)."""
    messages = sync_batches(directory, n)
    for mode in ("inline", "thread", "inline", "thread"):
        path = directory / f"c{mode}-{time.perf_counter_ns()}.db"
        if mode == "inline":
            store = Store(path, wal_soft_bytes=1 << 40, wal_hard_bytes=1 << 40)
            store._db.execute("PRAGMA wal_autocheckpoint=1000")
        else:
            store = Store(path)
        times: collections.Counter[str] = collections.Counter()
        store._db = TimedConnection(store._db, times)  # type: ignore[assignment]
        receiver = LogService(store, SigningKeyPair(os.urandom(32)), wall_ms)
        cpu, wall = time.process_time(), time.perf_counter()
        for message in messages:
            receiver.ingest(message, lambda _author: True)
        print(f"checkpoint {mode}: {time.perf_counter() - wall:.2f} s, CPU "
              f"{time.process_time() - cpu:.2f} s, COMMIT {times['COMMIT'] / n * 1e6:.1f} us per "
              f"entry; WAL {os.stat(f'{path}-wal').st_size / 2**20:.1f} MiB at the end")
        store.close()


def _cpu(call: Any) -> float:
    start = time.process_time()
    call()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("ingest", "local", "verify", "checkpoint"))
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshd-store-ab-") as name:
        if args.what == "ingest":
            ingest(Path(name), args.entries)
        elif args.what == "local":
            local(Path(name), args.entries)
        elif args.what == "verify":
            verify()
        else:
            checkpoint(Path(name), args.entries)


if __name__ == "__main__":
    main()
