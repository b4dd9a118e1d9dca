"""Real daemons and two real relay processes: a relay whose disk is wiped (restarted empty,
same key and port) is a new incarnation, and nothing is lost whichever relay is wiped, in
whichever order, while the writer is offline (protocol/relay.md "Incarnation")."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from .daemons import DaemonProcess, RelayProcess, pair, wait_connected, wait_texts
from .relayed import relay_and_daemons

ENTRIES = 100
DELIVERY_S = 60.0


def _relay_entry(status: dict, address: str) -> dict:
    return next(r for r in status["relays"] if r["address"] == address)


async def _deposited_everywhere(writer: DaemonProcess, addresses: list[str],
                                stale: dict[str, str | None] | None = None) -> None:
    """Wait until the writer is connected to every relay (each with an incarnation other than
    `stale[address]`) and has deposited its whole log for the offline members."""
    stale = stale or {}

    async def check() -> bool:
        status = await writer.status()
        relays = [_relay_entry(status, address) for address in addresses]
        return (all(r["connected"] and r.get("incarnation") not in (None, stale.get(r["address"]))
                    for r in relays)
                and status["relay_backlog"] == 0)

    await writer.until(check, DELIVERY_S, "deposits at every relay")


async def _incarnations(daemon: DaemonProcess) -> dict[str, str | None]:
    return {r["address"]: r.get("incarnation") for r in (await daemon.status())["relays"]}


def _backup_version(relay: RelayProcess) -> int:
    path = relay.state_dir / "relay.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        row = db.execute("SELECT max(version) FROM backups").fetchone()
    return int(row[0] or 0)


@pytest.mark.slow
@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["wipe-1-then-2", "wipe-2-then-1"])
async def test_wiping_either_relay_in_any_order_loses_nothing(
        tmp_path: Path, order: tuple[int, int]) -> None:
    async with relay_and_daemons(tmp_path, ["alpha", "beta"],
                                 relay_names=("relay-1", "relay-2")) as setup:
        relays, addresses, (alpha, beta) = setup.relays, setup.addresses, setup.daemons
        first, second = (relays[i] for i in order)
        await pair(alpha, beta)
        await wait_connected(beta, 1)

        # beta reads from both relays once, so it has a position at each.
        assert await beta.stop() == 0
        warm = [f"warm-up {i}" for i in range(3)]
        for text in warm:
            await alpha.write("chat", text)
        await _deposited_everywhere(alpha, addresses)
        beta.reconfigure(discovery=False)  # from now on beta reaches alpha through relays only
        await beta.start()
        await wait_texts(beta, "chat", set(warm), DELIVERY_S)
        assert await beta.stop() == 0

        # 1. One relay is wiped while the writer is online: the writer sees the new
        # incarnation and deposits there again. Then the writer goes away and the other relay
        # is wiped: the first one alone must hold everything for beta.
        phase1 = [f"phase-1 {i}" for i in range(ENTRIES)]
        for text in phase1:
            await alpha.write("chat", text)
        await _deposited_everywhere(alpha, addresses)
        seen = await _incarnations(alpha)
        await first.wipe()
        await _deposited_everywhere(alpha, addresses, {first.address: seen[first.address]})
        assert await alpha.stop() == 0
        await second.wipe()
        await beta.start()
        await wait_texts(beta, "chat", set(warm + phase1), DELIVERY_S)
        assert await beta.stop() == 0

        # 2. The case: the writer comes back, writes, leaves; the relay wiped first
        # is wiped again. beta, which read from both before, must read the other one from
        # its start rather than from where it stood before that relay's wipe.
        await alpha.start()
        phase2 = [f"phase-2 {i}" for i in range(ENTRIES)]
        for text in phase2:
            await alpha.write("chat", text)
        await _deposited_everywhere(alpha, addresses)
        assert await alpha.stop() == 0
        await first.wipe()
        await beta.start()
        texts = await wait_texts(beta, "chat", set(warm + phase1 + phase2), DELIVERY_S)
        assert len(texts) == len(warm) + 2 * ENTRIES  # 0 of 2 x ENTRIES lost, none twice

        # Backups resumed at the relay that was wiped while both devices knew it: a new
        # incarnation, not a rollback.
        async def backed_up() -> bool:
            return _backup_version(second) >= 1

        await beta.until(backed_up, DELIVERY_S, f"a backup at {second.address}")
        assert "rollback" not in alpha.log() + beta.log()
