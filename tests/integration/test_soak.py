"""A short soak (about 3 minutes, `make soak` runs the long one): correctness, and no cost
that keeps growing with the log after warm-up.

The bounds are for a 2-minute window after warm-up on a shared, loaded machine, so they are
coarse: they catch a leak or a cost per change that grows with the log (the full-snapshot
backup raised write p99 by 1.8 s per hour and per-process CPU by 27 points in 30 minutes),
not the issue's fine targets, which bench/soak.py measures over 30 minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .soak import Soak, SoakConfig

CONFIG = SoakConfig(minutes=3.0, writes_per_s=5.0, offline_period_s=60.0, offline_s=30.0,
                    delete_every_s=60.0, deletes=40, resubscribe_s=30.0, scrape_s=15.0,
                    sample_s=5.0, warmup_s=60.0, converge_limit_s=60.0)
# Tightened from measured figures (bench/results/issue20-*.txt; 10 writes/s per writer on a
# 2-core machine at load average 16-25): daemon WAL at most 4.0 MB and relay WAL 1.5 MB; peak
# RSS 68 MB (A, 14 minutes) and 61.6 MB for C; mean CPU 3.9-5.4 % of a core; write p99 slope
# +114 ms per hour over 15 minutes. This very scenario (bench/soak.py --minutes 3 --rate 5
# --warmup 60): peak RSS 54 MB, CPU 5.1 %, WAL 4.0 MB, RSS slope +130 MB/h on A: over the test's
# two minutes it still includes SQLite's page cache filling (8 MiB per connection), so the RSS
# slope bound is not tightened (after warm-up in 30 minutes it is +10 MB/h).
MAX_RSS_MB_PER_H = 200.0
MAX_FD_SPREAD = 10
MAX_WAL_MB = 8.0  # was 20
MAX_PEAK_RSS_MB = 90.0  # was 120
MAX_P99_MS_PER_H = 30_000.0  # was 60,000: half a second more every minute
# CPU per 5 s sample is too noisy for a slope over two minutes: the mean is bounded instead.
MAX_MEAN_CPU_PCT = 25.0  # was 50
# Issue 20: a backup current within 30 s of a change at any log size. The backup window is
# 20 s, so a writer's backup age (seconds since its backup was last confirmed current) stays
# under 30 s unless uploads fail or fall behind.
MAX_BACKUP_AGE_S = 30.0


@pytest.mark.slow
async def test_a_short_soak_stays_correct_and_flat(tmp_path: Path) -> None:
    report = await Soak(tmp_path, CONFIG).run()
    assert report.acknowledged > 0.5 * CONFIG.minutes * 60 * 2 * CONFIG.writes_per_s
    assert (report.missing, report.resurrected) == (0, 0)
    assert report.slow_stops == 0  # every SIGTERM of C ended the process within 5 s
    assert report.converged_s is not None
    assert report.scrapes > 0 and report.events > 0
    slopes = report.slopes()
    for name in ("A", "B", "relay"):  # C restarts: its life is too short for a slope
        assert slopes[name]["rss_mb"] <= MAX_RSS_MB_PER_H, (name, slopes[name])
        assert report.cpu_percent(name, CONFIG.warmup_s) <= MAX_MEAN_CPU_PCT, name
    for name in ("A", "B"):  # the writers: their backup changes all the time
        assert 0 < report.backup_age_max.get(name, 0) <= MAX_BACKUP_AGE_S, (name, report.backup_age_max)
    for name, samples in report.samples.items():
        late = [s for s in samples if s.t >= CONFIG.warmup_s]
        assert max(s.fds for s in late) - min(s.fds for s in late) <= MAX_FD_SPREAD, name
        assert max(s.wal for s in samples) <= MAX_WAL_MB, name
        assert report.peak_rss[name] <= MAX_PEAK_RSS_MB, name
    assert report.p99_slope_ms_per_h() <= MAX_P99_MS_PER_H
