"""Per-thread CPU of running meshd processes (relay and daemons), for attributing a soak's CPU.

Run alongside a soak:  .venv/bin/python bench/threadcpu.py --seconds 180 [--every 2] [--match /meshd-soak-XYZ]
Every `every` seconds it reads /proc/PID/task/*/stat of each process whose command line is
`meshd ... run --config .../<device>/meshd.toml` or `meshd relay ...`; at the end it prints,
per device, the CPU seconds of the window per thread name (the OS name: trio names its worker
threads), the process total from /proc/PID/stat (which also counts threads that exited inside
the window) and the share of a core. Restarted processes (C) are summed per device.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections import defaultdict
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def ticks(stat: str) -> int:
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def device_of(cmdline: list[str]) -> str | None:
    if "relay" in cmdline and any(a.endswith("meshd") for a in cmdline):
        return "relay"
    if "run" in cmdline and any("meshd" in a for a in cmdline):
        for arg in cmdline:
            found = re.search(r"/([^/]+)/meshd\.toml$", arg)
            if found:
                return found.group(1)
    return None


def snapshot(match: str) -> dict[int, tuple[str, int, dict[int, tuple[str, int]]]]:
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            device = device_of(cmdline)
            if device is None or not any(match in arg for arg in cmdline):
                continue
            total = ticks((proc / "stat").read_text())
            threads = {}
            for task in (proc / "task").iterdir():
                try:
                    comm = (task / "comm").read_text().strip()
                    threads[int(task.name)] = (comm, ticks((task / "stat").read_text()))
                except OSError:
                    continue
        except OSError:
            continue
        out[int(proc.name)] = (device, total, threads)
    return out


def thread_kind(comm: str, tid: int, pid: int) -> str:
    if tid == pid:
        return "main (trio)"
    return re.sub(r"\d+", "N", comm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--every", type=float, default=2.0)
    parser.add_argument("--match", default="/meshd-soak-",
                        help="only processes with an argument containing this (default: bench/soak.py's folders)")
    args = parser.parse_args()
    per_thread: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_process: dict[str, float] = defaultdict(float)
    seen: dict[str, set[int]] = defaultdict(set)
    previous = snapshot(args.match)
    start = time.monotonic()
    while time.monotonic() - start < args.seconds:
        time.sleep(args.every)
        current = snapshot(args.match)
        for pid, (device, total, threads) in current.items():
            seen[device].add(pid)
            if pid not in previous:
                continue  # counted from its second sample on
            _, old_total, old_threads = previous[pid]
            per_process[device] += (total - old_total) / TICKS
            for tid, (comm, t) in threads.items():
                before = old_threads.get(tid, (comm, 0))[1]
                per_thread[device][thread_kind(comm, tid, pid)] += (t - before) / TICKS
        previous = current
    elapsed = time.monotonic() - start
    print(f"per-thread CPU over {elapsed:.0f} s (load {os.getloadavg()[0]:.1f})")
    for device in sorted(per_process):
        total = per_process[device]
        named = sum(per_thread[device].values())
        print(f"  {device}: {total:.1f} s = {100 * total / elapsed:.1f}% of a core ({len(seen[device])} process(es))")
        for kind, cpu in sorted(per_thread[device].items(), key=lambda kv: -kv[1]):
            print(f"      {kind:24} {cpu:7.1f} s  {100 * cpu / max(total, 1e-9):5.1f}%")
        print(f"      {'threads exited/unseen':24} {total - named:7.1f} s")


if __name__ == "__main__":
    main()
