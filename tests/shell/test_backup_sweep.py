"""Blobs no ledger remembers are found with relay.segment_list and deleted (issue 20).

The pending ledger covers an upload interrupted before its manifest was stored; it cannot
cover a store restored from an older copy, or a crash between an upload and the ledger's
commit. At the first upload after a start (then every SWEEP_INTERVAL_S) the device lists the
blobs its key stored at the relay and deletes those the relay's current manifest does not
list. A relay that lies in its list (ids it does not hold, ids left out, ids the manifest
lists) must not make the device delete anything the manifest references.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from meshd.backup import Backups
from meshd.backupblobs import open_manifest
from meshd.backupsweep import SWEEP_INTERVAL_S
from meshd.identity import DeviceIdentity
from meshd.net.logsync import LogService
from meshd.protocol.relay import MAX_LISTED
from meshd.store.db import Store

from .test_backup_chain import CountingRelay
from .test_backup_leaks import ADDRESS, Host, host  # noqa: F401  (host: a fixture)
from .test_relay import (  # noqa: F401 - the hook and fixture run each test on both backends
    make_circle,
    pytest_generate_tests,
    relay_backend,
    running_relay,
    session,
)


@dataclass(frozen=True)
class Registered:
    segment_list: bool = True
    removed_segments: bool = True


class ListingRelay(CountingRelay):
    """Answers relay.segment_list with what it holds (every blob is this device's but those
    in `owners`; another key's are listed to whoever asks for them), or with `lie(held ids)`
    when set; counts the pages asked, and the keys asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.registration = Registered()  # type: ignore[assignment]
        self.lie = None
        self.pages = 0
        self.owners: dict[bytes, bytes] = {}  # segment id -> another device's key
        self.asked_for: list[bytes] = []

    async def segment_list(self, after: bytes = b"", limit: int | None = None,
                           device: bytes = b"") -> tuple[list[tuple[bytes, int]], bool]:
        self.pages += 1
        if device:
            self.asked_for.append(device)
        held = sorted(i for i in self.segments if self.owners.get(i, b"") == device)
        ids = self.lie(held) if self.lie is not None else held
        page = [i for i in sorted(ids) if i > after][:limit or MAX_LISTED]
        return [(i, len(self.segments.get(i, b"?"))) for i in page], page[-1:] != sorted(ids)[-1:]


async def manifest_ids(host: Host, relay: CountingRelay) -> set[bytes]:  # noqa: F811
    assert relay.stored is not None
    return (await open_manifest(host, relay, relay.stored.blob, relay.stored.version, {})).blob_ids()  # type: ignore[arg-type]


async def test_blobs_a_restored_store_forgot_are_deleted_at_the_next_start(host: Host) -> None:  # noqa: F811
    relay = ListingRelay()
    assert await Backups(host, lambda *_: None).upload(ADDRESS, relay)
    listed = await manifest_ids(host, relay)
    # Uploaded by a copy of the store that was lost (its ledger with it).
    await relay.segment_put(b"L" * 16, b"l" * 700)
    await relay.segment_put(b"M" * 16, b"m" * 300)
    restarted = Backups(host, lambda *_: None)
    assert await restarted.upload(ADDRESS, relay)
    assert set(relay.segments) == listed == await manifest_ids(host, relay)
    state = restarted.state(ADDRESS)
    assert state.swept == 2
    assert state.stored_bytes == sum(len(relay.segments[i]) for i in listed)
    assert restarted.describe(ADDRESS)["swept"] == 2
    host.metrics.collectors.append(restarted.update_age)  # as meshd/relay/links.py does
    assert f'meshd_backup_stored_bytes{{relay="{ADDRESS}"}} {state.stored_bytes}\n' in host.metrics.render()
    pages = relay.pages
    host.logs.write_many_nowait([("s", "more", b"x" * 500)])
    assert await restarted.upload(ADDRESS, relay)
    assert relay.pages == pages, f"no second sweep within {SWEEP_INTERVAL_S} s"


async def test_a_lying_list_never_deletes_what_the_manifest_lists(host: Host) -> None:  # noqa: F811
    relay = ListingRelay()
    assert await Backups(host, lambda *_: None).upload(ADDRESS, relay)
    listed = await manifest_ids(host, relay)
    await relay.segment_put(b"L" * 16, b"l" * 700)  # leaked, and listed by the relay
    await relay.segment_put(b"O" * 16, b"o" * 700)  # leaked, and left out of the list
    invented = [bytes([0xF0 + n]) * 16 for n in range(3)]
    # Every id it holds but one, ids it does not hold, in pages of MAX_LISTED.
    relay.lie = lambda held: [i for i in held if i != b"O" * 16] + invented
    restarted = Backups(host, lambda *_: None)
    assert await restarted.upload(ADDRESS, relay)
    assert listed <= set(relay.segments), "a blob the manifest lists was deleted"
    assert b"O" * 16 in relay.segments and b"L" * 16 not in relay.segments
    assert await manifest_ids(host, relay) == listed


async def test_an_older_relay_is_not_asked(host: Host) -> None:  # noqa: F811
    relay = ListingRelay()
    relay.registration = Registered(segment_list=False)  # type: ignore[assignment]
    await relay.segment_put(b"L" * 16, b"l" * 700)
    assert await Backups(host, lambda *_: None).upload(ADDRESS, relay)
    assert relay.pages == 0 and b"L" * 16 in relay.segments


async def test_the_sweep_at_a_real_relay_keeps_another_devices_upload(tmp_path: Path, host: Host) -> None:  # noqa: F811
    circle, m, _ = make_circle("alice", "bob")
    alice = m["alice"]
    device = Host(circle, host.identity.__class__(alice.signer, alice.dh), host.store, host.logs, host.rng)
    async with running_relay(tmp_path / "relay") as relay, \
            session(relay, alice, circle) as mine, session(relay, m["bob"], circle) as bob:
        client = SimpleNamespace(session=mine)
        assert await Backups(device, lambda *_: None).upload(ADDRESS, client)  # type: ignore[arg-type]
        await mine.segment_put(b"L" * 16, b"l" * 700)  # this device's, no ledger remembers it
        await bob.segment_put(b"B" * 16, b"b" * 700)  # bob's upload in flight
        restarted = Backups(device, lambda *_: None)
        assert await restarted.upload(ADDRESS, client)  # type: ignore[arg-type]
        assert restarted.state(ADDRESS).swept == 1
        assert await mine.segment_get(b"L" * 16) is None
        assert await bob.segment_get(b"B" * 16) == b"b" * 700
        items, more = await mine.segment_list()
        stored = await mine.backup_get()
        assert stored is not None
        now = await open_manifest(device, mine, stored.blob, stored.version, {})  # type: ignore[arg-type]
        assert not more and {i for i, _ in items} == now.blob_ids()
        assert restarted.state(ADDRESS).stored_bytes == sum(size for _, size in items)


async def test_blobs_a_removed_device_left_are_deleted_at_the_next_upload(tmp_path: Path) -> None:
    """A removed device uploads nothing more, so its leaked blobs stayed until the relay's
    expiry: the next upload after its removal deletes those the manifest does not list
    (never one it lists), and never asks for an active member's."""
    circle, members, rng = make_circle("alice", "bob")
    alice = members["alice"]
    store = Store(tmp_path / "meshd.db")
    logs = LogService(store, alice.signer, lambda: int(time.time() * 1000))
    logs.write_many_nowait([("s", f"r{i}", b"x" * 3000) for i in range(400)])
    device = Host(circle, DeviceIdentity(alice.signer, alice.dh), store, logs, rng)
    relay = ListingRelay()
    backups = Backups(device, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    bob = bytes(members["bob"].dh.public)
    await relay.segment_put(b"B" * 16, b"b" * 600)  # bob's upload in flight, or a leak
    relay.owners[b"B" * 16] = bob
    logs.write_many_nowait([("s", "more", b"y" * 500)])
    assert await backups.upload(ADDRESS, relay)
    assert relay.asked_for == [] and b"B" * 16 in relay.segments  # bob is a member
    listed = await manifest_ids(device, relay)
    relay.owners.update(dict.fromkeys(listed, bob))  # as if bob uploaded what the manifest lists
    circle.remove_device(alice.signer, members["bob"].sign_key, rng)
    logs.write_many_nowait([("s", "after", b"z" * 500)])
    assert await backups.upload(ADDRESS, relay)  # the next upload, not SWEEP_INTERVAL_S later
    assert relay.asked_for == [bob]
    assert b"B" * 16 not in relay.segments
    assert set(relay.segments) == await manifest_ids(device, relay)  # every id it lists is kept
    assert backups.state(ADDRESS).swept == 1
    logs.write_many_nowait([("s", "later", b"w" * 500)])
    assert await backups.upload(ADDRESS, relay)
    assert relay.asked_for == [bob], "once per removed device until the next periodic sweep"
    store.close()


async def test_at_a_real_relay_a_removed_devices_leak_goes_and_a_members_upload_stays(
        tmp_path: Path, host: Host) -> None:  # noqa: F811
    circle, m, rng = make_circle("alice", "bob", "carol")
    alice = m["alice"]
    device = Host(circle, host.identity.__class__(alice.signer, alice.dh), host.store, host.logs, host.rng)
    async with running_relay(tmp_path / "relay") as relay, session(relay, alice, circle) as mine, \
            session(relay, m["bob"], circle) as bob, session(relay, m["carol"], circle) as carol:
        client = SimpleNamespace(session=mine)
        backups = Backups(device, lambda *_: None)
        assert await backups.upload(ADDRESS, client)  # type: ignore[arg-type]
        await bob.segment_put(b"B" * 16, b"b" * 700)  # bob's upload in flight
        await carol.segment_put(b"C" * 16, b"c" * 700)  # carol's leak
        circle.remove_device(alice.signer, m["carol"].sign_key, rng)
        await mine.register(circle.records())  # the relay learns of the removal
        device.logs.write_many_nowait([("s", "after", b"z" * 500)])
        assert await backups.upload(ADDRESS, client)  # type: ignore[arg-type]
        assert backups.state(ADDRESS).swept == 1
        assert await mine.segment_get(b"C" * 16) is None
        assert await bob.segment_get(b"B" * 16) == b"b" * 700
