"""The backup's batching window with a real relay and daemon (issue 20): small writes spread
over several seconds are backed up in one upload (before, one every 2 s debounce, each
storing a manifest of up to 20 KB for a few hundred bytes of entries), and the backup does
become current, within the window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from .daemons import DaemonProcess, RelayProcess

WINDOW_S = 10.0
WRITES = 17
SPACING_S = 0.5  # 17 writes over 8 s, inside one window; the old debounce uploaded 4-5 times
LIMIT_S = 60.0


async def backup_version(daemon: DaemonProcess) -> int:
    relays = (await daemon.request("GET", "/v1/relays"))["relays"]
    return int(relays[0]["backup"]["version"]) if relays and relays[0]["backup"]["at"] else 0


async def test_small_writes_within_the_window_are_one_upload_and_the_backup_becomes_current(
        tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    alpha = DaemonProcess(tmp_path, "alpha", relays=[address], discovery=False, backup_window=WINDOW_S)
    try:
        await alpha.start()
        # Connecting is prompt: the circle's records are backed up without waiting the window.
        first = await alpha.until(lambda: backup_version(alpha), LIMIT_S, "the first backup")
        backups: list[dict[str, Any]] = []
        with trio.fail_after(LIMIT_S):
            async with alpha.event_stream() as events:
                for i in range(WRITES):
                    await alpha.write("notes", f"note {i}")
                    await trio.sleep(SPACING_S)  # the load pattern: sparse writes, not a wait
                while not backups or backups[-1]["entries"] < WRITES:
                    event = await events.next()
                    if event.get("type") == "relay.backup":
                        backups.append(event["data"])
        assert len(backups) <= 2, f"{len(backups)} uploads for {WRITES} small writes: {backups}"
        assert backups[-1]["entries"] == WRITES
        assert await backup_version(alpha) == first + len(backups)
    finally:
        alpha.kill()
        relay.kill()
