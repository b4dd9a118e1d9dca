"""Where a catch-up's time goes: cProfile of the receiving side's verify+commit, in process.

A LogService holds N pre-generated entries (200-byte bodies); a second LogService, empty,
ingests them batch by batch as the sync sends them (batch_since with the sync's byte
budget), with the verification and the commit on the calling thread as the daemon's worker
thread does them. Prints the rate with and without the profiler, and the top functions by
own time and by cumulative time, then the time in each SQL statement of the commits
(a third ingest, with the store's connection wrapped in a timer).

bench/sync.py measures the same ingest over the secure channel between two processes; at
100,000 entries it reaches the in-process rate, so this profile is the catch-up's cost.

Run: .venv/bin/python bench/catchup_profile.py [--entries 100000] [--budget 262144]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.net.logsync import LogService  # noqa: E402
from meshd.protocol.crypto import SigningKeyPair  # noqa: E402
from meshd.store.db import Store  # noqa: E402

BODY_BYTES = 200


def wall_ms() -> int:
    return int(time.time() * 1000)


def batches(sender: LogService, budget: int) -> list[dict[str, Any]]:
    out = []
    seq = 0
    while True:
        message = sender.batch_since(sender.author, seq, budget)
        if message is None:
            return out
        out.append(message)
        seq = message["head"]["seq"]


def ingest_all(directory: Path, name: str, messages: list[dict[str, Any]]) -> float:
    receiver = LogService(Store(directory / name), SigningKeyPair(os.urandom(32)), wall_ms)
    start = time.perf_counter()
    for message in messages:
        receiver.ingest(message, lambda author: True)
    return time.perf_counter() - start


class TimedConnection:
    """A sqlite3 connection whose execute and executemany add their time per statement."""

    def __init__(self, db: Any, times: collections.Counter[str]) -> None:
        self._db, self._times = db, times

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def execute(self, sql: str, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._db.execute(sql, *args)
        finally:
            self._times[" ".join(sql.split())[:60]] += time.perf_counter() - started

    def executemany(self, sql: str, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._db.executemany(sql, *args)
        finally:
            self._times[" ".join(sql.split())[:60]] += time.perf_counter() - started


def statement_times(directory: Path, messages: list[dict[str, Any]]) -> tuple[float, collections.Counter[str]]:
    times: collections.Counter[str] = collections.Counter()
    store = Store(directory / "timed.db")
    store._db = TimedConnection(store._db, times)  # type: ignore[assignment]
    receiver = LogService(store, SigningKeyPair(os.urandom(32)), wall_ms)
    start = time.perf_counter()
    for message in messages:
        receiver.ingest(message, lambda author: True)
    return time.perf_counter() - start, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--budget", type=int, default=256 * 1024, help="bytes per batch_since")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshd-catchup-") as name:
        directory = Path(name)
        sender = LogService(Store(directory / "a.db"), SigningKeyPair(os.urandom(32)), wall_ms)
        sender.write_many_nowait(("history", None, os.urandom(BODY_BYTES)) for _ in range(args.entries))
        messages = batches(sender, args.budget)
        n = args.entries
        print(f"{n:,} entries in {len(messages)} batches of up to {args.budget:,} B "
              f"({n / len(messages):,.0f} entries per batch)")
        plain = ingest_all(directory, "plain.db", messages)
        print(f"ingest without the profiler: {plain:.2f} s ({n / plain:,.0f} entries/s)")
        profile = cProfile.Profile()
        profile.enable()
        profiled = ingest_all(directory, "profiled.db", messages)
        profile.disable()
        print(f"ingest under cProfile: {profiled:.2f} s ({n / profiled:,.0f} entries/s)")
        for key in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats(key).print_stats(args.top)
            print(f"\n---- by {key} ----")
            print(text.getvalue().split("\n\n", 1)[-1].rstrip())
        total, times = statement_times(directory, messages)
        print(f"\n---- SQL statements (ingest with timed statements: {total:.2f} s) ----")
        for statement, seconds in times.most_common():
            print(f"{seconds:7.3f} s {seconds / n * 1e6:6.1f} us/entry  {statement}")


if __name__ == "__main__":
    main()
