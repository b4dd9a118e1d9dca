"""Recovery from a backup whose manifest is stored as a chain of delta blobs (format 4,
protocol/relay.md "Backup chain"), with a real relay and daemons (issue 20)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from .daemons import DaemonProcess, RelayProcess
from .test_backup_incremental import backup_with, relay_blobs

WRITES = 4


@pytest.mark.slow
async def test_a_chained_backup_recovers_every_entry(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    original = DaemonProcess(tmp_path, "original", relays=[address], discovery=False)
    phoenix = DaemonProcess(tmp_path, "phoenix", relays=[address], discovery=False)
    try:
        await original.start()
        words = (await original.request("POST", "/v1/recovery-key"))["words"]
        signed = []
        for i in range(WRITES):  # one upload, one segment each
            async with trio.open_nursery() as nursery:
                await nursery.start(backup_with, original, i + 1)
                await original.write("notes", f"note {i}")
            signed.append(relay_blobs(relay)[1])
        # Inline, the signed blob held the records (over 1 KiB here) and grew by a segment
        # reference (about 106 bytes) per upload; chained it names only the newest blob.
        assert max(signed) < 400, signed
        segments, _ = relay_blobs(relay)
        assert len(segments) >= WRITES + 2, "the segments, a base and at least one delta"

        original.kill()  # every device is lost; the words and the relay remain
        await phoenix.start()
        preview = await phoenix.request("POST", "/v1/recover",
                                        {"words": words, "relay": address, "preview": True})
        result = await phoenix.request("POST", "/v1/recover", {
            "words": words, "relay": address, "readmit": [d["device"] for d in preview["devices"]]})
        assert result["restored_entries"] == WRITES
        assert sorted(await phoenix.texts("notes")) == sorted(f"note {i}" for i in range(WRITES))
    finally:
        for process in (original, phoenix, relay):
            process.kill()
