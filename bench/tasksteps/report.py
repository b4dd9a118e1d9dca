"""Per-write task steps, wake-ups and trio-thread CPU from bench/tasksteps dumps (bench only).

Run: python bench/tasksteps/report.py DIR --from T0 --to T1 --writes-per-s 20 [--top 25]
For each `meshd run` process, takes its dumps nearest T0 and T1 (unix seconds; default: its
second and its last), and prints per task name the steps, wake-ups and CPU ms per own write
(the window's seconds x writes-per-s; C writes nothing of its own: per A write then).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


def device(argv: list[str]) -> str:
    for arg in argv:
        found = re.search(r"/([^/]+)/meshd\.toml$", arg)
        if found:
            return found.group(1)
    return "?"


def norm(name: str) -> str:
    return re.sub(r"0x[0-9a-f]+|\d+", "N", name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--from", dest="start", type=float, default=None)
    parser.add_argument("--to", dest="end", type=float, default=None)
    parser.add_argument("--writes-per-s", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    dumps: dict[str, list[Path]] = defaultdict(list)
    for path in args.dir.glob("*.json.*"):
        dumps[path.name.split(".")[0]].append(path)
    for pid, paths in sorted(dumps.items()):
        paths.sort(key=lambda p: int(p.name.rsplit(".", 1)[1]))
        times = [int(p.name.rsplit(".", 1)[1]) for p in paths]
        if len(paths) < 3:
            continue
        i0 = 1 if args.start is None else min(range(len(times)), key=lambda i: abs(times[i] - args.start))
        i1 = len(paths) - 1 if args.end is None else min(range(len(times)), key=lambda i: abs(times[i] - args.end))
        a, b = (json.loads(paths[i].read_text()) for i in (i0, i1))
        seconds = b["time"] - a["time"]
        if seconds <= 0:
            continue
        writes = seconds * args.writes_per_s
        rows = defaultdict(lambda: [0.0, 0.0, 0.0])
        for key, col in (("steps", 0), ("wakes", 1), ("cpu", 2)):
            for name, value in b[key].items():
                rows[norm(name)][col] += value - a[key].get(name, 0)
        total_cpu = (b["thread_ns"] - a["thread_ns"]) / 1e6
        step_cpu = sum(r[2] for r in rows.values()) / 1e6
        print(f"\n{device(b['argv'])} pid {pid}: {seconds:.0f} s, trio thread {total_cpu / 1e3:.2f} s "
              f"({total_cpu / writes:.3f} ms/write), in steps {step_cpu / 1e3:.2f} s, "
              f"steps {sum(r[0] for r in rows.values()) / writes:.1f}/write")
        print(f"  {'task':70} {'steps/w':>8} {'wakes/w':>8} {'cpu ms/w':>9}")
        for name, (steps, wakes, cpu) in sorted(rows.items(), key=lambda kv: -kv[1][2])[:args.top]:
            print(f"  {name[-70:]:70} {steps / writes:8.2f} {wakes / writes:8.2f} {cpu / 1e6 / writes:9.3f}")


if __name__ == "__main__":
    main()
