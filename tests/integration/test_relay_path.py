"""A device that syncs only through a relay shows the relay path in peers and metrics (F10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from meshd.api.client import Client

from .daemons import CONVERGE_S, start_all, wait_texts
from .relayed import pair_through_relay, relay_and_daemons


@pytest.mark.slow
async def test_peers_and_metrics_show_the_relay_path(tmp_path: Path) -> None:
    async with relay_and_daemons(tmp_path, start=False) as setup:
        # No mDNS: the two devices reach each other only through the relay.
        relay = setup.relay
        home = setup.daemon("home", discovery=False)
        away = setup.daemon("away", use_relay=False, discovery=False)
        await start_all([home, away])
        await pair_through_relay(home, away, setup.address)
        await home.write("chat", "through the relay only")
        await wait_texts(away, "chat", {"through the relay only"})

        peers = (await away.request("GET", "/v1/peers"))["peers"]
        assert [(p["name"], p["connected"], p["path"]) for p in peers] == [("home", False, "relay")]
        assert isinstance(peers[0]["last_seen"], float)
        metrics = await trio.to_thread.run_sync(Client(away.socket_path).metrics)
        assert 'meshd_peers{path="relay"} 1' in metrics and 'meshd_peers{path="lan"} 0' in metrics

        # The path is only as good as the relay's connection.
        relay.kill()

        async def relay_down() -> bool:
            return not any(r.get("connected") for r in (await away.status())["relays"])

        await away.until(relay_down, CONVERGE_S, "away to notice the relay is gone")
        peers = (await away.request("GET", "/v1/peers"))["peers"]
        assert [p["path"] for p in peers] == [None]
