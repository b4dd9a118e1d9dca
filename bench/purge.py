"""Benchmark: what purging on disk costs local writes, beside a baseline in the same run.

Every overwrite of a record purges the old body, so with meshd/store/purge.py running, a stream of
overwrites is followed by a TRUNCATE checkpoint at most once per PURGE_DEBOUNCE_S. This
measures acknowledged local writes per second (each commit synchronous=FULL, as the API's)
for a stream of overwrites of 100 records:

1. baseline: the store alone (SQLite's own PASSIVE checkpoints every 1000 pages);
2. with the Purger task running, as in the daemon;
3. deletes instead of overwrites, with the Purger (each one purges).

It also prints the checkpoints done and the largest WAL seen. Writes run in the trio thread
with a checkpoint between them (as API requests do), so the Purger interleaves as it would.

Run: .venv/bin/python bench/purge.py [--seconds S] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.net.logsync import LogService  # noqa: E402
from meshd.protocol.crypto import SigningKeyPair  # noqa: E402
from meshd.store.db import Store  # noqa: E402
from meshd.store.purge import Purger  # noqa: E402

RECORDS = 100
BODY = b"x" * 200


async def run_case(directory: Path, seconds: float, *, purger: bool, deletes: bool) -> dict:
    store = Store(directory / "meshd.db")
    logs = LogService(store, SigningKeyPair(os.urandom(32)), lambda: int(time.time() * 1000))
    for n in range(RECORDS):  # the records exist before the measurement
        await logs.write("s", f"r{n}", BODY)
    purge = Purger(store, logs.changed)
    wal = directory / "meshd.db-wal"
    largest_wal = 0
    writes = 0
    async with trio.open_nursery() as nursery:
        if purger:
            await nursery.start(purge.run)
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            record = f"r{writes % RECORDS}"
            if deletes and writes % 2:
                await logs.delete("s", record)
            else:
                await logs.write("s", record, BODY)
            writes += 1
            if writes % 100 == 0 and wal.exists():
                largest_wal = max(largest_wal, wal.stat().st_size)
        nursery.cancel_scope.cancel()
    store.close()
    return {"writes_per_s": writes / elapsed, "checkpoints": purge.purges,
            "largest_wal_kib": largest_wal // 1024}


CASES = (("baseline (no purger)", False, False), ("overwrites + purger", True, False),
         ("overwrites/deletes + purger", True, True))


async def main(seconds: float, rounds: int) -> None:
    # Rounds interleave the cases, and medians are reported: a shared machine's load moves
    # between cases run one after the other.
    samples: dict[str, list[dict]] = {name: [] for name, _, _ in CASES}
    for _ in range(rounds):
        for name, purger, deletes in CASES:
            with tempfile.TemporaryDirectory() as directory:
                samples[name].append(await run_case(Path(directory), seconds, purger=purger,
                                                    deletes=deletes))

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in samples[name])

    base = median(CASES[0][0], "writes_per_s")
    print(f"{rounds} rounds x {seconds:g} s per case; medians")
    print(f"{'case':30} {'writes/s':>9} {'ratio':>6} {'checkpoints':>11} {'max WAL KiB':>11}")
    for name, _, _ in CASES:
        rate = median(name, "writes_per_s")
        print(f"{name:30} {rate:9.0f} {rate / base:6.2f} {median(name, 'checkpoints'):11.0f} "
              f"{median(name, 'largest_wal_kib'):11.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per case and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trio.run(main, args.seconds, args.rounds)
