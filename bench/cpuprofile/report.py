"""Print where a soak's daemons spent their trio thread's time (bench/soak.py --profile DIR).

Run: .venv/bin/python bench/cpuprofile/report.py DIR [--top 40] [--device A]
The .prof files of one device (C restarts: one per run) are merged. Per device: the
functions by own time (tottime) and by cumulative time, with call counts.
"""

from __future__ import annotations

import argparse
import pstats
import re
from pathlib import Path


def device_of(argv: str) -> str:
    found = re.search(r"/([^/]+)/meshd\.toml", argv)
    return found.group(1) if found else argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--device", action="append")
    args = parser.parse_args()
    files: dict[str, list[str]] = {}
    for argv in sorted(args.dir.glob("*.argv")):
        prof = argv.with_suffix(".prof")
        if prof.exists():
            files.setdefault(device_of(argv.read_text()), []).append(str(prof))
    for device, paths in sorted(files.items()):
        if args.device and device not in args.device:
            continue
        stats = pstats.Stats(*paths)
        stats.strip_dirs()
        print(f"==== {device}: {len(paths)} process run(s), {stats.total_tt:.1f} s profiled "  # type: ignore[attr-defined]
              "on the trio thread (cProfile time, inflated by the profiler)")
        for order in ("tottime", "cumulative"):
            print(f"\n-- by {order}")
            stats.sort_stats(order).print_stats(args.top)


if __name__ == "__main__":
    main()
