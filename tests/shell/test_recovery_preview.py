"""The recovery preview (POST /v1/recover with "preview": true) against a real backup: what
it tells the owner (the devices the circle would keep, when each last wrote, and how far the
backup covers a removed device's log) is what the backup holds, and the event loop keeps
serving while it is worked out (the removed devices' coverage and the device list run in
worker threads since s7-loop20; they walk every segment reference of the manifest).

The backup is made by meshd/backup.py from a store holding two authors, one of them removed
since; its manifest is a chain of index blobs (backupset.INDEX_REFS lowered) over many small
segments (backup.SEGMENT_TARGET_BYTES lowered), as a large log's is. The relay serves it
from memory through the same session calls a relay process answers.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

import meshd.relay.recovery as recovery
from meshd import backup as backup_module
from meshd.api.events import EventBus
from meshd.backup import Backups
from meshd.backupblobs import open_manifest
from meshd.identity import DeviceIdentity, fingerprint
from meshd.net.logsync import LogService
from meshd.protocol import backupset
from meshd.protocol.recovery import generate_words, recovery_member, words_to_seed
from meshd.store.db import Store

from .test_backup_batching import ServingRelay
from .test_backup_leaks import ADDRESS, Host
from .test_relay import make_circle

ALICE_ENTRIES = 300
BOB_ENTRIES = 120
ROUNDS = 4
# Where recovery is told the relay is (a relay address names the relay's key).
RELAY = "127.0.0.1:1#" + base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode()


class RecordsRelay(ServingRelay):
    """The relay's records and backup calls, as a session recovery opens answers them."""

    def __init__(self, records: list[bytes]) -> None:
        super().__init__()
        self.circle_records = records

    async def records(self) -> list[bytes]:
        return self.circle_records


async def backed_up_circle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                           ) -> tuple[RecordsRelay, bytes, dict[str, Any]]:
    """A relay holding the backup of a circle alice+bob (bob removed after writing), the
    recovery seed, and what the preview must say: per author the time span of its last
    round of writes (its newest entry's time is in it)."""
    monkeypatch.setattr(backup_module, "SEGMENT_TARGET_BYTES", 16 * 1024)
    monkeypatch.setattr(backupset, "INDEX_REFS", 4)
    circle, members, rng = make_circle("alice", "bob")
    alice, bob = members["alice"], members["bob"]
    store = Store(tmp_path / "meshd.db")
    host = Host(circle, DeviceIdentity(alice.signer, alice.dh), store,
                LogService(store, alice.signer, lambda: int(time.time() * 1000)), rng)
    relay = RecordsRelay([])
    backups = Backups(host, lambda *_: None)
    spans: dict[bytes, tuple[float, float]] = {}
    for round_ in range(ROUNDS):  # an upload after each round: incremental segments
        for member, count in ((bob, BOB_ENTRIES), (alice, ALICE_ENTRIES)):
            started = time.time()
            # A service per round: each reads the store's logs as they are now (both authors').
            logs = LogService(store, member.signer, lambda: int(time.time() * 1000))
            logs.write_many_nowait([("s", f"{member.info.name}{round_}.{i}", os.urandom(2000))
                                    for i in range(count // ROUNDS)])
            spans[member.signer.public] = (started, time.time())  # its last round's
        host.logs = LogService(store, alice.signer, lambda: int(time.time() * 1000))
        if round_ == ROUNDS - 1:  # bob is removed after his last entries were backed up
            circle.remove_device(alice.signer, bob.signer.public, rng, force=True)
            words = generate_words(rng)
            seed = words_to_seed(words)
            circle.enrol_recovery(alice.signer, recovery_member(seed)[2], rng)
        relay.circle_records = circle.records()
        assert await backups.upload(ADDRESS, relay)
    assert relay.stored is not None
    opened = await open_manifest(host, relay, relay.stored.blob, relay.stored.version, {})  # type: ignore[arg-type]
    alice_refs = sorted((r.first, r.last) for r in opened.segments if r.author == alice.signer.public)
    assert len(alice_refs) >= 2 and alice_refs[-1][1] == ALICE_ENTRIES, alice_refs  # (the newest is a choice)
    store.close()
    return relay, seed, {"spans": spans, "alice": alice, "bob": bob, "rng": rng}


def recovering_daemon(rng: Any) -> Any:
    """The part of a fresh daemon the preview uses (RecoveryHost)."""
    return SimpleNamespace(rng=rng, events=EventBus())


def served_by(relay: RecordsRelay, monkeypatch: pytest.MonkeyPatch) -> None:
    @asynccontextmanager
    async def open_relay_session(address: str, dh: Any, records: Any, *, rng: Any) -> AsyncIterator[RecordsRelay]:
        assert address == RELAY
        yield relay

    monkeypatch.setattr(recovery, "open_relay_session", open_relay_session)


async def test_the_preview_says_what_the_backup_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    relay, seed, expected = await backed_up_circle(tmp_path, monkeypatch)
    served_by(relay, monkeypatch)
    preview = await recovery.recover(recovering_daemon(expected["rng"]), seed, [RELAY], preview=True, readmit=None)
    alice, bob = expected["alice"], expected["bob"]
    assert preview["preview"] is True
    assert preview["relay"] == RELAY and preview["relays"] == {RELAY: "ok"}
    devices = {d["device"]: d for d in preview["devices"]}
    assert set(devices) == {alice.signer.public.hex()}, "bob was removed: only alice is kept"
    assert devices[alice.signer.public.hex()]["name"] == "alice"
    # When alice last wrote: the time of her newest entry, read from her newest segment
    # (her first segment's newest entry is from an earlier round: before `started`).
    started, ended = expected["spans"][alice.signer.public]
    last_seen = devices[alice.signer.public.hex()]["last_seen"]
    assert last_seen is not None and started - 0.002 <= last_seen <= ended + 0.002
    # The removed device's coverage: every entry bob wrote is in the backup, without a gap.
    assert preview["removed_before"] == [{"device": bob.signer.public.hex(),
                                          "fingerprint": fingerprint(bob.signer.public),
                                          "name": "bob", "backed_up": BOB_ENTRIES}]
    assert "bob" in preview["warning"] and str(BOB_ENTRIES) in preview["warning"]


async def test_the_preview_works_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    relay, seed, expected = await backed_up_circle(tmp_path, monkeypatch)
    served_by(relay, monkeypatch)
    on_loop: dict[str, bool] = {}
    working = trio.Event()
    served = threading.Event()

    def watched(name: str, method: Any) -> Any:
        def run(found: recovery.Found) -> Any:
            on_loop[name] = threading.current_thread() is threading.main_thread()
            if not on_loop[name]:  # off the loop: hold the work until the loop served a task
                trio.from_thread.run_sync(working.set)
                assert served.wait(30), "the trio thread ran nothing while the preview worked"
            return method(found)
        return run

    monkeypatch.setattr(recovery.Found, "removed_authors", watched("removed_authors", recovery.Found.removed_authors))
    monkeypatch.setattr(recovery.Found, "devices", watched("devices", recovery.Found.devices))

    async def serve() -> None:
        await working.wait()
        served.set()  # the loop ran this while the preview's first piece of work was held

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        preview = await recovery.recover(recovering_daemon(expected["rng"]), seed, [RELAY], preview=True, readmit=None)
    assert on_loop == {"removed_authors": False, "devices": False}
    assert preview["removed_before"] and preview["devices"]
