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
- backup upload per day: the segment bytes (the run's segment bytes per body byte, times
  the body bytes written) plus the manifest re-stored at each upload, whose size is the
  circle records plus one reference (REF_BYTES) per segment it lists itself: the loose
  ones (LOOSE_REFS, two writers), up to INDEX_REFS - 1 full ones no index lists yet (the
  worst case), and one per index of INDEX_REFS full segments of about 1 MiB of the log. Uploads per day
  are one per entry at 1,000 a day (entries minutes apart each start one) and one per
  debounce period plus the upload's time when entries come faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshd.protocol.backupset import INDEX_REFS, SEGMENT_TARGET_BYTES, SegmentRef
from meshd.protocol.envelope import _pack
from meshd.relay.links import BACKUP_DEBOUNCE_S

if TYPE_CHECKING:
    from tests.integration.soak import Report

DAY_S = 86_400
WEEK_DAYS = 7
# One packed segment reference in a manifest (id, digest, author, ranges, size, epoch, bodies).
REF_BYTES = len(_pack(SegmentRef(bytes(16), bytes(32), bytes(32), 2**31, 2**31 + 1000, 2**21, 1, 1000).pack()))
MANIFEST_FIXED_BYTES = 4096  # seal, signature, version, and the circle records (a few members)
UPLOAD_TIME_S = 0.5  # an upload's own time after the debounce, at the soak's sizes
LOOSE_REFS = 2 * 40  # segments below full size per writer, typically (at most 96)


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
    segments = sum(sum(lives.values()) for lives in report.backup_bytes.values())
    segment_ratio = segments / report.written_bytes if report.written_bytes else 0.0
    rows = []
    for per_day in per_days:
        week = WEEK_DAYS * per_day
        stored_mb = relay_per_entry * week
        full = stored_mb * 1e6 / SEGMENT_TARGET_BYTES
        refs = LOOSE_REFS + min(full, INDEX_REFS - 1) + full // INDEX_REFS
        manifest_mb = (MANIFEST_FIXED_BYTES + refs * REF_BYTES) / 1e6
        uploads = min(per_day, DAY_S / (BACKUP_DEBOUNCE_S + UPLOAD_TIME_S))
        written = body_per_entry * per_day
        rows.append(Row(
            per_day, max(s.rss for s in a), a[0].rss + rss_per_entry * week,
            db_per_entry * week + wal, stored_mb + relay_wal, cpu_per_entry * per_day / DAY_S,
            segment_ratio * written, manifest_mb * uploads, written))
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
