"""An upload that adds one entry stores bytes that follow the change, not the log (issue 20).

At sparse write rates each upload carries one small entry, and it used to store the whole
signed manifest with it: the circle records and one reference of about 106 bytes per
segment no index lists, so the bytes per upload grew with the number of segments (about
13 KB a week in, for an entry of about 1 KB: 13x the bytes written). A large manifest is now
stored as a base blob and a chain of deltas (protocol/relay.md "Backup chain"), so an
upload stores its segment, a delta and a small signed blob.
"""

from __future__ import annotations

from typing import Any

import pytest

from meshd.backup import Backups
from meshd.backupblobs import open_manifest
from meshd.backupstate import BackupFailed
from meshd.protocol.backupset import Manifest, ManifestRejected
from meshd.protocol.envelope import EnvelopeRejected
from meshd.restore import restore_logs

from .test_backup_leaks import ADDRESS, FakeRelay, Host, host  # noqa: F401  (host: a fixture)

BODY = 1000
UPLOADS = 120


class CountingRelay(FakeRelay):
    """Counts the bytes stored (segments, chain blobs and signed blobs) and serves them back."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.conflicts = 0

    async def segment_put(self, segment_id: bytes, blob: bytes) -> None:
        await super().segment_put(segment_id, blob)
        self.bytes += len(blob)

    async def backup_put(self, expected: int, version: int, blob: bytes) -> None:
        if (self.stored.version if self.stored else 0) != expected:
            self.conflicts += 1
        await super().backup_put(expected, version, blob)
        self.bytes += len(blob)

    async def segment_get(self, segment_id: bytes) -> bytes | None:
        return self.segments.get(segment_id)


async def single_entry_uploads(device: Host, backups: Backups, relay: CountingRelay, n: int, tag: str) -> list[int]:
    """Bytes stored by each of n uploads that each carry one new entry of BODY bytes."""
    out = []
    for i in range(n):
        device.logs.write_many_nowait([("s", f"{tag}{i}", bytes([i % 251]) * BODY)])
        before = relay.bytes
        assert await backups.upload(ADDRESS, relay)
        out.append(relay.bytes - before)
    return out


async def test_bytes_per_single_entry_upload_do_not_grow_with_the_segments_listed(host: Host) -> None:  # noqa: F811
    relay = CountingRelay()
    backups = Backups(host, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    early = (await single_entry_uploads(host, backups, relay, 20, "early"))[4:]
    for i in range(30):  # 30 uploads of 20 KB: segments of level 1, kept until they reach 1 MiB
        host.logs.write_many_nowait([("s", f"mid{i}-{j}", b"m" * BODY) for j in range(20)])
        assert await backups.upload(ADDRESS, relay)
    late = (await single_entry_uploads(host, backups, relay, 20, "late"))[4:]
    state = backups.state(ADDRESS)
    assert state.manifest is not None
    listed = len(state.manifest.segments)
    assert listed >= 60, f"the log is listed by {listed} segments"
    # With the whole manifest stored at each upload, a late upload cost about 5 KB more than
    # an early one (about 106 bytes per segment listed); chained, about the same (a new base
    # now and then: the deltas' bytes since the last one, at most).
    assert sum(late) / len(late) <= sum(early) / len(early) + 500, (early, late)
    assert sum(late) / len(late) <= 2.5 * BODY, late


async def test_a_chained_backup_reads_back_whole_and_restores_every_entry(host: Host) -> None:  # noqa: F811
    relay = CountingRelay()
    backups = Backups(host, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    await single_entry_uploads(host, backups, relay, 80, "more")
    assert relay.stored is not None
    opened = await open_manifest(host, relay, relay.stored.blob, relay.stored.version, {})  # type: ignore[arg-type]
    assert opened.chain is not None and opened.chain.deltas, "the manifest is stored as a chain"
    state = backups.state(ADDRESS)
    assert state.manifest is not None
    assert {s.id for s in opened.segments} == {s.id for s in state.manifest.segments}
    assert opened.blob_ids() == set(relay.segments), "every blob at the relay is listed, and only those"
    keys = host.circle.current_keys(host.identity.noise)
    entries = 0

    async def ingest(batch: dict[str, Any]) -> int:
        nonlocal entries
        entries += len(batch["headers"])
        return len(batch["headers"])

    restored = await restore_logs(relay, host.circle.circle_id, Manifest.from_snapshot(opened.snapshot()),  # type: ignore[arg-type]
                                  lambda n: keys if n == keys.number else None, ingest)
    assert restored == entries == 400 + 80


async def chained(device: Host) -> tuple[CountingRelay, Manifest]:
    relay = CountingRelay()
    backups = Backups(device, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    await single_entry_uploads(device, backups, relay, 12, "c")
    assert relay.stored is not None
    opened = await open_manifest(device, relay, relay.stored.blob, relay.stored.version, {})  # type: ignore[arg-type]
    assert opened.chain is not None and len(opened.chain.deltas) >= 2
    return relay, opened


async def test_a_tampered_swapped_or_withheld_chain_blob_is_detected(host: Host) -> None:  # noqa: F811
    relay, opened = await chained(host)
    assert relay.stored is not None and opened.chain is not None
    stored = relay.stored
    head, older, base = opened.chain.deltas[-1], opened.chain.deltas[0], opened.chain.base

    async def read() -> Manifest:
        return await open_manifest(host, relay, stored.blob, stored.version, {})  # type: ignore[arg-type]

    for victim, replacement in ((head.id, relay.segments[head.id][:-1] + b"\x00"),  # tampered
                                (base.id, relay.segments[base.id][:-1] + b"\x00"),
                                (head.id, relay.segments[older.id])):  # an older delta in its place
        saved = relay.segments[victim]
        relay.segments[victim] = replacement
        with pytest.raises(ManifestRejected, match="bad-digest"):
            await read()
        relay.segments[victim] = saved
    for victim in (older.id, base.id):  # withheld
        saved = relay.segments.pop(victim)
        with pytest.raises(BackupFailed, match="lost"):
            await read()
        relay.segments[victim] = saved
    assert (await read()).segments == opened.segments


async def test_an_older_chained_version_served_again_is_a_rollback(host: Host) -> None:  # noqa: F811
    relay = CountingRelay()
    misbehaved: list[str] = []
    backups = Backups(host, lambda _relay, reason, _detail: misbehaved.append(reason))
    assert await backups.upload(ADDRESS, relay)
    await single_entry_uploads(host, backups, relay, 6, "r")
    old = relay.stored
    await single_entry_uploads(host, backups, relay, 3, "s")
    assert relay.stored is not None and old is not None
    # Its blobs still at the relay, the older signed version is served again: the device
    # that stored a newer one reads it (a conflict) and refuses it.
    relay.stored = old
    host.logs.write_many_nowait([("s", "after", b"a" * BODY)])
    assert not await backups.upload(ADDRESS, relay)
    assert misbehaved == ["rollback"]
    # The newer version's blob presented as the older version does not open either.
    with pytest.raises(EnvelopeRejected, match="version-mismatch"):
        await open_manifest(host, relay, relay.stored.blob, old.version + 1, {})  # type: ignore[arg-type]


async def test_chain_blobs_a_refused_store_left_and_replaced_chains_are_deleted(host: Host) -> None:  # noqa: F811
    relay, opened = await chained(host)
    backups = Backups(host, lambda *_: None)
    relay.refuse_manifest = True
    host.logs.write_many_nowait([("s", "refused", b"r" * BODY)])
    assert not await backups.upload(ADDRESS, relay)
    relay.refuse_manifest = False
    backups.state(ADDRESS).retry_at = 0.0
    bases = set()
    for _ in range(30):  # enough deltas for a new base or two
        assert await backups.upload(ADDRESS, relay)
        state = backups.state(ADDRESS)
        assert state.manifest is not None and state.manifest.chain is not None
        bases.add(state.manifest.chain.base.id)
        host.logs.write_many_nowait([("s", f"after{len(bases)}-{relay.bytes}", b"a" * BODY)])
    assert len(bases) >= 2, "the chain was replaced by a new base"
    assert relay.stored is not None
    now = await open_manifest(host, relay, relay.stored.blob, relay.stored.version, {})  # type: ignore[arg-type]
    assert set(relay.segments) == now.blob_ids(), "no leaked delta, no old base or chain left"
    assert backups.state(ADDRESS).pending == set()


async def test_a_conflict_on_a_chained_manifest_leaves_one_consistent_chain(host: Host) -> None:  # noqa: F811
    relay, _ = await chained(host)
    first, second = Backups(host, lambda *_: None), Backups(host, lambda *_: None)
    assert await first.upload(ADDRESS, relay)  # reads the relay's version: current
    host.logs.write_many_nowait([("s", "raced", b"c" * BODY)])
    assert await second.upload(ADDRESS, relay)  # stores the entry first
    host.logs.write_many_nowait([("s", "later", b"d" * BODY)])
    assert await first.upload(ADDRESS, relay)  # its version is stale: a conflict, then theirs
    assert relay.conflicts == 1
    assert relay.stored is not None
    now = await open_manifest(host, relay, relay.stored.blob, relay.stored.version, {})  # type: ignore[arg-type]
    assert set(relay.segments) == now.blob_ids(), "the refused attempt's delta and segments are gone"
    assert now.covered(bytes(host.identity.signing.public)) == 400 + 12 + 2
