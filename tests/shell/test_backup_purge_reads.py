"""A manifest read from the relay checks only the segments this device has not seen (issue 20).

Two devices backing up to one relay (the soak's A and B) store their manifests in turn, so
nearly every upload of one meets a compare-and-swap conflict and reads the relay's manifest.
Each read used to start a cycle of purge checks over every segment of this device's authors
(a body count of each: a COUNT over its range of the bodies table, about 1 MiB read per full
segment), so a device's backup CPU grew with its log over the 30-minute soak. A read is
checked because the relay's manifest may list segments another device sealed, whose bodies
this device may have purged; a segment this device sealed or checked before follows the
store's journal of purges (Store.purged_since) as between uploads. These tests count the
body counts of uploads that each follow such a read, at two log sizes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meshd import backupstate
from meshd.backup import Backups
from meshd.identity import DeviceIdentity
from meshd.net.logsync import LogService
from meshd.store.db import Store

from .test_backup_chain import CountingRelay
from .test_backup_leaks import ADDRESS, Host
from .test_backup_purge_checks import BODY, make_host
from .test_relay import make_circle


def two_devices(path: Path, entries: int) -> tuple[Host, Host, list[tuple[int, int]]]:
    """alice (whose log holds `entries` of BODY bytes) and bob, of one circle; the (first,
    last) of every body count alice's store answers is recorded in the list returned."""
    circle, members, rng = make_circle("alice", "bob")
    hosts = []
    for name, count in (("alice", entries), ("bob", 10)):
        member = members[name]
        (path / name).mkdir()
        store = Store(path / name / "meshd.db")
        logs = LogService(store, member.signer, lambda: int(time.time() * 1000))
        logs.write_many_nowait([("s", f"{name}{i}", bytes([i % 251]) * BODY) for i in range(count)])
        hosts.append(Host(circle, DeviceIdentity(member.signer, member.dh), store, logs, rng))
    alice, bob = hosts
    checked: list[tuple[int, int]] = []
    body_count = alice.store.body_count

    def counting(author: bytes, first: int, last: int) -> int:
        checked.append((first, last))
        return body_count(author, first, last)

    alice.store.body_count = counting  # type: ignore[method-assign]
    return alice, bob, checked


async def checks_after_conflicts(path: Path, entries: int) -> tuple[int, list[int], list[tuple[int, int]]]:
    """alice's first backup's segments, the body counts of each of 6 uploads of hers that each follow a
    conflict (bob stored in between), and those of the uploads after a delete of hers."""
    alice, bob, checked = two_devices(path, entries)
    relay = CountingRelay()
    mine, theirs = Backups(alice, lambda *_: None), Backups(bob, lambda *_: None)
    assert await mine.upload(ADDRESS, relay)
    first = mine.state(ADDRESS).manifest
    assert first is not None
    segments = len(first.segments)  # alice's alone
    assert await theirs.upload(ADDRESS, relay)
    per_upload = []
    for i in range(6):
        alice.logs.write_many_nowait([("s", f"new{i}", b"a" * BODY)])
        conflicts, before = relay.conflicts, len(checked)
        assert await mine.upload(ADDRESS, relay)
        assert relay.conflicts == conflicts + 1  # bob stored since: alice read his manifest
        per_upload.append(len(checked) - before)
        bob.logs.write_many_nowait([("s", f"bob-new{i}", b"b" * BODY)])
        assert await theirs.upload(ADDRESS, relay)
    state = mine.state(ADDRESS)
    assert state.manifest is not None  # what it knows stays within what its manifest lists
    assert state.purge_known and state.purge_known <= {s.id for s in state.manifest.segments}
    await alice.logs.delete("s", "alice5")  # seq 6
    before = len(checked)
    for i in range(3):  # the whole cycle, however many uploads it spans
        alice.logs.write_many_nowait([("t", f"after{i}", b"a" * BODY)])
        assert await mine.upload(ADDRESS, relay)
        bob.logs.write_many_nowait([("t", f"bob-after{i}", b"b" * BODY)])
        assert await theirs.upload(ADDRESS, relay)
    after_delete = checked[before:]
    alice.store.close()
    bob.store.close()
    return segments, per_upload, after_delete


async def test_uploads_after_conflicting_reads_count_no_bodies_at_any_log_size(tmp_path: Path) -> None:
    """Each read used to check every segment of alice's (all of them at each upload, as many
    as her log had); bob's manifest lists no segment of hers she did not seal: none now."""
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small_segments, small, small_delete = await checks_after_conflicts(tmp_path / "small", 700)  # ~2 MiB
    large_segments, large, large_delete = await checks_after_conflicts(tmp_path / "large", 2800)  # ~8 MiB
    assert large_segments >= 3 * small_segments >= 6  # the log is 4 times larger...
    assert small == large == [0] * 6, (small, large)  # ...and no upload after a read counts bodies
    # A purge is still found: the one segment covering it, at both sizes.
    assert len(small_delete) == len(large_delete) == 1, (small_delete, large_delete)
    for first, last in small_delete + large_delete:
        assert first <= 6 <= last


async def test_segments_another_device_sealed_are_each_checked_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments of this device's author that another device sealed (it took over while this
    one was away), read from the relay: each counted once, PURGE_CHECKS per upload, whatever
    the journal of purges says; then nothing more while nothing is purged."""
    monkeypatch.setattr(backupstate, "PURGE_CHECKS", 2)  # a cycle spans several uploads
    host, checked = make_host(tmp_path, 2800)
    relay = CountingRelay()
    other, backups = Backups(host, lambda *_: None), Backups(host, lambda *_: None)
    assert await other.upload(ADDRESS, relay)
    theirs = other.state(ADDRESS).manifest
    assert theirs is not None
    listed = {(s.first, s.last) for s in theirs.segments}
    host.logs.write_many_nowait([("s", "r5", b"overwritten")])  # purges r5's first body
    checked.clear()
    for i in range(len(listed)):
        host.logs.write_many_nowait([("t", f"new{i}", b"n" * BODY)])
        assert await backups.upload(ADDRESS, relay)
    assert listed <= set(checked)  # every segment the other device sealed, in turn
    assert len(checked) <= len(listed) + 2 * 2  # each once (plus what the last uploads added)
    before = len(checked)
    for i in range(3):  # the cycle is over, nothing purged since: no more checks
        host.logs.write_many_nowait([("t", f"later{i}", b"n" * BODY)])
        assert await backups.upload(ADDRESS, relay)
    assert len(checked) == before
    # The other device stores again (a conflict for this one): only what it sealed since is new.
    host.logs.write_many_nowait([("t", "other", b"o" * BODY)])
    assert await other.upload(ADDRESS, relay)
    again, mine = other.state(ADDRESS).manifest, backups.state(ADDRESS).manifest
    assert again is not None and mine is not None
    new = {s.id for s in again.segments} - {s.id for s in theirs.segments} - {s.id for s in mine.segments}
    assert len(new) < len(listed)
    before = len(checked)
    for i in range(3):
        host.logs.write_many_nowait([("t", f"last{i}", b"n" * BODY)])
        assert await backups.upload(ADDRESS, relay)
    assert len(checked) - before <= len(new), (checked[before:], len(new))
    host.store.close()
