"""Resident memory that follows what the process holds, not how long it has run.

Measured in the issue-20 soak (bench/memtrace/ snapshots of a daemon and a relay): the
Python heap and SQLite's own allocations stayed nearly flat while RSS kept growing, and the
growth was glibc malloc memory that was free but not returned: one arena per thread that
ever allocated (trio's worker threads come and go: up to 8 arenas per core), each holding
freed chunks between live ones, and large buffers (sealed segments, batches) moved from
mmap into the heaps once the dynamic mmap threshold had risen after the first big free.

So, once at start (configure()), before any worker thread exists:
- M_ARENA_MAX = ARENA_MAX: worker threads share a few arenas instead of one each;
- M_MMAP_THRESHOLD = MMAP_THRESHOLD: a fixed threshold (which also turns the dynamic one
  off), so every buffer above it is its own mapping, returned to the system when freed;
and every TRIM_EVERY_S a trimmer thread calls malloc_trim(0), which returns the free pages
inside the heaps (not only at their top) to the system.

SQLite's page cache is the other part that grew with the log: two connections at 32 MiB
each filled as the database grew. meshd/store/db.py now caps each at 8 MiB; pages past it
come from the kernel's file cache, which is reclaimable and not the daemon's RSS.

The relay's RSS still rose in the s5 soak, all of it mmap'd chunks alive at each sample: not
the allocator, but live buffers sized by the largest frames (a channel's msgpack packer, and the
last request, answer and stored blob a connection or the storage kept while idle). Those are
let go now (protocol/channel.py KEEP_PACKER_BYTES, relay/; bench/relay_held.py shows it).

On a libc without these functions (musl, macOS) configure() does nothing and says so once
at DEBUG: they change memory use, never behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

ARENA_MAX = 2
MMAP_THRESHOLD = 256 * 1024
TRIM_EVERY_S = 60.0

_libc: ctypes.CDLL | None = None
_trimmer: threading.Thread | None = None
_stop = threading.Event()


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
            log.debug("no glibc malloc here: memory tuning skipped")
            return None
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        _libc = libc
    return _libc


def configure() -> bool:
    """Set the allocator's limits; call first thing in the process. False if not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and ok
    if not ok:
        log.debug("mallopt refused a memory setting")
    return ok


def trim() -> bool:
    """Return free heap pages to the system now; True if any were."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def start_trimming(every_s: float = TRIM_EVERY_S) -> None:
    """A daemon thread that trims every every_s seconds (idempotent). A thread rather than a
    trio task so the relay and the daemon, each with its own event loop, share it."""
    global _trimmer
    if _trimmer is not None or _glibc() is None:
        return
    _stop.clear()

    def run() -> None:
        while not _stop.wait(every_s):
            trim()

    _trimmer = threading.Thread(target=run, name="meshd-malloc-trim", daemon=True)
    _trimmer.start()


def stop_trimming() -> None:
    global _trimmer
    if _trimmer is not None:
        _stop.set()
        _trimmer.join()
        _trimmer = None
