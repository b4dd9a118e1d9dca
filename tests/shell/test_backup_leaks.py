"""Backup segments an interrupted upload left at a relay are deleted by the next upload.

A round uploads segments, then stores the manifest that lists them. A crash, or a manifest
store the relay refuses, between the two used to leave those segments at the relay for good
(nothing lists them and no device remembered them), taking the circle's quota. Each id is
now recorded in the store before its upload (backupstate.PENDING_KEY) until a stored manifest
lists it or the relay confirms its deletion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshd import backup as backup_module
from meshd.api.events import EventBus
from meshd.api.metrics import MeshdMetrics
from meshd.backup import Backups
from meshd.backupblobs import open_manifest
from meshd.identity import DeviceIdentity
from meshd.net.logsync import LogService
from meshd.protocol.circle import Circle
from meshd.protocol.crypto import RandomSource
from meshd.protocol.relay import CONFLICT, RelayError
from meshd.relay.session import StoredBackup
from meshd.store.db import Store

from .test_relay import make_circle

ADDRESS = "127.0.0.1:1#relay"


@dataclass
class Host:
    circle: Circle
    identity: DeviceIdentity
    store: Store
    logs: LogService
    rng: RandomSource
    events: EventBus = field(default_factory=EventBus)
    metrics: MeshdMetrics = field(default_factory=MeshdMetrics)


class FakeRelay:
    """The backup requests of a relay, in memory; `refuse_manifest` fails backup_put, and
    `crash_after_segments` cancels the upload after that many segment_puts (a kill -9)."""

    def __init__(self) -> None:
        self.segments: dict[bytes, bytes] = {}
        self.stored: StoredBackup | None = None
        self.refuse_manifest = False
        self.crash_after_segments: int | None = None
        self.dead = False
        self.registration = None  # as an older relay's: no relay.segment_list

    @property
    def session(self) -> FakeRelay:
        """As a RelayClient's live session: the fake is both."""
        return self

    async def backup_get(self) -> StoredBackup | None:
        return self.stored

    async def backup_put(self, expected: int, version: int, blob: bytes) -> None:
        if self.refuse_manifest:
            raise RelayError("unavailable", "refused for the test")
        if (self.stored.version if self.stored else 0) != expected:
            raise RelayError(CONFLICT)
        self.stored = StoredBackup(version, blob)

    async def segment_put(self, segment_id: bytes, blob: bytes) -> None:
        if self.dead or (self.crash_after_segments is not None
                         and len(self.segments) >= self.crash_after_segments):
            self.dead = True  # the process is gone: it sends nothing more
            raise Crash
        assert segment_id not in self.segments
        self.segments[segment_id] = blob

    async def segment_delete(self, ids: list[bytes]) -> None:
        if self.dead:
            raise Crash
        for segment_id in ids:
            self.segments.pop(segment_id, None)


class Crash(BaseException):
    """The process dies mid-upload: nothing after this point runs (no except Exception)."""


@pytest.fixture
def host(tmp_path: Path) -> Host:
    circle, members, rng = make_circle("alice")
    alice = members["alice"]
    store = Store(tmp_path / "meshd.db")
    logs = LogService(store, alice.signer, lambda: int(time.time() * 1000))
    logs.write_many_nowait([("s", f"r{i}", b"x" * 3000) for i in range(400)])
    return Host(circle, DeviceIdentity(alice.signer, alice.dh), store, logs, rng)


async def listed_ids(host: Host, relay: FakeRelay) -> set[bytes]:
    backups = Backups(host, lambda *_: None)
    state = backups.state(ADDRESS)
    assert relay.stored is not None
    state.manifest = await open_manifest(host, relay, relay.stored.blob, relay.stored.version, {})  # type: ignore[arg-type]
    return {ref.id for ref in state.manifest.segments}


async def test_segments_of_a_refused_manifest_are_deleted_by_the_next_upload(host: Host) -> None:
    relay = FakeRelay()
    backups = Backups(host, lambda *_: None)
    relay.refuse_manifest = True
    assert not await backups.upload(ADDRESS, relay)
    assert relay.segments and relay.stored is None  # uploaded, listed nowhere
    relay.refuse_manifest = False
    backups.state(ADDRESS).retry_at = 0.0
    assert await backups.upload(ADDRESS, relay)
    assert set(relay.segments) == await listed_ids(host, relay)  # nothing unlisted is left


@pytest.mark.parametrize("segments_before_crash", [1, 3])
async def test_segments_a_crash_left_are_deleted_after_a_restart(
        host: Host, segments_before_crash: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_module, "SEGMENT_TARGET_BYTES", 64 * 1024)  # several segments
    relay = FakeRelay()
    relay.crash_after_segments = segments_before_crash
    with pytest.raises(Crash):
        await Backups(host, lambda *_: None).upload(ADDRESS, relay)
    assert len(relay.segments) == segments_before_crash and relay.stored is None
    relay.crash_after_segments, relay.dead = None, False
    restarted = Backups(host, lambda *_: None)  # a new process: only the store remains
    assert await restarted.upload(ADDRESS, relay)
    assert set(relay.segments) == await listed_ids(host, relay)
    assert restarted.state(ADDRESS).pending == set()


async def test_segments_a_lost_answer_stored_are_kept(host: Host) -> None:
    """backup_put took effect but its answer was lost: the segments are listed, so the next
    upload, reading the relay's current manifest first, keeps them."""
    relay = FakeRelay()
    backups = Backups(host, lambda *_: None)
    real_put = relay.backup_put

    async def lost_answer(expected: int, version: int, blob: bytes) -> None:
        await real_put(expected, version, blob)
        raise RelayError("unavailable", "the answer was lost")

    relay.backup_put = lost_answer  # type: ignore[method-assign]
    assert not await backups.upload(ADDRESS, relay)
    stored = dict(relay.segments)
    relay.backup_put = real_put  # type: ignore[method-assign]
    backups.state(ADDRESS).retry_at = 0.0
    assert await backups.upload(ADDRESS, relay)
    assert set(stored) <= set(relay.segments) == await listed_ids(host, relay)
