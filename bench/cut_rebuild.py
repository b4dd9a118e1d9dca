"""What dropping a removed member's entries costs (Store.cut_author, protocol/logs.md "A removed
member's entries"): the store holds --entries entries of the owner across --streams streams,
then a thief's --thief entries (puts, deletes and a clear) spread over --touched of them. The
cut deletes the thief's entries and rebuilds the view of the touched streams.

Same-run baseline: committing the thief's entries in the first place (one received batch,
what any sync does). Prints both times and their ratio, per round on fresh copies.

Run: .venv/bin/python bench/cut_rebuild.py [--entries N] [--streams S] [--touched T] [--thief K]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.protocol.crypto import SigningKeyPair  # noqa: E402
from meshd.protocol.entry import ZERO_HASH  # noqa: E402
from meshd.protocol.log import CLEAR, DELETE, PUT, Batch, Write, compose_batch, verify_batch  # noqa: E402
from meshd.store.db import Store  # noqa: E402

WALL_MS = 1_700_000_000_000


def fill(path: Path, entries: int, streams: int) -> None:
    owner = SigningKeyPair(bytes([1]) * 32)
    store = Store(path)
    seq, tip, hlc = 0, ZERO_HASH, 0
    for start in range(0, entries, 20_000):
        writes = [Write(f"s{i % streams}", f"r{i}", PUT, b"x" * 100)
                  for i in range(start, min(entries, start + 20_000))]
        batch = compose_batch(owner, seq, tip, hlc, WALL_MS, writes)
        store.commit_batch(batch, durable=False)
        seq, tip, hlc = batch.last_seq, batch.last_hash, batch.max_hlc
    store.close()


def thief_batches(thief: SigningKeyPair, count: int, touched: int) -> tuple[Batch, Batch]:
    """(one entry that counts, then count entries past the cutoff), as wire batches."""
    good = compose_batch(thief, 0, ZERO_HASH, 0, WALL_MS, [Write("s0", "t", PUT, b"ok")])
    writes = []
    for i in range(count):
        stream = f"s{i % touched}"
        kind = i % 3
        writes.append(Write(stream, "", CLEAR) if kind == 0 and i < touched else
                      Write(stream, f"r{i * 7}", DELETE) if kind == 1 else
                      Write(stream, f"spam{i}", PUT, b"spam"))
    bad = compose_batch(thief, 1, good.last_hash, good.max_hlc, WALL_MS + 3_600_000, writes)
    return (Batch(good.author, good.headers, good.bodies, good.heads[-1]),
            Batch(bad.author, bad.headers, bad.bodies, bad.heads[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--touched", type=int, default=5)
    parser.add_argument("--thief", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    thief = SigningKeyPair(bytes([9]) * 32)
    good, bad = thief_batches(thief, args.thief, args.touched)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.db"
        fill(base, args.entries, args.streams)
        commits, cuts = [], []
        for round_ in range(args.rounds):
            path = Path(tmp) / f"r{round_}.db"
            shutil.copy(base, path)
            store = Store(path)
            store.commit_batch(verify_batch(good, 0, ZERO_HASH, lambda _a: True), durable=True)
            verified = verify_batch(bad, 1, good.head.hash, lambda _a: True)
            started = time.perf_counter()
            store.commit_batch(verified, durable=True)
            commits.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert store.cut_author(bytes(thief.public), good.head)
            cuts.append(time.perf_counter() - started)
            assert store.tip(bytes(thief.public))[0] == 1
            store.close()
    commit, cut = statistics.median(commits), statistics.median(cuts)
    print(f"store: {args.entries} entries in {args.streams} streams; thief: {args.thief} entries "
          f"past its cutoff in {args.touched} streams; {args.rounds} rounds (median)")
    print(f"baseline, committing the thief's batch: {commit * 1000:.1f} ms")
    print(f"cut_author (drop + rebuild {args.touched} views): {cut * 1000:.1f} ms "
          f"({cut / commit:.1f}x the commit)")


if __name__ == "__main__":
    main()
