"""The soak scenario: weeks of use compressed into minutes, measured per process.

A relay and devices A, B, C in one circle (real processes on loopback). A and B each write
`writes_per_s` entries of 200-2,000 bytes spread over four streams; C is offline for
`offline_s` of every `offline_period_s`; `deletes` of A's and B's records are deleted every
`delete_every_s`; one event subscriber stays connected to A, another reconnects to B every
`resubscribe_s`; /metrics is scraped from every running daemon every `scrape_s`.

Every `sample_s` each process's RSS, CPU time, open fds and database and WAL sizes are
sampled from /proc and the disk; every write's latency is timed at the client. The report
has per-minute figures, least-squares slopes after warm-up, and the correctness checks
(every acknowledged write present on every device, no deleted record back, convergence
time). bench/soak.py prints it (`make soak`); tests/integration/test_soak.py runs a short one.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio

from .daemons import DaemonProcess, RelayProcess, form_circle

MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class SoakConfig:
    minutes: float = 30.0
    writes_per_s: float = 10.0  # per writer
    streams: int = 4
    body_bytes: tuple[int, int] = (200, 2000)
    offline_period_s: float = 180.0
    offline_s: float = 90.0
    delete_every_s: float = 300.0
    deletes: int = 100
    resubscribe_s: float = 30.0
    scrape_s: float = 15.0
    sample_s: float = 5.0
    warmup_s: float = 300.0
    converge_limit_s: float = 120.0
    backup_window: float | None = None  # seconds; None: meshd's default, as a user runs it


@dataclass
class Sample:
    t: float
    rss: float  # MB
    cpu: float  # seconds (user + system) since the process started
    fds: int
    db: float  # MB
    wal: float  # MB


@dataclass
class Report:
    config: SoakConfig
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    peak_rss: dict[str, float] = field(default_factory=dict)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds)
    acknowledged: int = 0
    deleted: int = 0
    missing: int = 0
    resurrected: int = 0
    converged_s: float | None = None
    scrapes: int = 0
    written_bytes: int = 0  # bodies acknowledged
    backup_bytes: dict[str, dict[int, float]] = field(default_factory=dict)  # daemon -> pid -> bytes
    # daemon -> pid -> segment and manifest bytes (/v1/relays uploaded_bytes; the metric is segments)
    backup_all_bytes: dict[str, dict[int, float]] = field(default_factory=dict)
    backup_failures: dict[str, dict[int, float]] = field(default_factory=dict)  # daemon -> pid -> count
    # daemon -> the highest meshd_backup_age_seconds scraped (while writing: how stale the backup got)
    backup_age_max: dict[str, float] = field(default_factory=dict)
    scrape_failures: int = 0
    loads: list[tuple[float, float]] = field(default_factory=list)  # (t, 1-minute load average)
    events: int = 0
    entries: int = 0  # entries in the log at the end (writes and deletes)
    slow_stops: int = 0  # C did not exit within 5 s of SIGTERM (then killed; the run goes on)
    duration_s: float = 0.0

    def slopes(self) -> dict[str, dict[str, float]]:
        """Per process, per hour after warm-up: RSS MB, CPU % of a core, fds, db MB, WAL MB."""
        out: dict[str, dict[str, float]] = {}
        start = self.config.warmup_s
        for name, samples in self.samples.items():
            late = [s for s in samples if s.t >= start]
            if len(late) < 3:
                continue
            ts = [s.t / 3600 for s in late]
            out[name] = {
                "rss_mb": _slope(ts, [s.rss for s in late]),
                "fds": _slope(ts, [s.fds for s in late]),
                "db_mb": _slope(ts, [s.db for s in late]),
                "wal_mb": _slope(ts, [s.wal for s in late]),
                "cpu_pct": _slope(ts[1:], _cpu_percent(late)),
            }
        return out

    def cpu_percent(self, name: str, since: float = 0.0) -> float:
        """Mean CPU % of a core over the samples from `since` (restarts: per life, summed)."""
        late = [s for s in self.samples.get(name, []) if s.t >= since]
        used = wall = 0.0
        for a, b in zip(late, late[1:], strict=False):
            if b.cpu >= a.cpu:  # not across a restart
                used += b.cpu - a.cpu
                wall += b.t - a.t
        return 100 * used / wall if wall else 0.0

    def p99_slope_ms_per_h(self) -> float:
        """Slope of the write p99 over `scrape_s` windows after warm-up."""
        window = self.config.scrape_s
        buckets: dict[int, list[float]] = {}
        for t, latency in self.latencies:
            if t >= self.config.warmup_s:
                buckets.setdefault(int(t // window), []).append(latency)
        points = [(k * window / 3600, _quantile(v, 0.99) * 1000) for k, v in sorted(buckets.items()) if len(v) >= 5]
        return _slope([p[0] for p in points], [p[1] for p in points]) if len(points) >= 3 else 0.0

    def per_minute(self) -> list[dict[str, Any]]:
        rows = []
        for minute in range(int(self.duration_s // 60) + 1):
            lat = [x for t, x in self.latencies if minute * 60 <= t < (minute + 1) * 60]
            loads = [x for t, x in self.loads if minute * 60 <= t < (minute + 1) * 60]
            row: dict[str, Any] = {"minute": minute + 1, "writes": len(lat),
                                   "p50_ms": _quantile(lat, 0.5) * 1000 if lat else None,
                                   "p99_ms": _quantile(lat, 0.99) * 1000 if lat else None,
                                   "load": max(loads) if loads else None}
            for name, samples in self.samples.items():
                inside = [s for s in samples if minute * 60 <= s.t < (minute + 1) * 60]
                if inside:
                    last = inside[-1]
                    row[name] = {"rss": last.rss, "fds": last.fds, "db": last.db, "wal": last.wal,
                                 "cpu": _cpu_between(inside)}
            rows.append(row)
        return rows


def _cpu_percent(samples: list[Sample]) -> list[float]:
    return [100 * (b.cpu - a.cpu) / (b.t - a.t) if b.cpu >= a.cpu and b.t > a.t else 0.0
            for a, b in zip(samples, samples[1:], strict=False)]


def _cpu_between(samples: list[Sample]) -> float | None:
    values = _cpu_percent(samples)
    return statistics.fmean(values) if values else None


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2 or len(xs) != len(ys):
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sample_process(pid: int, state_dir: Path, t: float) -> Sample | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE / MB
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICKS
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    db = wal = 0.0
    for path in state_dir.rglob("*"):
        try:
            size = path.stat().st_size / MB
        except FileNotFoundError:
            continue
        if path.name.endswith("-wal"):
            wal += size
        elif path.name.endswith((".sqlite3", ".db", ".sqlite")):
            db += size
    return Sample(t, rss, cpu, fds, db, wal)


class Soak:
    def __init__(self, root: Path, config: SoakConfig, *, progress: Callable[[str], None] = lambda _: None) -> None:
        self.root = root
        self.config = config
        self.progress = progress
        self.report = Report(config)
        self.rng = random.Random(20)
        self.start = 0.0
        self.written: dict[str, set[tuple[str, str]]] = {}
        self.deleted: set[tuple[str, str]] = set()
        self.offline: set[str] = set()  # daemons stopped or being stopped: not scraped

    def now(self) -> float:
        return time.monotonic() - self.start

    async def run(self) -> Report:
        config = self.config
        relay = RelayProcess(self.root)
        address = await relay.start()
        daemons = [DaemonProcess(self.root, name, relays=[address], backup_window=config.backup_window)
                   for name in ("A", "B", "C")]
        try:
            await form_circle(daemons)
            a, b, c = daemons
            self.start = time.monotonic()
            end = config.minutes * 60
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sampler, daemons, relay, end)
                for writer in (a, b):
                    nursery.start_soon(self._writer, writer, end)
                    nursery.start_soon(self._deleter, writer, end)
                nursery.start_soon(self._offline_cycle, c, end)
                nursery.start_soon(self._subscriber, a, end, None)
                nursery.start_soon(self._subscriber, b, end, config.resubscribe_s)
                nursery.start_soon(self._scraper, daemons, end)
            self.report.duration_s = self.now()
            await self._check(daemons)
        finally:
            for process in (*daemons, relay):
                process.kill()
        return self.report

    async def _sampler(self, daemons: list[DaemonProcess], relay: RelayProcess, end: float) -> None:
        while self.now() < end:
            t = self.now()
            self.report.loads.append((t, os.getloadavg()[0]))
            for name, process, state in [*((d.name, d.process, d.state_dir) for d in daemons),
                                         ("relay", relay.process, relay.state_dir)]:
                if process is None or process.poll() is not None:
                    continue
                sample = sample_process(process.pid, state, t)
                if sample is not None:
                    self.report.samples.setdefault(name, []).append(sample)
                    self.report.peak_rss[name] = max(self.report.peak_rss.get(name, 0.0), sample.rss)
            await trio.sleep(self.config.sample_s)

    async def _writer(self, daemon: DaemonProcess, end: float) -> None:
        config = self.config
        mine = self.written.setdefault(daemon.name, set())
        interval = 1 / config.writes_per_s
        due = self.now()
        n = 0
        while self.now() < end:
            stream = f"s{self.rng.randrange(config.streams)}"
            record_id = f"{daemon.name}-{n}"
            body = self.rng.randbytes(self.rng.randint(*config.body_bytes) // 2).hex()
            began = time.perf_counter()
            await daemon.write(stream, body, record_id)
            self.report.latencies.append((self.now(), time.perf_counter() - began))
            mine.add((stream, record_id))
            self.report.acknowledged += 1
            self.report.written_bytes += len(body)
            n += 1
            due += interval
            await trio.sleep(max(0.0, due - self.now()))  # pacing, not synchronisation

    async def _deleter(self, daemon: DaemonProcess, end: float) -> None:
        config = self.config
        while True:
            await trio.sleep(config.delete_every_s)
            if self.now() >= end:
                return
            candidates = sorted(self.written.get(daemon.name, set()) - self.deleted)
            for stream, record_id in self.rng.sample(candidates, min(config.deletes // 2, len(candidates))):
                await daemon.request("DELETE", f"/v1/streams/{stream}/records/{record_id}")
                self.deleted.add((stream, record_id))
                self.report.deleted += 1

    async def _offline_cycle(self, daemon: DaemonProcess, end: float) -> None:
        config = self.config
        while True:
            await trio.sleep(config.offline_period_s - config.offline_s)
            if self.now() + config.offline_s >= end:
                return
            self.offline.add(daemon.name)
            try:
                await daemon.stop()
            except subprocess.TimeoutExpired:
                self.report.slow_stops += 1  # a finding, reported and asserted on, not an abort
                daemon.kill()
            self.progress(f"{self.now():6.0f} s: C offline")
            await trio.sleep(config.offline_s)
            await daemon.start()
            self.offline.discard(daemon.name)
            self.progress(f"{self.now():6.0f} s: C back")

    async def _subscriber(self, daemon: DaemonProcess, end: float, reconnect_s: float | None) -> None:
        while self.now() < end:
            limit = min(reconnect_s or end, end - self.now())
            with trio.move_on_after(limit):
                async with daemon.event_stream() as events:
                    while True:
                        await events.next()
                        self.report.events += 1

    async def _scraper(self, daemons: list[DaemonProcess], end: float) -> None:
        while self.now() < end:
            for daemon in daemons:
                if daemon.name not in self.offline:
                    try:
                        text = (await daemon.request("GET", "/metrics", raw=True)).decode()
                        self.report.scrapes += 1
                        life = daemon.process.pid if daemon.process else 0  # C's counters restart
                        for line in text.splitlines():
                            if line.startswith("meshd_backup_bytes_total "):
                                self.report.backup_bytes.setdefault(daemon.name, {})[life] = float(line.split()[1])
                            elif line.startswith("meshd_backup_failures_total{"):
                                self.report.backup_failures.setdefault(daemon.name, {})[life] = \
                                    float(line.rsplit(" ", 1)[1])
                            elif line.startswith("meshd_backup_age_seconds{"):
                                age = float(line.rsplit(" ", 1)[1])
                                ages = self.report.backup_age_max
                                ages[daemon.name] = max(age, ages.get(daemon.name, 0.0))
                        relays = (await daemon.request("GET", "/v1/relays"))["relays"]
                        self.report.backup_all_bytes.setdefault(daemon.name, {})[life] = float(sum(
                            r.get("backup", {}).get("uploaded_bytes", 0) for r in relays))
                    except (OSError, h11.RemoteProtocolError):
                        # C stopping between the check and the answer.
                        self.report.scrape_failures += 1
            await trio.sleep(self.config.scrape_s)

    async def _check(self, daemons: list[DaemonProcess]) -> None:
        """Wait for convergence, then look for every acknowledged write and deleted record."""
        began = time.monotonic()

        async def vectors() -> list[int]:
            return [(await d.status())["entries"] for d in daemons]

        with trio.move_on_after(self.config.converge_limit_s):
            while len(set(await vectors())) != 1:
                async with daemons[0].event_stream() as events, trio.open_nursery() as nursery:
                    nursery.cancel_scope.deadline = trio.current_time() + 1.0
                    nursery.start_soon(events.next)
            self.report.converged_s = time.monotonic() - began
        self.report.entries = (await vectors())[0]
        expected = set().union(*self.written.values()) - self.deleted
        for daemon in daemons:
            present: set[tuple[str, str]] = set()
            for stream in range(self.config.streams):
                present |= {(f"s{stream}", r["id"]) for r in await daemon.records(f"s{stream}")}
            self.report.missing += len(expected - present)
            self.report.resurrected += len(present & self.deleted)
