"""Memory tracing for any meshd process started with this folder on PYTHONPATH.

Set MESHD_MEMTRACE_DIR to a folder: each meshd process (`run` or `relay`) then starts a
daemon thread that, every MESHD_MEMTRACE_S seconds (default 60), appends to
<dir>/<pid>.txt its RSS, the Python heap traced by tracemalloc, SQLite's own allocator
total (sqlite3_memory_used), glibc's malloc figures (mallinfo2: in use vs free in arenas),
and the top growths by source line and by object type since the first snapshot taken
after MESHD_MEMTRACE_BASE_S seconds (those two only with MESHD_MEMTRACE_PYTHON=1, the
default here, which starts tracemalloc: it slows the process and inflates its RSS). Used by
bench/soak.py --memtrace to tell a Python-heap leak from native growth (page cache,
fragmentation, pymalloc arenas).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter

_DIR = os.environ.get("MESHD_MEMTRACE_DIR")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pymalloc() -> str:
    """pymalloc's arenas in use and bytes in live small blocks (sys._debugmallocstats)."""
    import re
    import tempfile
    with tempfile.TemporaryFile() as out:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    arenas = re.search(r"# arenas allocated current\s*=\s*([\d,]+)", text)
    blocks = re.search(r"# bytes in allocated blocks\s*=\s*([\d,]+)", text)
    size = re.search(r"arenas \* ([\d,]+) bytes/arena", text)
    def num(m: re.Match[str] | None) -> int:
        return int(m.group(1).replace(",", "")) if m else 0
    return (f"pymalloc arenas={num(arenas) * num(size) / 2**20:.1f}MB "
            f"blocks={num(blocks) / 2**20:.1f}MB")


def _types() -> Counter[str]:
    return Counter(type(o).__name__ for o in gc.get_objects())


def _run(path: str, every: float, base_after: float) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    sqlite = None
    try:  # the library _sqlite3 links to: one process-wide allocator counter
        sqlite = ctypes.CDLL(ctypes.util.find_library("sqlite3"))
        sqlite.sqlite3_memory_used.restype = ctypes.c_int64
    except OSError:
        sqlite = None
    started = time.monotonic()
    base = base_types = None
    while True:
        time.sleep(every)
        t = time.monotonic() - started
        mi = libc.mallinfo2()
        head = (f"== t={t:.0f}s argv={' '.join(sys.argv[1:4])} rss={_rss_mb():.1f}MB {_pymalloc()} "
                f"sqlite_used={(sqlite.sqlite3_memory_used() if sqlite else -1) / 2**20:.1f}MB "
                f"malloc arena={mi.arena / 2**20:.1f}MB in_use={mi.uordblks / 2**20:.1f}MB "
                f"free={mi.fordblks / 2**20:.1f}MB mmap={mi.hblkhd / 2**20:.1f}MB "
                f"threads={threading.active_count()}")
        if not tracemalloc.is_tracing():
            with open(path, "a") as f:
                f.write(head + "\n")
            continue
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        traced, peak = tracemalloc.get_traced_memory()
        lines = [f"{head} py_traced={traced / 2**20:.1f}MB (peak {peak / 2**20:.1f})"]
        types = _types()
        if base is None and t >= base_after:
            base, base_types = snap, types
        elif base is not None:
            for stat in snap.compare_to(base, "lineno")[:15]:
                lines.append(f"  {stat}")
            grown = (types - base_types).most_common(10)
            lines.append("  types grown: " + ", ".join(f"{k} +{v}" for k, v in grown))
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")


def _is_meshd() -> bool:
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    return (b"run" in argv or b"relay" in argv) and any(a.startswith(b"meshd") for a in argv)


if _DIR and _is_meshd():
    if os.environ.get("MESHD_MEMTRACE_PYTHON", "1") == "1":
        tracemalloc.start(int(os.environ.get("MESHD_MEMTRACE_FRAMES", "1")))
    threading.Thread(target=_run, daemon=True, name="memtrace", args=(
        os.path.join(_DIR, f"{os.getpid()}.txt"), float(os.environ.get("MESHD_MEMTRACE_S", "60")),
        float(os.environ.get("MESHD_MEMTRACE_BASE_S", "120")))).start()
