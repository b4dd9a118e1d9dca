"""One week of use at 1,000 and at 100,000 entries per day, from a soak's measured costs.

bench/soak.py prints this table after its run; `project(report)` is the model, written out
so each figure can be checked by hand. Per entry of the circle (A's figures, a device that
receives every entry: half its own, half B's; entries of 200-2,000 B as in the soak):

- CPU: A's mean CPU after warm-up divided by the run's entry rate gives CPU-seconds per
  entry; at N entries a day the daemon uses that times N / 86,400 (an idle daemon's own
  CPU, timers and scrapes, is not added: it was not measured apart here).
- disk: A's database growth after warm-up per entry, times 7 N, plus the largest WAL seen
  (the WAL is checkpointed and bounded, not per entry); the relay's the same way.
- memory: two figures. "bounded" is the peak RSS after warm-up: what grew with the log was
  SQLite's page cache (capped at 8 MiB per connection, two connections) and malloc's free
  pages (capped by meshd/memory.py), and an idle daemon with 1,000,000 entries measured
  38.5 MB against 38.4 MB empty (bench/results/issue20-idle-1M.txt). "linear" adds the
  RSS slope after warm-up per entry times 7 N: an upper bound that assumes the run's slope
  never flattens.
- backup upload per day, modelled per upload from the planner's rules (meshd/protocol/
  backupplan.py), not from a soak's ratio (a soak at 20 writes/s says nothing of 1 write a
  minute): an upload of e entries of b body bytes stores a new segment of
  SEGMENT_OVERHEAD + e (b + ENTRY_OVERHEAD) bytes; compaction then writes those entries once
  more into a full segment (`chained`, the code as it now is) or, for a segment below 16 KiB,
  twice (level 1, then full: the planner before format 4). The manifest stored with it is,
  chained (meshd/protocol/backupchain.py), a delta (DELTA_BYTES), the signed blob
  (SIGNED_BYTES), the dropped id of the merge to come (DROP_BYTES) and the base, re-stored
  once the deltas reach CHAIN_BASES times its size (so DELTA_BYTES / CHAIN_BASES per
  upload); inline (before), the whole manifest: the circle records and one reference
  (REF_BYTES) per segment it lists itself: the loose ones (LOOSE_REFS, two writers), up to
  INDEX_REFS - 1 full ones no index lists yet (the worst case), and one per index of
  INDEX_REFS full segments of about 1 MiB of the log. The byte constants were measured with
  the real sealing code (tests/shell/test_backup_chain.py's relay: entries of 1,000 body
  bytes, one per upload: a 1,455-byte segment, a 210-byte delta, a 226-byte signed blob; ten
  per upload: 11,805 bytes).
- manifests stored per day (uploads_per_day): an entry of the circle (either writer's) opens
  the batching window (meshd/protocol/backupwindow.py); the upload starts when the window
  ends: after `window` seconds, or once the writer's own entries reach WINDOW_BYTES, not
  before the settle time. A cycle is then the wait for the next entry (1 / circle rate),
  the gathering time and the upload's own time (UPLOAD_TIME_S); the size that goes early
  is WINDOW_BYTES or MANIFEST_SHARE times the manifest, if larger; each writer stores a
  manifest in a cycle only if it wrote in it: P = 1/writers (it opened the window) plus the
  chance it wrote during the gathering. `python bench/projection.py` prints the inline
  manifest and its planner against the chained one, from the 30-minute soak's per-entry
  figures, in this same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshd.protocol.backupplan import MAX_LOOSE_PER_AUTHOR
from meshd.protocol.backupset import (
    CHAIN_BASES,
    INDEX_REFS,
    LEVEL_BOUNDS,
    SEGMENT_TARGET_BYTES,
    SegmentRef,
)
from meshd.protocol.backupwindow import MANIFEST_SHARE, SETTLE_S, WINDOW_BYTES, WINDOW_S
from meshd.protocol.envelope import _pack

if TYPE_CHECKING:
    from tests.integration.soak import Report

DAY_S = 86_400
WEEK_DAYS = 7
# One packed segment reference in a manifest (id, digest, author, ranges, size, epoch, bodies).
REF_BYTES = len(_pack(SegmentRef(bytes(16), bytes(32), bytes(32), 2**31, 2**31 + 1000, 2**21, 1, 1000).pack()))
MANIFEST_FIXED_BYTES = 4096  # seal, signature, version, and the circle records (a few members)
UPLOAD_TIME_S = 0.5  # an upload's own time after the window, at the soak's sizes
# Measured with the real sealing code (module docstring): bytes of a segment beyond its entries'
# bodies, per entry and per segment; a chained manifest's delta and signed blob for an upload
# of one segment; an id dropped by the delta of a merge.
ENTRY_OVERHEAD = 150
SEGMENT_OVERHEAD = 305
DELTA_BYTES = 210
SIGNED_BYTES = 226
DROP_BYTES = 17
LOOSE_REFS = 2 * 40  # segments below full size per writer, typically (at most 96)
WRITERS = 2
# The 30-minute soak at 20 writes/s per writer (bench/results/issue20-soak-30min-2026-12-02.txt,
# its projection rows): the relay's database growth per entry (MB; the rows' difference, so
# its WAL cancels out), body bytes per entry (MB).
SOAK_30MIN = {"relay_per_entry": (821.8 - 13.1) / (700_000 - 7_000), "body_per_entry": 109.64 / 100_000}


def uploads_per_day(per_day: float, body_bytes: float, window_s: float = WINDOW_S,
                    settle_s: float = SETTLE_S, writers: int = WRITERS, manifest_bytes: float = 0) -> float:
    """Manifests the writers store per day under the batching window (the module's model)."""
    circle = per_day / DAY_S  # entries per second, all writers
    own = circle / writers
    settle = min(settle_s, window_s)
    size = max(WINDOW_BYTES, MANIFEST_SHARE * manifest_bytes)
    gather = min(window_s, max(settle, size / (own * body_bytes)))
    cycles = DAY_S / (1 / circle + gather + UPLOAD_TIME_S)
    wrote = 1 / writers + (1 - 1 / writers) * (1 - math.exp(-own * gather))
    return writers * cycles * wrote


def backup_mb_day(per_day: int, relay_per_entry: float, body_per_entry: float,
                  window_s: float = WINDOW_S, chained: bool = True) -> tuple[float, float, float]:
    """(written, segments, manifests) MB per day on the 7th day; chained: the code as it now
    is (format 4 and compaction straight to full), else the inline manifest and its planner."""
    written = body_per_entry * per_day
    inline = manifest_mb(per_day, relay_per_entry)
    per_upload = DELTA_BYTES * (1 + 1 / CHAIN_BASES) + SIGNED_BYTES + DROP_BYTES if chained else inline * 1e6
    uploads = uploads_per_day(per_day, body_per_entry * 1e6, window_s, manifest_bytes=per_upload)
    entries = per_day / uploads  # per upload
    entry = body_per_entry * 1e6 + ENTRY_OVERHEAD
    new = SEGMENT_OVERHEAD + entries * entry
    if chained:  # merged straight into a full segment, unless MAX_LOOSE_PER_AUTHOR stay below 1 MiB
        rewrites = 1 if new * MAX_LOOSE_PER_AUTHOR >= SEGMENT_TARGET_BYTES else 2
    else:  # a segment below 16 KiB went to level 1 first
        rewrites = 2 if new < LEVEL_BOUNDS[0] else 1
    segments = uploads * (new + rewrites * entries * entry) / 1e6
    return written, segments, per_upload * uploads / 1e6


def manifest_mb(per_day: int, relay_per_entry: float) -> float:
    """The manifest's size on the 7th day (MB)."""
    stored_mb = relay_per_entry * WEEK_DAYS * per_day
    full = stored_mb * 1e6 / SEGMENT_TARGET_BYTES
    refs = LOOSE_REFS + min(full, INDEX_REFS - 1) + full // INDEX_REFS
    return (MANIFEST_FIXED_BYTES + refs * REF_BYTES) / 1e6


@dataclass(frozen=True)
class Row:
    per_day: int
    rss_bounded_mb: float
    rss_linear_mb: float
    disk_mb: float
    relay_disk_mb: float
    cpu_pct: float
    segments_mb_day: float
    manifest_mb_day: float
    written_mb_day: float


def project(report: Report, per_days: tuple[int, ...] = (1_000, 100_000)) -> list[Row]:
    window_s = report.config.backup_window if report.config.backup_window is not None else WINDOW_S
    a = [s for s in report.samples.get("A", []) if s.t >= report.config.warmup_s]
    relay = [s for s in report.samples.get("relay", []) if s.t >= report.config.warmup_s]
    if len(a) < 3 or len(relay) < 3 or not report.entries or not report.duration_s:
        return []
    rate = report.entries / report.duration_s  # entries per second in the circle
    per_hour = rate * 3600
    slopes = report.slopes()
    db_per_entry = max(0.0, slopes["A"]["db_mb"]) / per_hour
    relay_per_entry = max(0.0, slopes["relay"]["db_mb"]) / per_hour
    rss_per_entry = max(0.0, slopes["A"]["rss_mb"]) / per_hour
    cpu_per_entry = report.cpu_percent("A", report.config.warmup_s) / rate  # %-seconds
    wal = max(s.wal for s in report.samples["A"])
    relay_wal = max(s.wal for s in report.samples["relay"])
    body_per_entry = report.written_bytes / max(1, report.acknowledged) / 1e6  # MB
    rows = []
    for per_day in per_days:
        week = WEEK_DAYS * per_day
        written, segments_mb, manifests_mb = backup_mb_day(per_day, relay_per_entry, body_per_entry, window_s)
        rows.append(Row(
            per_day, max(s.rss for s in a), a[0].rss + rss_per_entry * week,
            db_per_entry * week + wal, relay_per_entry * week + relay_wal, cpu_per_entry * per_day / DAY_S,
            segments_mb, manifests_mb, written))
    return rows


def print_projection(report: Report) -> None:
    rows = project(report)
    if not rows:
        return
    print("\none-week projection (bench/projection.py: per-entry costs of this run, A's figures; memory"
          "\n bounded = peak RSS after warm-up, linear = plus the RSS slope per entry; backup MB per day on the"
          "\n 7th day: segments, and the manifest stored at each upload: loose and unindexed full segments, and indexes)")
    print(f"{'entries/day':>12} {'RSS MB':>14} {'db+wal MB':>10} {'relay MB':>9} {'CPU % core':>10}"
          f" {'written MB/d':>12} {'segm MB/d':>10} {'manif MB/d':>10} {'ratio':>6}")
    for r in rows:
        ratio = (r.segments_mb_day + r.manifest_mb_day) / r.written_mb_day if r.written_mb_day else 0.0
        print(f"{r.per_day:>12,} {r.rss_bounded_mb:6.1f}/{r.rss_linear_mb:7.1f} {r.disk_mb:10.1f}"
              f" {r.relay_disk_mb:9.1f} {r.cpu_pct:10.3f} {r.written_mb_day:12.2f} {r.segments_mb_day:10.2f}"
              f" {r.manifest_mb_day:10.2f} {ratio:6.2f}")


def compare(window_s: float = WINDOW_S) -> None:
    """The backup columns from the 30-minute soak's per-entry figures: the inline manifest and
    its planner (main before format 4) against the chained manifest, in the same model."""
    print("backup MB/day on the 7th day, from the 30-minute soak's per-entry figures (bench/projection.py)")
    print(f"{'entries/day':>12} {'manifest':>9} {'uploads/d':>10} {'written':>9} {'segments':>9}"
          f" {'manifests':>10} {'ratio':>6}")
    for per_day in (1_000, 10_000, 100_000, 1_000_000):
        for chained in (False, True):
            written, segments, manifests = backup_mb_day(
                per_day, SOAK_30MIN["relay_per_entry"], SOAK_30MIN["body_per_entry"], window_s, chained)
            per_upload = (DELTA_BYTES * (1 + 1 / CHAIN_BASES) + SIGNED_BYTES + DROP_BYTES) / 1e6 if chained \
                else manifest_mb(per_day, SOAK_30MIN["relay_per_entry"])
            print(f"{per_day:>12,} {'chained' if chained else 'inline':>9} {manifests / per_upload:10,.0f}"
                  f" {written:9.2f} {segments:9.2f} {manifests:10.2f} {(segments + manifests) / written:6.2f}")


if __name__ == "__main__":
    compare()
