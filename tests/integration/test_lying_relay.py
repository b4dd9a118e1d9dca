"""A relay colluding with a removed device cannot hide the removal from the other members.

Real daemons and a real relay process patched to lie (tests/integration/lying_relay.py): it
withholds every `relay.records` push, serves the record set from before the removal, never
tells the removed device, and keeps serving it. The members reach each other only through
that relay (discovery off, no configured peers). protocol/relay.md, "Circle changes".
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .daemons import (
    CONVERGE_S,
    DaemonProcess,
    RelayProcess,
    pair,
    start_all,
    wait_connected,
    wait_texts,
)

pytestmark = pytest.mark.slow


def lying_relay(root: Path) -> RelayProcess:
    relay = RelayProcess(root, "lying-relay")
    relay.command = [sys.executable, "-m", "tests.integration.lying_relay"]
    return relay


async def relay_path_only(daemons: list[DaemonProcess], relay: str) -> None:
    """Restart the paired daemons so that they can reach each other through the relay only."""
    for daemon in daemons:
        assert await daemon.stop() == 0
        daemon.reconfigure(discovery=False, relays=[relay])
    await start_all(daemons)

    for daemon in daemons:
        async def connected(d: DaemonProcess = daemon) -> bool:
            return all(r["connected"] for r in (await d.status())["relays"])

        await daemon.until(connected, CONVERGE_S, "its relay connection")


async def test_a_withholding_relay_does_not_hide_a_removal(tmp_path: Path) -> None:
    relay = lying_relay(tmp_path)
    address = await relay.start()
    alpha, beta, thief = (DaemonProcess(tmp_path, name) for name in ("alpha", "beta", "thief"))
    daemons = [alpha, beta, thief]
    try:
        await start_all(daemons)
        await pair(alpha, beta)
        await pair(alpha, thief)
        await wait_connected(alpha, 2)
        await relay_path_only(daemons, address)
        await alpha.write("chat", "before the removal")
        await wait_texts(beta, "chat", {"before the removal"})
        await wait_texts(thief, "chat", {"before the removal"})

        thief_id = (await thief.status())["device"]
        await alpha.request("POST", f"/v1/devices/{thief_id[:16]}/remove")

        # beta learns it from alpha's letter, sealed under an epoch beta already holds.
        async def beta_knows() -> bool:
            return (await beta.status())["devices"] == 2

        await beta.until(beta_knows, CONVERGE_S, "beta to learn of the removal")
        secret = "secret written after the thief's removal"
        await beta.write("chat", secret)
        await wait_texts(alpha, "chat", {secret})  # the members' mail still flows
        # beta wrote only once it knew: it sealed nothing for the thief, under no key the
        # thief holds. (The lying relay still serves the thief, who keeps draining.)
        assert secret not in await thief.texts("chat")
        assert (await thief.status())["member"] is True, "the relay kept the thief in the dark"
        # alpha noticed that the relay serves a record set without what it registered (the
        # relay.misbehaved event it publishes then wakes this wait).
        async def flagged() -> bool:
            return "withholds" in alpha.log()

        await alpha.until(flagged, CONVERGE_S, "alpha to flag the withholding relay")
    finally:
        for process in (*daemons, relay):
            process.kill()
