"""A relay added or removed on one device reaches every member of the circle (F7)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
import trio

from meshd.cmd import meshctl

from .daemons import (
    CONVERGE_S,
    ApiFailure,
    DaemonProcess,
    form_circle,
    wait_connected,
    wait_texts,
)
from .relayed import relay_and_daemons


async def relay_addresses(daemon: DaemonProcess) -> list[str]:
    return [r["address"] for r in (await daemon.request("GET", "/v1/relays"))["relays"]]


@pytest.mark.slow
async def test_relay_changes_reach_the_other_members(tmp_path: Path) -> None:
    async with relay_and_daemons(tmp_path, ["alpha", "beta"], use_relay=False, start=False) as setup:
        address, (alpha, beta) = setup.address, setup.daemons
        await form_circle([alpha, beta])
        await alpha.request("POST", "/v1/relays", {"address": address})

        async def beta_uses_it() -> bool:
            return address in await relay_addresses(beta)

        await beta.until(beta_uses_it, CONVERGE_S, "beta to take up the relay alpha added")

        # And beta really uses it: away from the LAN, it catches up through that relay.
        assert await beta.stop() == 0
        await alpha.write("chat", "through the shared relay")

        async def alpha_connected() -> bool:
            return any(r.get("connected") for r in (await alpha.status())["relays"])

        await alpha.until(alpha_connected, CONVERGE_S, "alpha's relay connection")
        beta.reconfigure(discovery=False)
        await beta.start()
        await wait_texts(beta, "chat", {"through the shared relay"})
        assert [p["connected"] for p in (await beta.request("GET", "/v1/peers"))["peers"]] == [False]

        # Removal travels the same way (here over the LAN again).
        assert await beta.stop() == 0
        beta.reconfigure(discovery=True)
        await beta.start()
        await wait_connected(beta, 1)
        removed = await alpha.request("DELETE", f"/v1/relays/{quote(address, safe='')}")
        assert removed["address"] == address and await relay_addresses(alpha) == []

        async def beta_dropped_it() -> bool:
            return address not in await relay_addresses(beta)

        await beta.until(beta_dropped_it, CONVERGE_S, "beta to drop the relay alpha removed")
        with pytest.raises(ApiFailure) as unknown:
            await beta.request("DELETE", f"/v1/relays/{quote(address, safe='')}")
        assert (unknown.value.status, unknown.value.code) == (404, "unknown-relay")


@pytest.mark.slow
async def test_a_relay_of_the_config_file_is_removed_only_there(tmp_path: Path) -> None:
    async with relay_and_daemons(tmp_path, ["alpha"], discovery=False) as setup:
        address, (alpha,) = setup.address, setup.daemons
        with pytest.raises(ApiFailure) as refused:
            await alpha.request("DELETE", f"/v1/relays/{quote(address, safe='')}")
        assert (refused.value.status, refused.value.code) == (409, "relay-in-config")
        assert str(alpha.config_path) in str(refused.value)
        assert await relay_addresses(alpha) == [address]
        # meshctl says so in words, with the daemon's reason.
        code = await trio.to_thread.run_sync(
            meshctl.main, ["--socket", str(alpha.socket_path), "relay", "remove", address])
        assert code == meshctl.EXIT_DAEMON_ERROR
