"""The manifest walks of one one-entry upload, timed at a large backup (issue 20, item 2).

Each upload plans (next_build), folds the new segment in (Manifest.replaced), checks whether
anything changed, lists the blob ids kept and dropped, and looks for full segments to index;
with the authors' lag marks before. Until this change main ran all of it on the trio thread;
it now runs in a worker thread (meshd/backupstate.off_loop), so this is the stall each upload
no longer puts on the event loop. The manifest is synthetic: --authors authors, each with
--full full segments (indexed) and --loose one-entry segments (up to MAX_LOOSE_PER_AUTHOR,
what sparse writes leave). Prints milliseconds per upload (median of --runs).

    PYTHONPATH=. python bench/backup_planner.py --authors 3 --full 2000 --loose 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.protocol.backupplan import lagging, next_build  # noqa: E402
from meshd.protocol.backupset import INDEX_REFS, IndexRef, Manifest, SegmentRef  # noqa: E402


def manifest(authors: int, full: int, loose: int) -> tuple[Manifest, dict[bytes, int]]:
    segments: list[SegmentRef] = []
    indexes: list[IndexRef] = []
    members: list[frozenset[bytes]] = []
    vector: dict[bytes, int] = {}
    n = 0
    for a in range(authors):
        author = bytes([a]) * 32
        seq = 0
        run: list[SegmentRef] = []
        for _ in range(full):
            n += 1
            ref = SegmentRef(n.to_bytes(16, "big"), b"d" * 32, author, seq + 1, seq + 900, 1_000_000, 1, 900)
            seq += 900
            segments.append(ref)
            run.append(ref)
            if len(run) == INDEX_REFS:
                n += 1
                indexes.append(IndexRef(n.to_bytes(16, "big"), b"i" * 32, 7000, 1, len(run)))
                members.append(frozenset(r.id for r in run))
                run = []
        for _ in range(loose):
            n += 1
            segments.append(SegmentRef(n.to_bytes(16, "big"), b"d" * 32, author, seq + 1, seq + 1, 1300, 1, 1))
            seq += 1
        vector[author] = seq
    return Manifest((b"r" * 200,), tuple(segments), (), tuple(indexes), tuple(members)), vector


def one_upload(base: Manifest, vector: dict[bytes, int], own: bytes) -> None:
    """The walks main ran on the trio thread for an upload of one new entry of `own`."""
    for author in lagging(base, vector, 1):
        base.covered(author), sum(s.epoch != 1 for s in base.of(author))
    vector = {**vector, own: vector[own] + 1}
    build = next_build(base, vector, 1, {}, {own})
    assert build is not None
    ref = SegmentRef(b"\xff" * 16, b"d" * 32, own, build.after + 1, build.through, 1300, 1, 1)
    built = base.replaced(list(base.records), [ref], set(build.replaces))
    _ = built.segments == base.segments
    settled = built.replaced(list(built.records), [], set())
    settled.to_index()
    listed = settled.blob_ids()
    sorted((base.blob_ids() | {ref.id}) - listed)
    next_build(settled, vector, 1, {}, {own})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", type=int, default=3)
    parser.add_argument("--full", type=int, default=2000)
    parser.add_argument("--loose", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    base, vector = manifest(args.authors, args.full, args.loose)
    own = bytes([0]) * 32
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        one_upload(base, vector, own)
        times.append(time.perf_counter() - start)
    print(f"{len(base.segments)} segments ({args.authors} authors x {args.full} full + {args.loose} loose), "
          f"{len(base.indexes)} indexes: manifest walks per one-entry upload "
          f"{statistics.median(times) * 1000:.1f} ms (median of {args.runs}; min {min(times) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
