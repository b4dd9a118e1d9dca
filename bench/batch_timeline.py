"""Where a batch import's wall time goes: per-stage timestamps along each request, in a real daemon.

The daemon is a real `meshd run` process (tests/integration/daemons.py), started through this
script (--child), which wraps a few functions of the tree under test before the daemon runs:
each call records (perf_counter, thread CPU, thread name, stage, start/end). perf_counter is
CLOCK_MONOTONIC here, so the client's own stamps (each request handed to the socket, each
answer read) line up with the daemon's. At exit the daemon writes the events to a file; this
script then prints, per request (medians over the run's steady requests):

  client     request sent -> its answer read
  trio       receive of the body, the endpoint call, the answer sent
  parse      the body's decoding (worker thread, read ahead while the last one commits)
  writer     the group commit's thread: busy from a group's start to its end, of which
             waiting for the first part's composition, inserting parts, COMMIT (fsync);
             and the idle gap before the next group
  composer   the composing thread's parts
and the CPU per entry of each thread. No assertion: a diagnostic for issue 16 (bench/results).

Run from a tree's root:  PYTHONPATH=. .venv/bin/python bench/batch_timeline.py [--entries 100000]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())

EVENTS: list[tuple[float, float, str, str, str]] = []


def _stamp(stage: str, phase: str) -> None:
    EVENTS.append((time.perf_counter(), time.thread_time(), threading.current_thread().name,
                   stage, phase))


def _wrap(owner: Any, name: str, stage: str) -> None:
    raw = owner.__dict__[name] if isinstance(owner, type) else None
    if isinstance(raw, staticmethod):  # (_Connection.call)
        holder = type("holder", (), {name: raw.__func__})
        _wrap(holder, name, stage)
        setattr(owner, name, staticmethod(holder.__dict__[name]))
        return
    original = getattr(owner, name)
    if hasattr(original, "__code__") and original.__code__.co_flags & 0x80:  # a coroutine

        async def awrapped(*args: Any, **kwargs: Any) -> Any:
            _stamp(stage, "start")
            try:
                return await original(*args, **kwargs)
            finally:
                _stamp(stage, "end")
        setattr(owner, name, awrapped)
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _stamp(stage, "start")
        try:
            return original(*args, **kwargs)
        finally:
            _stamp(stage, "end")
    setattr(owner, name, wrapped)


def child(trace: str, argv: list[str]) -> int:
    """The daemon, its stages wrapped (module docstring)."""
    from meshd.api import connio, httpserver, routes
    from meshd.cmd.meshd import meshd_main
    from meshd.net import composeahead
    from meshd.store import db, groupcommit

    if os.environ.get("TIMELINE_PART"):  # (an experiment: entries per composed part)
        composeahead.PART_ENTRIES = int(os.environ["TIMELINE_PART"])
    _wrap(routes, "parse_puts", "parse")
    _wrap(httpserver._Connection, "call", "endpoint")
    _wrap(httpserver._Connection, "respond_fast", "respond")
    _wrap(connio.ConnectionIO, "receive_some", "receive")
    _wrap(groupcommit.GroupCommit, "submit", "submit")
    _wrap(groupcommit.GroupCommit, "_run_group", "group")
    _wrap(groupcommit.GroupCommit, "_answer", "answer")
    _wrap(composeahead, "compose_units", "compose")
    _wrap(db, "insert_rows", "insert_rows")
    _wrap(db.Store, "_insert_batch", "insert_batch")
    _wrap(db.Store, "_bound_wal", "bound_wal")
    _wrap(db.Store, "commit_batches", "commit_batches")
    _wrap(composeahead, "joined", "joined")
    _wrap(composeahead.threading.Thread, "join", "thread_join")

    def dump() -> None:
        Path(trace).write_text(json.dumps(EVENTS))
    atexit.register(dump)
    return meshd_main(argv)


# ---- the parent: run an import, then read the trace ------------------------------------------


def run(entries: int, directory: Path) -> tuple[list[Any], list[tuple[float, str]]]:
    import trio

    from meshd.api import pipelined
    from meshd.api.client import Client
    from tests.integration.daemons import DaemonProcess

    trace = directory / "trace.json"
    daemon = DaemonProcess(directory, "timeline", discovery=False, log_level="warning",
                           launcher=(sys.executable, str(Path(__file__).resolve()), "--child",
                                     str(trace), "--"))
    client_events: list[tuple[float, str]] = []
    original = pipelined.request_bytes

    def request_bytes(*args: Any) -> bytes:
        client_events.append((time.perf_counter(), "send"))
        return original(*args)
    pipelined.request_bytes = request_bytes  # type: ignore[assignment]

    async def main() -> None:
        await daemon.start()
        try:
            client = Client(daemon.socket_path, timeout=120)
            lines = [json.dumps({"body": f"{i:08d}" + "x" * 192}).encode() for i in range(entries)]
            pid = daemon.process.pid if daemon.process else 0
            perf = None
            if os.environ.get("TIMELINE_PERF"):  # (a diagnostic: perf record of the daemon)
                import subprocess
                perf = subprocess.Popen(["perf",  # noqa: ASYNC220 - a diagnostic's child "record", "-q", "-F", "2000", "-p", str(pid),
                                         "-o", os.environ["TIMELINE_PERF"]])
                time.sleep(0.5)  # noqa: ASYNC251 - perf attaching; nothing else runs
            before, own = thread_cpu(pid), time.process_time()
            started = time.perf_counter()
            result = await trio.to_thread.run_sync(lambda: client.import_lines(
                lines, "batch", progress=lambda *_: client_events.append((time.perf_counter(), "answer"))))
            wall = time.perf_counter() - started
            after, own = thread_cpu(pid), time.process_time() - own
            if perf is not None:
                perf.send_signal(2)
                perf.wait()
            assert result["written"] == entries, result
            print(f"import: {entries / wall:,.0f} entries/s; CPU per entry (us): this client "
                  f"{own * 1e6 / entries:.2f}, daemon process {(after['total'] - before['total']) * 1e6 / entries:.2f}")
            for name in sorted(after, key=lambda n: before.get(n, 0) - after[n]):
                if name != "total":
                    print(f"  {name:40s} {(after[name] - before.get(name, 0)) * 1e6 / entries:6.2f}")
        finally:
            await daemon.stop()
    trio.run(main)
    return json.loads(trace.read_text()), client_events


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by thread name (threads of one name summed), and the process "total"."""
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu(stat: str) -> float:
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / ticks
    out: dict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out[name] += cpu((task / "stat").read_text())
        except OSError:
            continue
    out["total"] = cpu(Path(f"/proc/{pid}/stat").read_text())
    return out


def spans(events: list[Any], stage: str, thread: str | None = None
          ) -> list[tuple[float, float, float, str]]:
    """(start, end, thread CPU, thread) of each call of stage."""
    open_: dict[str, list[tuple[float, float]]] = defaultdict(list)
    out = []
    for t, cpu, name, s, phase in events:
        if s != stage or (thread is not None and name != thread):
            continue
        if phase == "start":
            open_[name].append((t, cpu))
        elif open_[name]:
            t0, cpu0 = open_[name].pop()
            out.append((t0, t, cpu - cpu0, name))
    return sorted(out)


def within(items: list[tuple[float, float, float, str]], start: float, end: float
           ) -> list[tuple[float, float, float, str]]:
    return [item for item in items if item[0] >= start and item[1] <= end]


def report(events: list[Any], client: list[tuple[float, str]], entries: int) -> None:
    groups = [g for g in spans(events, "group")]
    composes = spans(events, "compose")
    inserts = spans(events, "insert_batch")
    rows = spans(events, "insert_rows")
    commits = spans(events, "commit_batches")
    walls = spans(events, "bound_wal")
    joins = spans(events, "thread_join")
    joineds = spans(events, "joined")
    endpoints = spans(events, "endpoint")
    responds = spans(events, "respond")
    parses = spans(events, "parse")
    submits = spans(events, "submit")
    sends = [t for t, kind in client if kind == "send"]
    answers = [t for t, kind in client if kind == "answer"]
    per: dict[str, list[float]] = defaultdict(list)
    steady = groups[1:-1]  # (the first and last groups start and drain the pipeline)
    for i, (g0, g1, _cpu, _thread) in enumerate(steady, 1):
        c = within(composes, g0 - 0.5, g1)
        c = [x for x in c if x[1] > g0]
        ins = within(inserts, g0, g1)
        com = within(commits, g0, g1)
        per["group busy"].append(g1 - g0)
        per["  writer thread CPU in the group"].append(_cpu)
        if ins:
            per["  wait for the first part"].append(ins[0][0] - g0)
            per["  inserts (sum)"].append(sum(x[1] - x[0] for x in ins))
            per["  inserts' CPU (sum)"].append(sum(x[2] for x in ins))
            per["  rows of entries+bodies (sum)"].append(
                sum(x[1] - x[0] for x in within(rows, g0, g1)))
            per["  between inserts (waiting for parts)"].append(
                sum(b[0] - a[1] for a, b in zip(ins, ins[1:], strict=False)))
            per["  last insert end -> commit end (COMMIT)"].append(com[-1][1] - ins[-1][1] if com else 0)
            per["  of which _bound_wal"].append(sum(x[1] - x[0] for x in within(walls, g0, g1)))
            per["  commit end -> group end"].append(g1 - com[-1][1] if com else 0)
            per["    of which the helper's join"].append(
                sum(x[1] - x[0] for x in within(joins, g0, g1)))
            per["    of which joined()"].append(sum(x[1] - x[0] for x in within(joineds, g0, g1)))
        per["composer busy (sum of parts)"].append(sum(x[1] - x[0] for x in c))
        per["composer CPU (sum of parts)"].append(sum(x[2] for x in c))
        per["composer: first part"].append(c[0][1] - c[0][0] if c else 0)
        per["group start -> first part's composition starts"].append(c[0][0] - g0 if c else 0)
        nxt = groups[groups.index(steady[i - 1]) + 1]
        per["idle gap to the next group"].append(nxt[0] - g1)
    for s0, _s1, _cpu, _t in submits[1:-1]:
        later = [g for g in groups if g[0] >= s0]
        if later:
            per["submit -> group start"].append(later[0][0] - s0)
    for _e0, e1, _c, _t in endpoints[1:-1]:
        r = [x for x in responds if x[0] >= e1]
        if r:
            per["endpoint end -> answer sent"].append(r[0][1] - e1)
        nxt = [x for x in endpoints if x[0] > e1]
        if nxt:
            per["answer sent -> next endpoint call"].append(nxt[0][0] - (r[0][1] if r else e1))
    for g0, _g1, _c, _t in groups[1:-1]:
        e = [x for x in endpoints if x[0] <= g0 <= x[1]]
        s = [x for x in submits if x[0] <= g0]
        if e and s:
            per["endpoint start -> submit"].append(s[-1][0] - e[-1][0])
    per["parse (worker thread)"] = [x[1] - x[0] for x in parses[1:-1]]
    per["parse CPU"] = [x[2] for x in parses[1:-1]]
    per["endpoint (trio thread) CPU"] = [x[2] for x in endpoints[1:-1]]
    for (_p0, p1, _c, _t) in parses[1:-1]:
        ends = [g[1] for g in groups if g[1] >= p1]
        if ends:
            per["parse end -> before the last group's end (slack)"].append(ends[0] - p1)
    for i, s in enumerate(sends[2:-1], 2):
        if i < len(answers):
            per["client: send n -> answer n"].append(answers[i] - s)
    for a0, a1 in zip(answers[1:-1], answers[2:-1], strict=False):
        per["client: answer -> answer"].append(a1 - a0)
    print(f"{len(groups)} groups, {len(sends)} requests of {entries / max(1, len(sends)):.0f} entries;"
          " per request, medians (ms):")
    for key, values in per.items():
        if values:
            print(f"  {key:52s} {statistics.median(values) * 1000:8.2f}   (p10 "
                  f"{sorted(values)[len(values) // 10] * 1000:.2f}, p90 "
                  f"{sorted(values)[len(values) * 9 // 10] * 1000:.2f})")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        if os.environ.get("TIMELINE_SWITCH_S"):  # (an experiment: the GIL's switch interval)
            sys.setswitchinterval(float(os.environ["TIMELINE_SWITCH_S"]))
        sys.exit(child(sys.argv[2], sys.argv[4:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshd-timeline-", dir="/tmp") as directory:
        os.environ["TIMELINE_KEEP"] = directory
        started = time.perf_counter()
        events, client = run(args.entries, Path(directory))
    print(f"(whole run {time.perf_counter() - started:.1f} s; load {os.getloadavg()[0]:.2f})")
    report(events, client, args.entries)


if __name__ == "__main__":
    main()
