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

from meshd.backup import Backups

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
