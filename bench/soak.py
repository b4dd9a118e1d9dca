"""Soak: the issue-20 scenario for SOAK_MINUTES (default 30), figures per minute and slopes.

A relay and three daemons (A, B writing; C offline part of the time; deletes; event
subscribers; /metrics scraped): tests/integration/soak.py runs it. Printed: per minute the
write latency p50/p99 and per process RSS, CPU, fds, database and WAL sizes; the slope of
each after warm-up (per hour); peak RSS; the correctness checks; and a one-week projection
at 1,000 and 100,000 entries per day from the measured per-entry costs (bench/projection.py
says how).

Run: SOAK_MINUTES=30 .venv/bin/python bench/soak.py [--rate 10]      (or: make soak)
Environment: SOAK_MINUTES, SOAK_RATE (writes/s per writer), SOAK_WARMUP_S.
--memtrace DIR: each meshd process writes a per-minute breakdown of its memory (pymalloc,
malloc arenas in use and free, SQLite) to DIR/<pid>.txt (bench/memtrace/sitecustomize.py);
MESHD_MEMTRACE_PYTHON=1 adds tracemalloc diffs by source line (slow: not for figures).
--profile DIR: each `meshd run` process profiles its trio thread with cProfile and writes
DIR/<pid>.prof at a graceful stop (bench/cpuprofile/sitecustomize.py; slow: not for figures);
bench/cpuprofile/report.py DIR prints it per device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from projection import print_projection  # noqa: E402  (bench/projection.py)

from tests.integration.soak import Report, Soak, SoakConfig  # noqa: E402


def config_from(args: argparse.Namespace) -> SoakConfig:
    minutes = args.minutes
    short = minutes < 15  # a short run scales the periods down so each still happens
    return SoakConfig(
        minutes=minutes, writes_per_s=args.rate,
        offline_period_s=60 if short else 180, offline_s=30 if short else 90,
        delete_every_s=60 if short else 300, deletes=40 if short else 100,
        resubscribe_s=30, scrape_s=15, sample_s=5,
        warmup_s=args.warmup if args.warmup is not None else min(300.0, minutes * 60 / 3),
        backup_window=args.backup_window)


def print_report(report: Report) -> None:
    names = sorted(report.samples)
    print("\nper minute (write latency over A and B; the highest 1-minute load average sampled; per process at"
          " the minute's last sample)")
    print(f"{'min':>4} {'writes':>6} {'p50 ms':>7} {'p99 ms':>7} {'load':>5}  " + "  ".join(
        f"{n + ' rss/cpu%/fds/db/wal':>30}" for n in names))
    for row in report.per_minute():
        cells = []
        for name in names:
            p = row.get(name)
            cells.append(f"{p['rss']:6.1f}/{p['cpu'] or 0:5.1f}/{p['fds']:3d}/{p['db']:6.2f}/{p['wal']:5.2f}"
                         if p else f"{'-':>30}")
        p50 = f"{row['p50_ms']:7.1f}" if row["p50_ms"] is not None else f"{'-':>7}"
        p99 = f"{row['p99_ms']:7.1f}" if row["p99_ms"] is not None else f"{'-':>7}"
        load = f"{row['load']:5.1f}" if row["load"] is not None else f"{'-':>5}"
        print(f"{row['minute']:>4} {row['writes']:>6} {p50} {p99} {load}  " + "  ".join(f"{c:>30}" for c in cells))
    print(f"\nslopes after {report.config.warmup_s:.0f} s warm-up, per hour")
    for name, slope in report.slopes().items():
        print(f"  {name:6} rss {slope['rss_mb']:+8.1f} MB  cpu {slope['cpu_pct']:+7.1f} %  fds {slope['fds']:+7.1f}"
              f"  db {slope['db_mb']:+8.1f} MB  wal {slope['wal_mb']:+8.1f} MB")
    print(f"  write p99 {report.p99_slope_ms_per_h():+.0f} ms per hour")
    print("peak RSS MB: " + ", ".join(f"{n} {v:.1f}" for n, v in sorted(report.peak_rss.items())))
    print("mean CPU % of a core after warm-up: " + ", ".join(
        f"{n} {report.cpu_percent(n, report.config.warmup_s):.1f}" for n in names))
    converged = f"{report.converged_s:.2f} s" if report.converged_s is not None else "NOT reached"
    print(f"\n{report.acknowledged} acknowledged writes, {report.deleted} deletes, {report.missing} missing, "
          f"{report.resurrected} resurrected, convergence {converged}, "
          f"{report.entries} log entries, {report.scrapes} scrapes ({report.scrape_failures} failed), "
          f"{report.events} events, {report.slow_stops} stops of C slower than 5 s (then killed)")
    uploaded = sum(sum(lives.values()) for lives in report.backup_bytes.values())
    if report.written_bytes:
        print(f"backup segment bytes uploaded (all devices, as last scraped) {uploaded / 1e6:.1f} MB for "
              f"{report.written_bytes / 1e6:.1f} MB of bodies written: ratio {uploaded / report.written_bytes:.2f}")
        everything = sum(sum(lives.values()) for lives in report.backup_all_bytes.values())
        print(f"backup bytes uploaded with the manifests (/v1/relays uploaded_bytes) {everything / 1e6:.1f} MB: "
              f"ratio {everything / report.written_bytes:.2f}")
    failures = {name: int(sum(lives.values())) for name, lives in report.backup_failures.items()}
    print(f"backup upload failures (as last scraped): {failures or 'none'}")
    ages = ", ".join(f"{name} {age:.1f} s" for name, age in sorted(report.backup_age_max.items()))
    print(f"backup age, the highest scraped (seconds since the backup was last confirmed current; "
          f"target <= 30 s): {ages or 'never scraped'}")
    print_projection(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "30")))
    parser.add_argument("--rate", type=float, default=float(os.environ.get("SOAK_RATE", "10")))
    parser.add_argument("--warmup", type=float, default=(float(os.environ["SOAK_WARMUP_S"])
                                                         if "SOAK_WARMUP_S" in os.environ else None))
    parser.add_argument("--backup-window", type=float, default=None,
                        help="the daemons' backup_window in seconds (default: meshd's own)")
    parser.add_argument("--memtrace", type=Path, help="folder for per-process memory breakdowns")
    parser.add_argument("--profile", type=Path, help="folder for per-process cProfile output")
    args = parser.parse_args()
    if args.memtrace and args.profile:
        parser.error("--memtrace and --profile each need their own sitecustomize: pick one")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        here = Path(__file__).resolve().parent
        os.environ["MESHD_PROFILE_DIR"] = str(args.profile.resolve())
        os.environ["PYTHONPATH"] = os.pathsep.join(  # the daemons inherit it
            p for p in (str(here / "cpuprofile"), str(here.parent), os.environ.get("PYTHONPATH")) if p)
    if args.memtrace:
        args.memtrace.mkdir(parents=True, exist_ok=True)
        here = Path(__file__).resolve().parent
        os.environ["MESHD_MEMTRACE_DIR"] = str(args.memtrace.resolve())
        os.environ.setdefault("MESHD_MEMTRACE_PYTHON", "0")
        os.environ["PYTHONPATH"] = os.pathsep.join(  # the daemons inherit it
            p for p in (str(here / "memtrace"), str(here.parent), os.environ.get("PYTHONPATH")) if p)
    config = config_from(args)
    print(f"soak: {config.minutes} min, {config.writes_per_s} writes/s on each of A and B, "
          f"C offline {config.offline_s:.0f} of every {config.offline_period_s:.0f} s, "
          f"{config.deletes} deletes every {config.delete_every_s:.0f} s, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="meshd-soak-") as root:
        report = trio.run(lambda: Soak(Path(root), config, progress=print).run())
    print_report(report)


if __name__ == "__main__":
    main()
