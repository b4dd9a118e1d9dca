"""What the relay's SQLite storage holds once a large blob is stored: no copy of it (issue 20).

Python's sqlite3 binds a bytes parameter as a copy (SQLITE_TRANSIENT) into the prepared
statement, and a statement kept in the connection's statement cache keeps its last bindings
until it runs again: the relay's writer kept the last segment (up to 4 MiB) and the last backup
(up to 15 MiB) it stored, for as long as it ran. Counted with SQLite's own allocator total
(sqlite3_memory_used, the library Python's sqlite3 links to), never with a clock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from meshd.protocol.relay import MAX_SEGMENT_BYTES
from meshd.relay.storage import DATABASE_FILE, SQLiteRelayStorage

MiB = 1 << 20
CIRCLE = b"c" * 32


def sqlite_memory_used() -> Callable[[], int]:
    name = ctypes.util.find_library("sqlite3")
    if name is None:
        pytest.skip("no shared libsqlite3 to read sqlite3_memory_used from")
    function = ctypes.CDLL(name).sqlite3_memory_used
    function.restype = ctypes.c_int64
    return function


# Each connection's page cache (SQLite's default cache_size, -2000: 2000 KiB) may fill with
# the pages written or read; past those, and some change, nothing may stay.
PAGE_CACHES = 3 * 2000 * 1024
HELD_BOUND = PAGE_CACHES + MiB


@pytest.mark.parametrize("count", [1, 3])
def test_stored_blobs_leave_no_copy_in_the_storage(tmp_path: Path, count: int) -> None:
    used = sqlite_memory_used()
    storage = SQLiteRelayStorage(tmp_path / DATABASE_FILE)
    try:
        base = used()
        if used() == 0:
            pytest.skip("sqlite3_memory_used counts another library's allocations")
        version = 0
        for n in range(count):
            assert storage.put_segment(CIRCLE, bytes([n]) * 16, os.urandom(MAX_SEGMENT_BYTES), b"k" * 32)
            assert storage.put_backup(CIRCLE, version, version + 1, os.urandom(8 * MiB)) is None
            version += 1
            assert storage.segment(CIRCLE, bytes([n]) * 16) is not None
        assert used() - base < HELD_BOUND
        # and what is stored is what was given, replaced by version
        stored = storage.backup(CIRCLE)
        assert stored is not None and stored.version == count and len(stored.blob) == 8 * MiB
    finally:
        storage.close()
