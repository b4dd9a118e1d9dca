"""The backup's purge checks cost nothing while nothing was purged (issue 20, item 2).

A delete or an overwrite purges bodies, and the backup re-seals a segment whose bodies the
store no longer has (protocol/backupplan.py). It used to count the bodies of up to
PURGE_CHECKS segments at every upload, whether anything was purged or not: a COUNT over a
range of the bodies table reads the whole range's pages (about 1 MiB per full segment), so
each upload read up to 64 MiB more as the log grew. Now a cycle of checks over the manifest
runs only after the store's count of purging commits (Store.purges) moved since the last one
began. These tests count the segments checked per upload at two log sizes, and check that a
purge is still found and re-sealed.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from meshd.backup import Backups
from meshd.backupstate import check_purges
from meshd.identity import DeviceIdentity
from meshd.net.logsync import LogService
from meshd.store import purgelog
from meshd.store.db import Store

from .test_backup_chain import CountingRelay
from .test_backup_leaks import ADDRESS, Host
from .test_relay import make_circle

BODY = 3000


def make_host(path: Path, entries: int) -> tuple[Host, list[tuple[int, int]]]:
    """A device whose log holds `entries` of BODY bytes; the (first, last) of every
    body_count the store answers is recorded in the list returned."""
    circle, members, rng = make_circle("alice")
    alice = members["alice"]
    store = Store(path / "meshd.db")
    logs = LogService(store, alice.signer, lambda: int(time.time() * 1000))
    logs.write_many_nowait([("s", f"r{i}", bytes([i % 251]) * BODY) for i in range(entries)])
    checked: list[tuple[int, int]] = []
    count = store.body_count

    def counting(author: bytes, first: int, last: int) -> int:
        checked.append((first, last))
        return count(author, first, last)

    store.body_count = counting  # type: ignore[method-assign]
    return Host(circle, DeviceIdentity(alice.signer, alice.dh), store, logs, rng), checked


async def checks_per_upload(path: Path, entries: int) -> tuple[int, list[int]]:
    """The segments of the first backup, and the body counts of each of 4 later uploads of one
    new entry each (nothing purged meanwhile)."""
    host, checked = make_host(path, entries)
    relay = CountingRelay()
    backups = Backups(host, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    manifest = backups.state(ADDRESS).manifest
    assert manifest is not None
    out = []
    for i in range(4):
        host.logs.write_many_nowait([("s", f"new{i}", b"n" * BODY)])
        before = len(checked)
        assert await backups.upload(ADDRESS, relay)
        out.append(len(checked) - before)
    host.store.close()
    return len(manifest.segments), out


async def test_uploads_without_a_purge_count_no_bodies_at_any_log_size(tmp_path: Path) -> None:
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small_segments, small = await checks_per_upload(tmp_path / "small", 700)  # about 2 MiB
    large_segments, large = await checks_per_upload(tmp_path / "large", 2800)  # about 8 MiB
    assert large_segments >= 3 * small_segments >= 6  # the log is 4 times larger...
    assert small == large == [0, 0, 0, 0]  # ...and no upload checks a segment it did not purge


async def checks_after_one_delete(path: Path, entries: int) -> tuple[int, list[tuple[int, int]]]:
    """The segments of the first backup, and the (first, last) of every body count of the 4
    uploads after one delete (of the 6th entry, seq 6)."""
    host, checked = make_host(path, entries)
    relay = CountingRelay()
    backups = Backups(host, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    manifest = backups.state(ADDRESS).manifest
    assert manifest is not None
    await host.logs.delete("s", "r5")
    assert host.store.purges == 1
    checked.clear()
    for i in range(4):  # the whole cycle, however many uploads it spans
        host.logs.write_many_nowait([("t", f"new{i}", b"n" * BODY)])
        assert await backups.upload(ADDRESS, relay)
    host.store.close()
    return len(manifest.segments), checked


async def test_one_delete_checks_only_the_segment_it_purged_at_any_log_size(tmp_path: Path) -> None:
    """A delete used to start a cycle over every segment of this device (at most 64 per
    upload): a cost that grew with the log. Only the segment covering what it purged now."""
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small_segments, small = await checks_after_one_delete(tmp_path / "small", 700)
    large_segments, large = await checks_after_one_delete(tmp_path / "large", 2800)
    assert large_segments >= 3 * small_segments >= 6
    assert len(small) == len(large) == 1  # one segment, at both sizes...
    for first, last in small + large:
        assert first <= 6 <= last  # ...the one covering the entry it purged


# A manifest read from the relay: tests/shell/test_backup_purge_reads.py (the segments another
# device sealed are each checked once; those this device sealed follow the journal).


async def test_a_journal_that_no_longer_says_starts_one_cycle_over_every_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(purgelog, "MAX_RUNS", 1)
    host, checked = make_host(tmp_path, 700)
    relay = CountingRelay()
    backups = Backups(host, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    manifest = backups.state(ADDRESS).manifest
    assert manifest is not None
    await host.logs.delete("s", "r5")
    await host.logs.delete("s", "r600")  # the journal keeps this one only
    checked.clear()
    assert await backups.upload(ADDRESS, relay)
    assert {(s.first, s.last) for s in manifest.segments} <= set(checked)
    host.store.close()


async def test_a_delete_after_a_quiet_spell_is_still_resealed(tmp_path: Path) -> None:
    host, checked = make_host(tmp_path, 10)  # one segment: re-sealed once 1/8 of it is purged
    author = bytes(host.identity.signing.public)
    relay = CountingRelay()
    backups = Backups(host, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    for i in range(3):
        host.logs.write_many_nowait([("s", f"new{i}", b"n" * BODY)])
        assert await backups.upload(ADDRESS, relay)
    assert checked == []  # nothing purged: nothing counted
    await host.logs.delete("s", "r3")
    await host.logs.delete("s", "r4")
    assert await backups.upload(ADDRESS, relay)
    manifest = backups.state(ADDRESS).manifest
    assert manifest is not None
    tip = host.store.tip(author)[0]
    assert sum(s.bodies for s in manifest.segments if s.author == author) == host.store.body_count(author, 1, tip)
    assert checked, "the purge was looked for"
    host.store.close()


async def test_a_cycle_counts_only_the_segments_of_the_authors_this_device_uploads(tmp_path: Path) -> None:
    """next_build re-seals only the segments of the authors it uploads for: another author's
    segments (its own device uploads them) are not counted."""
    host, checked = make_host(tmp_path, 10)
    relay = CountingRelay()
    backups = Backups(host, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    state = backups.state(ADDRESS)
    assert state.manifest is not None and state.manifest.segments
    author = bytes(host.identity.signing.public)
    others = [replace(s, author=bytes(32), id=bytes(len(s.id))) for s in state.manifest.segments]
    manifest = replace(state.manifest, segments=state.manifest.segments + tuple(others))
    host.logs.write_many_nowait([("s", "r1", b"overwritten")])  # a purge: a cycle begins
    assert await check_purges(host.store, manifest, state, {author}) != {}
    assert not {s.id for s in others} & set(await check_purges(host.store, manifest, state, {author}))
    assert len(checked) == len(state.manifest.segments)  # its own segments only, each once
    host.store.close()
