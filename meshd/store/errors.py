"""The store's errors: sqlite3's and the OS's failures translated into typed StoreErrors
whose message says what failed and what to check."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StoreError(Exception):
    """The store cannot do what was asked; the message says why and what to check."""


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full. Nothing committed was lost."""


class StoreReadOnly(StoreError):
    """The database or its directory cannot be written."""


class StoreCorrupt(StoreError):
    """The database file is damaged or is not a meshd database."""


@contextmanager
def store_errors(path: Path, doing: str) -> Iterator[None]:
    """Raise what fails inside as a StoreError subclass, never sqlite3's or OSError."""
    try:
        yield
    except sqlite3.Error as err:
        raise translate(err, path, doing) from err
    except OSError as err:
        where = f"{path}: cannot {doing}: {err.strerror or err}"
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise StoreReadOnly(f"{where}; is {path.parent} not writable?") from err
        if err.errno == errno.ENOSPC:
            raise StoreFull(where) from err
        raise StoreError(where) from err


def translate(err: sqlite3.Error, path: Path, doing: str) -> StoreError:
    code = getattr(err, "sqlite_errorcode", 0) & 0xFF
    where = f"{path}: cannot {doing}"
    if code == sqlite3.SQLITE_FULL:
        return StoreFull(f"{where}: the disk or database is full; nothing committed was lost")
    if code == sqlite3.SQLITE_READONLY:
        return StoreReadOnly(f"{where}: the database is read-only ({err})")
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreCorrupt(f"{where}: the database is damaged or not a meshd database ({err})")
    if code == sqlite3.SQLITE_CANTOPEN and not os.access(path.parent, os.W_OK):
        return StoreReadOnly(f"{where}: directory {path.parent} is not writable")
    return StoreError(f"{where}: {err}")
