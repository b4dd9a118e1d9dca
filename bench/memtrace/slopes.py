"""Per process, what a soak's RSS slope is made of (bench/soak.py --memtrace DIR).

Run: .venv/bin/python bench/memtrace/slopes.py DIR [--warmup 300]
Reads DIR/<pid>.txt (bench/memtrace/sitecustomize.py: one line a minute per process) and
prints, per process run (C restarts: one line per run), the least-squares slope per hour
after the warm-up and the range of: RSS; RSS without glibc's mmap'd chunks (buffers above
M_MMAP_THRESHOLD in flight at the sample: they are returned to the system when freed, so
they make RSS saw-tooth between samples without growing); the malloc arenas in use and
free; SQLite's own allocations; pymalloc's arenas. A slope in RSS that is not in
RSS-without-mmap is buffers in flight when sampled, not growth.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

FIELDS = {"rss": r"rss=([\d.]+)MB", "mmap": r"mmap=([\d.]+)MB", "in_use": r"in_use=([\d.]+)MB",
          "free": r"free=([\d.]+)MB", "sqlite": r"sqlite_used=([-\d.]+)MB",
          "pymalloc": r"pymalloc arenas=([\d.]+)MB"}


def name_of(argv: str) -> str:
    if argv.startswith("relay"):
        return "relay"
    found = re.search(r"/([^/]+)/meshd\.toml", argv)
    return found.group(1) if found else argv


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / var * 3600 if var else float("nan")


def read(path: Path) -> tuple[str, list[dict[str, float]]]:
    name, rows = path.stem, []
    for line in path.read_text().splitlines():
        if not line.startswith("== t="):
            continue
        t = re.search(r"t=(\d+)s", line)
        argv = re.search(r"argv=(.*?) rss=", line)
        if t is None or argv is None:
            continue
        name = name_of(argv.group(1))
        row = {"t": float(t.group(1))}
        for field, pattern in FIELDS.items():
            found = re.search(pattern, line)
            row[field] = float(found.group(1)) if found else float("nan")
        row["rss-mmap"] = row["rss"] - row["mmap"]
        rows.append(row)
    return name, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--warmup", type=float, default=300.0,
                        help="seconds of each process's own clock to leave out")
    args = parser.parse_args()
    fields = ["rss", "rss-mmap", "mmap", "in_use", "free", "sqlite", "pymalloc"]
    print(f"slopes after {args.warmup:.0f} s, MB per hour [min..max MB over those samples]")
    for path in sorted(args.dir.glob("*.txt")):
        name, rows = read(path)
        rows = [r for r in rows if r["t"] >= args.warmup]
        if len(rows) < 3:
            continue
        cells = []
        for field in fields:
            values = [r[field] for r in rows]
            cells.append(f"{field} {slope_per_hour([(r['t'], r[field]) for r in rows]):+6.1f}"
                         f" [{min(values):.1f}..{max(values):.1f}]")
        print(f"  {name:6} {len(rows):3d} samples  " + "  ".join(cells))


if __name__ == "__main__":
    main()
