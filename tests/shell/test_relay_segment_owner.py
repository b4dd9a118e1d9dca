"""Whose segments relay.segment_list lists, on both storages, across the migration that added
segments.device (SQLite: on open; PostgreSQL: migration 5).

A device deletes every listed id its relay's current manifest does not list
(meshd/backupsweep.py), so a segment listed to a device that did not store it is deleted if
it belongs to an upload in flight. Segments stored before the relay recorded who stored each
are listed to every member (they can only be leaks of long-finished uploads). But a process of
the same relay that still runs an older version (a rolling upgrade of relays sharing one
PostgreSQL database) stores segments with no owner after the migration: those may be
another member's upload in flight, and must be listed to no one.
"""

from __future__ import annotations

from pathlib import Path

from meshd.relay.storage import SQLiteRelayStorage

from .test_relay import (  # noqa: F401 - the hook and fixture run each test on both backends
    open_storage,
    pytest_generate_tests,
    relay_backend,
)

CIRCLE = b"c" * 32
ALICE = b"a" * 32
BOB = b"b" * 32


def older_process_stores(storage: object, segment_id: bytes, blob: bytes) -> None:
    """What a relay process of the version before segments.device inserts."""
    sql = "INSERT INTO segments (circle_id, id, blob) VALUES ({0}, {0}, {0})"
    if isinstance(storage, SQLiteRelayStorage):
        storage._writer.execute(sql.format("?"), (CIRCLE, segment_id, blob))  # noqa: SLF001
        return
    with storage._pool.connection() as db:  # type: ignore[attr-defined]  # noqa: SLF001
        db.execute(sql.format("%s"), (CIRCLE, segment_id, blob))


def undo_the_migration(storage: object) -> None:
    """Make the storage as the version before segments.device left it."""
    if isinstance(storage, SQLiteRelayStorage):  # (its index on the column came after it)
        storage._writer.execute("DROP INDEX segments_by_device")  # noqa: SLF001
        storage._writer.execute("ALTER TABLE segments DROP COLUMN device")  # noqa: SLF001
        return
    with storage._pool.connection() as db:  # type: ignore[attr-defined]  # noqa: SLF001
        db.execute("ALTER TABLE segments DROP COLUMN device")  # and migration 6's index on it
        db.execute("UPDATE relay_schema SET version = 4")


def listed(storage: object, device: bytes) -> list[bytes]:
    return [i for i, _ in storage.segments_of(CIRCLE, device, b"", 100)]  # type: ignore[attr-defined]


def test_a_segment_stored_by_an_older_process_after_the_migration_is_listed_to_no_one(
        tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "relay")
    try:
        assert storage.put_segment(CIRCLE, b"A" * 16, b"a" * 10, ALICE)
        older_process_stores(storage, b"B" * 16, b"b" * 10)  # bob's upload, in flight
        assert listed(storage, ALICE) == [b"A" * 16]  # alice's sweep must not delete bob's
        assert listed(storage, BOB) == []  # nor bob's his own: it is not known to be his
    finally:
        storage.close()


def test_segments_stored_before_the_migration_are_listed_to_every_member(tmp_path: Path) -> None:
    storage = open_storage(tmp_path / "relay")
    undo_the_migration(storage)
    older_process_stores(storage, b"L" * 16, b"l" * 10)  # a leak from before the upgrade
    storage.close()
    storage = open_storage(tmp_path / "relay")  # the upgrade
    try:
        assert listed(storage, ALICE) == listed(storage, BOB) == [b"L" * 16]
        older_process_stores(storage, b"B" * 16, b"b" * 10)  # after it: listed to no one
        assert storage.put_segment(CIRCLE, b"A" * 16, b"a" * 10, ALICE)
        assert listed(storage, ALICE) == [b"A" * 16, b"L" * 16]
        assert listed(storage, BOB) == [b"L" * 16]
    finally:
        storage.close()
