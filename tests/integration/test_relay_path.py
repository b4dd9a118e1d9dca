"""A device that syncs only through a relay shows the relay path in peers and metrics (F10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from meshd.api.client import Client

from .daemons import CONVERGE_S, DaemonProcess, RelayProcess, start_all, wait_texts


@pytest.mark.slow
async def test_peers_and_metrics_show_the_relay_path(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    # No mDNS: the two devices reach each other only through the relay.
    home = DaemonProcess(tmp_path, "home", relays=[address], discovery=False)
    away = DaemonProcess(tmp_path, "away", discovery=False)
    try:
        await start_all([home, away])

        async def relay_up() -> bool:
            return all(r.get("connected") for r in (await home.status())["relays"])

        await home.until(relay_up, CONVERGE_S, "home's relay connection")
        code = (await home.request("POST", "/v1/invite"))["code"]
        await away.request("POST", "/v1/join", {"code": code, "relay": address})
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
    finally:
        for process in (home, away, relay):
            process.kill()
        await trio.lowlevel.checkpoint()
