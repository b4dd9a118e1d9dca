"""The owner settles a dispute with a thief using the recovery words (real daemons, a real relay).

A two-device circle: the owner removes the stolen device while the thief, offline, removes
the owner's. Once the relay has both, neither is a member: without the words the circle has
no device left. The words sign a remove that outranks the thief's (protocol/circle.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .daemons import CONVERGE_S, DaemonProcess, RelayProcess, pair, start_all, wait_connected

pytestmark = pytest.mark.slow


async def _member(daemon: DaemonProcess, expected: bool) -> None:
    async def check() -> bool:
        return (await daemon.status())["member"] is expected

    await daemon.until(check, CONVERGE_S, f"{daemon.name} member={expected}")


async def test_the_recovery_words_settle_a_dispute_with_a_thief(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    owner = DaemonProcess(tmp_path, "laptop", relays=[address])
    thief = DaemonProcess(tmp_path, "stolen", relays=[address])
    try:
        await start_all([owner, thief])
        await pair(owner, thief)
        await wait_connected(owner, 1)
        words = (await owner.request("POST", "/v1/recovery-key"))["words"]
        owner_id, thief_id = (await owner.status())["device"], (await thief.status())["device"]

        # The thief, offline, removes the owner's device; the owner removes the thief.
        assert await thief.stop() == 0
        thief.reconfigure(relays=[], discovery=False)
        await thief.start()
        await thief.request("POST", f"/v1/devices/{owner_id[:16]}/remove")
        assert await thief.stop() == 0
        await owner.request("POST", f"/v1/devices/{thief_id[:16]}/remove")
        # The thief comes online: the relay merges both removes, and both devices are out.
        thief.reconfigure(relays=[address])
        await thief.start()
        await _member(owner, False)
        await _member(thief, False)

        # The owner, with the words, removes the thief once more: that remove outranks.
        result = await owner.request("POST", f"/v1/devices/{thief_id[:16]}/remove",
                                     {"recovery_words": words})
        assert result["member"] is True and [d["device"] for d in result["devices"]] == [owner_id]
        status = await owner.status()
        assert status["member"] and status["devices"] == 1

        async def relay_serves_the_owner() -> bool:
            return all(r["connected"] for r in (await owner.status())["relays"])

        await owner.until(relay_serves_the_owner, CONVERGE_S, "the relay to serve the owner again")
        await owner.write("chat", "the circle is mine again")
    finally:
        for process in (owner, thief, relay):
            process.kill()
