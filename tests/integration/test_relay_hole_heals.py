"""A hole (an envelope a relay dropped) that heals: the sender, told the receiver's vector,
deposits the missing entries again under new sequence numbers. Once they are applied the
hole must stop being shown in /v1/relays and /v1/status: what was missing has arrived,
though not in the envelope that was dropped."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from .daemons import CONVERGE_S, pair, wait_connected, wait_texts
from .relayed import relay_and_daemons


async def test_a_hole_healed_by_a_redeposit_is_no_longer_shown(tmp_path: Path) -> None:
    async with relay_and_daemons(tmp_path, ["alpha", "beta"]) as setup:
        relay, (alpha, beta) = setup.relay, setup.daemons
        await pair(alpha, beta)
        await wait_connected(beta, 1)
        assert await beta.stop() == 0
        async def deposited() -> bool:
            return (await alpha.status())["relay_backlog"] == 0

        def last_envelope() -> int:
            with sqlite3.connect(relay.state_dir / "relay.sqlite3") as db:
                return int(db.execute("SELECT coalesce(max(id), 0) FROM envelopes").fetchone()[0])

        ids = []
        for text in ("one", "two", "three"):  # one deposit each
            await alpha.write("diary", text)
            await alpha.until(deposited, CONVERGE_S, f"{text!r} deposited for beta")
            ids.append(last_envelope())
        assert await alpha.stop() == 0
        relay.kill()
        with sqlite3.connect(relay.state_dir / "relay.sqlite3") as db:  # the relay drops "two"
            dropped = db.execute("DELETE FROM envelopes WHERE id > ? AND id <= ?", ids[:2]).rowcount
        assert dropped >= 1
        await relay.start()
        # Neither finds the other on the LAN (new ports, no discovery): the relay path only.
        beta.reconfigure(discovery=False)
        await beta.start()

        async def hole() -> dict[str, Any] | None:
            entry: dict[str, Any] = (await beta.request("GET", "/v1/relays"))["relays"][0]
            return entry if entry.get("holes") else None

        await beta.until(hole, CONVERGE_S, "the hole shown")
        alpha.reconfigure(discovery=False)
        await alpha.start()  # it gets beta's vector and deposits again from there
        await wait_texts(beta, "diary", {"one", "two", "three"})

        async def healed() -> dict[str, Any] | None:
            entry: dict[str, Any] = (await beta.request("GET", "/v1/relays"))["relays"][0]
            return entry if not entry.get("holes") and not entry.get("error") else None

        await beta.until(healed, CONVERGE_S, "the healed hole no longer shown")
        assert (await beta.status())["relays"][0].get("holes") is None
