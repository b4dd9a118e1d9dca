"""CPU of the sender's read per live push (issue 20): batch_since of the entries just committed.

A soak's daemon commits its writes a few at a time and pushes each commit to each peer:
batch_since(own, what the peer has, the session's batch bytes) right after the commit. This
commits ROUNDS groups of PER_COMMIT entries (1,000-byte bodies, as bench/soak.py writes) to
a store prefilled with --fill entries, and after each commit reads the push for PEERS peers;
it prints the trio-thread CPU (time.thread_time) of the reads alone, per push.

With --baseline-tree DIR (e.g. /tmp/base-s10), the same is measured with DIR's code in a child
process, alternating new and baseline --repeat times: same-run pairs.

Run: PYTHONPATH=. .venv/bin/python bench/push_read.py [--baseline-tree /tmp/base-s10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = 3000
PER_COMMIT = 1
PEERS = 2
BATCH_BYTES = 256 * 1024


def measure(fill: int, rounds: int) -> dict[str, float]:
    from meshd.protocol.log import PUT, Write, compose_batch
    from meshd.store.db import Store
    from tests.protocol.test_log import WALL_MS, signer

    me = signer(1)
    author = bytes(me.public)
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory) / "m.db")
        n = 0

        def commit(count: int) -> None:
            nonlocal n
            seq, hash = store.tip(author)
            writes = [Write("s", f"r{n + i}", PUT, os.urandom(1000)) for i in range(count)]
            n += count
            store.commit_batch(compose_batch(me, seq, hash, 0, WALL_MS + n, writes), durable=False)

        while n < fill:
            commit(min(2000, fill - n))
        spent = 0.0
        for _ in range(rounds):
            have = store.tip(author)[0]
            commit(PER_COMMIT)
            start = time.thread_time()
            for _peer in range(PEERS):
                message = store.batch_since(author, have, BATCH_BYTES)
                assert message is not None and len(message["headers"]) == PER_COMMIT
            spent += time.thread_time() - start
        store.close()
    return {"us_per_push": spent / (rounds * PEERS) * 1e6}


def child(tree: Path, fill: int, rounds: int) -> dict[str, float]:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import push_read; print(json.dumps(push_read.measure({fill}, {rounds})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, check=True, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(tree)}).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fill", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path)
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    load = os.getloadavg()[0]
    print(f"batch_since per live push: {PER_COMMIT} entry per commit, {PEERS} peers, "
          f"{args.fill:,} entries before, {args.rounds:,} commits; load {load:.1f}")
    for i in range(args.repeat):
        new = child(here, args.fill, args.rounds)["us_per_push"]
        line = f"  run {i + 1}: this tree {new:6.1f} us CPU per push"
        if args.baseline_tree:
            base = child(args.baseline_tree, args.fill, args.rounds)["us_per_push"]
            line += f", baseline {base:6.1f} us (ratio {new / base:.2f})"
        print(line, flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
