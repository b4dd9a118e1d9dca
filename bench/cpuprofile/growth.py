"""Which functions' trio-thread time grew between two windows of one profiled soak.

bench/soak.py --profile DIR writes each daemon's cumulative cProfile every 30 s; copy DIR
at several minutes (e.g. `cp DIR/* snapN/` each minute) and compare the per-minute own time
of each function in window one (snapshots a..b) against window two (c..d):

    .venv/bin/python bench/cpuprofile/growth.py SNAP_A SNAP_B SNAP_C SNAP_D --device A

Prints the functions whose own time (and call count) per window grew most, with ratios, so
work proportional to the log's size shows as a ratio above 1 at a constant write rate.
"""

from __future__ import annotations

import argparse
import pstats
from pathlib import Path
from typing import Any

from report import device_of  # type: ignore[import-not-found]


def load(folder: Path, device: str) -> dict[Any, tuple[int, float, float]]:
    out: dict[Any, tuple[int, float, float]] = {}
    for argv in sorted(folder.glob("*.argv")):
        prof = argv.with_suffix(".prof")
        if not prof.exists() or device_of(argv.read_text()) != device:
            continue
        stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
        for func, (_cc, nc, tt, ct, _callers) in stats.items():
            calls, own, cum = out.get(func, (0, 0.0, 0.0))
            out[func] = (calls + nc, own + tt, cum + ct)
    return out


def window(start: dict[Any, tuple[int, float, float]], end: dict[Any, tuple[int, float, float]]
           ) -> dict[Any, tuple[int, float, float]]:
    return {f: (v[0] - start.get(f, (0, 0, 0))[0], v[1] - start.get(f, (0, 0, 0))[1],
                v[2] - start.get(f, (0, 0, 0))[2]) for f, v in end.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snaps", type=Path, nargs=4)
    parser.add_argument("--device", default="A")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--by", choices=("own", "cum"), default="own")
    args = parser.parse_args()
    a, b, c, d = (load(s, args.device) for s in args.snaps)
    one, two = window(a, b), window(c, d)
    total1 = sum(v[1] for v in one.values())
    total2 = sum(v[1] for v in two.values())
    print(f"device {args.device}: own time window one {total1:.2f} s, window two {total2:.2f} s "
          f"(ratio {total2 / max(total1, 1e-9):.2f})")
    k = 1 if args.by == "own" else 2
    rows = sorted(set(one) | set(two), key=lambda f: two.get(f, (0, 0, 0))[k] - one.get(f, (0, 0, 0))[k],
                  reverse=True)
    print(f"{'grew s':>8} {args.by + ' 1':>8} {args.by + ' 2':>8} {'calls 1':>9} {'calls 2':>9}  function")
    for f in rows[:args.top]:
        c1, o1, u1 = one.get(f, (0, 0.0, 0.0))
        c2, o2, u2 = two.get(f, (0, 0.0, 0.0))
        x1, x2 = (o1, o2) if k == 1 else (u1, u2)
        print(f"{x2 - x1:8.3f} {x1:8.3f} {x2:8.3f} {c1:9d} {c2:9d}  {f[2]} {Path(f[0]).name}:{f[1]}")


if __name__ == "__main__":
    main()
