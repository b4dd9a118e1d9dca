"""One upload backs up the log as it was when the upload began.

Issue 20: in the soak most segments at the relay held one entry (166 of 182 below 16 KiB
with two writers at 20 writes/s). Each build re-read the version vector, so the entries
written while a segment was being sealed and uploaded became the next build, of one entry,
then the next: an upload chased the tip with a round trip per entry. Those tiny segments
were then merged twice (to 16 KiB-1 MiB, then to full), so most bytes went up three times.
Entries that arrive during an upload wait for the next one (the backup loop is woken by
them, 2 s later), and go up together.
"""

from __future__ import annotations

from typing import Any

import pytest

from meshd.backup import Backups
from meshd.backupblobs import open_manifest
from meshd.protocol import backupset
from meshd.protocol.backupset import Manifest
from meshd.restore import restore_logs

from .test_backup_leaks import ADDRESS, FakeRelay, Host, host  # noqa: F401  (host: a fixture)

LATE_WRITES = 20


class WritingRelay(FakeRelay):
    """Each segment_put lets a write land on the device meanwhile."""

    def __init__(self, device: Host) -> None:
        super().__init__()
        self.host = device
        self.puts: list[int] = []
        self.late = 0

    async def segment_put(self, segment_id: bytes, blob: bytes) -> None:
        await super().segment_put(segment_id, blob)
        self.puts.append(len(blob))
        if self.late < LATE_WRITES:  # bounded: the old code chased the writes without end
            self.host.logs.write_many_nowait([("s", f"late{self.late}", b"y" * 500)])
            self.late += 1


async def test_entries_written_during_an_upload_wait_for_the_next_one(host: Host) -> None:  # noqa: F811
    relay = WritingRelay(host)
    backups = Backups(host, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    # 400 entries of 3 kB: one full segment and the rest, and nothing for the later writes.
    assert len(relay.puts) == 2, relay.puts
    relay.puts.clear()
    assert await backups.upload(ADDRESS, relay)
    assert len(relay.puts) == 1, "the entries written meanwhile go up together"


class ServingRelay(FakeRelay):
    async def segment_get(self, segment_id: bytes) -> bytes | None:
        return self.segments.get(segment_id)


async def test_a_backup_with_index_blobs_reads_back_whole_and_restores_every_entry(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Full segments go into index blobs (2 per index here, 64 in use); the device reading
    the relay's manifest again, and a restore, see every segment through them."""
    monkeypatch.setattr(backupset, "INDEX_REFS", 2)
    host.logs.write_many_nowait([("s", f"more{i}", b"z" * 3000) for i in range(2600)])  # 9 MB in all
    relay = ServingRelay()
    backups = Backups(host, lambda *_: None)
    assert await backups.upload(ADDRESS, relay)
    assert relay.stored is not None
    keys = host.circle.current_keys(host.identity.noise)
    opened = await open_manifest(host, relay, relay.stored.blob, relay.stored.version, {})  # type: ignore[arg-type]
    assert len(opened.indexes) >= 3 and not opened.unread()
    assert opened.blob_ids() == set(relay.segments), "every blob at the relay is listed, and only those"
    unread = Manifest.from_snapshot(opened.snapshot())
    assert len(unread.segments) < len(opened.segments), "the snapshot lists indexed segments only by index"
    entries = 0

    async def ingest(batch: dict[str, Any]) -> int:
        nonlocal entries
        entries += len(batch["headers"])
        return len(batch["headers"])

    assert await restore_logs(relay, host.circle.circle_id, unread, {keys.number: keys}.get, ingest) == 3000  # type: ignore[arg-type]
    assert entries == 3000
    # Another upload with nothing new stores nothing and uploads nothing.
    before = dict(relay.segments)
    assert await backups.upload(ADDRESS, relay)
    assert relay.segments == before
