"""Where a POST /v1/batch request's time goes, stage by stage, in process (no HTTP).

The request is the usual import body: ~1 MiB of {"body": TEXT} lines of 200 B (4,766 lines,
as `meshctl import` / Client.import_lines sends it) for ?stream=. Per entry, best of
--rounds requests (the machine may be shared: best-of is the least disturbed figure):
  decode   the route's decoding of the body into records (batch.parse_puts where the tree
           has it, else parse_batch)
  writes   the checked writes the log takes (StreamService: one check per batch and a
           PutRun of the bodies where the tree has it, else a CheckedWrite per record where
           it has write_puts, else checked_write each)
  compose  compose_batch (headers, hashes, signed heads), in the group commit's thread
  commit   Store.commit_batch durable (executemany of entries and bodies, the view's
           set-based statement, COMMIT with its fsync): wall, and the thread's CPU
  answer   the per-record answers and the response's JSON (?results=errors: only failures)
The tree measured is the current directory (run it from each tree's root, alternating):

    (cd TREE && PYTHONPATH=. .venv/bin/python bench/batch_stages.py [--rounds 12] [--lines 4766])
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

from meshd.api import batch as api_batch  # noqa: E402
from meshd.net.logsync import LogService, checked_write  # noqa: E402
from meshd.protocol.crypto import SigningKeyPair  # noqa: E402
from meshd.protocol.log import OP_CODES, compose_batch  # noqa: E402

try:  # (this tree's name; a baseline tree may predate it)
    from meshd.protocol.log import compose_units
except ImportError:
    compose_units = None
from meshd.store.db import Store  # noqa: E402

LINES = 4766  # ~1 MiB of 220-byte lines
STAGES = ("decode", "writes", "compose", "commit", "commit_cpu", "answer")


def request_body(first: int, lines: int = LINES) -> bytes:
    return b"".join(json.dumps({"body": f"{first + i:08d}" + "x" * 192}).encode() + b"\n"
                    for i in range(lines))


def one_request(logs: LogService, payload: bytes) -> dict[str, float]:
    parse_puts = getattr(api_batch, "parse_puts", None)
    t0 = time.perf_counter()
    bodies = parse_puts(payload, "batch") if parse_puts else None
    records = None if bodies is not None else api_batch.parse_batch(payload, "batch")[0]
    t1 = time.perf_counter()
    if bodies is not None:
        from meshd import streamservice
        if hasattr(streamservice, "_put_writes"):  # a tree before PutRun: a Write per record
            writes = streamservice._put_writes("batch", bodies)
        else:
            from meshd.protocol.log import PutRun
            writes = PutRun("batch", bodies)
    else:
        assert records is not None
        writes = [checked_write(OP_CODES[op], stream, record_id, body)
                  for op, stream, record_id, body in records]
    t2 = time.perf_counter()
    with logs.store.write_lock:
        seq, tip_hash = logs.store.tip(logs.author)
        batch = compose_batch(logs._signer, seq, tip_hash, logs._hlc, int(time.time() * 1000),
                              writes, checked=True) if isinstance(writes, list) else \
            compose_units(logs._signer, seq, tip_hash, logs._hlc, int(time.time() * 1000),
                          [writes], checked=True)
        t3, c3 = time.perf_counter(), time.thread_time()
        logs.store.commit_batch(batch, durable=True)
        t4, c4 = time.perf_counter(), time.thread_time()
        logs._hlc = batch.max_hlc
    written = list(zip(batch.record_ids, range(batch.first_seq, batch.first_seq + len(writes)),
                       strict=True))
    if bodies is None:  # the general path answers each record with a dict
        answers = [{"id": record_id, "seq": seq} for record_id, seq in written]
        failed = [a for a in answers if "error" in a]
    else:
        failed = []
    json.dumps({"written": len(written), "failed": 0, "results": failed})
    t5 = time.perf_counter()
    return dict(zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, c4 - c3, t5 - t4), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--lines", type=int, default=LINES, help="lines per request")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory) / "meshd.db")
        logs = LogService(store, SigningKeyPair(os.urandom(32)), lambda: int(time.time() * 1000))
        best = dict.fromkeys(STAGES, float("inf"))
        for r in range(args.rounds + 1):
            stages = one_request(logs, request_body(r * args.lines, args.lines))
            if r:  # the first request warms the caches up
                best = {k: min(best[k], stages[k]) for k in STAGES}
        store.close()
    per = {k: v * 1e6 / args.lines for k, v in best.items()}
    total = sum(v for k, v in per.items() if k != "commit_cpu")
    print(f"{os.getcwd()}: per entry (best of {args.rounds} requests of {args.lines} lines): "
          + ", ".join(f"{k} {v:.2f} us" for k, v in per.items()) + f"; sum {total:.2f} us "
          f"(a serial bound of {1e6 / total:,.0f} entries/s before HTTP and the client)")


if __name__ == "__main__":
    main()
