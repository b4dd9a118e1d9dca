"""Pairing through a relay cannot be spoiled by a stranger who does not know the code.

Real daemons and a real relay process; the stranger is a real relay client in this process
(`open_join_pipe`, fresh keys, no code). protocol/pairing.md ("The invitation") and
protocol/relay.md ("Rendezvous").
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.relay import NO_OFFER, RATE_LIMITED, RelayError
from meshd.relay.pipe import PipeStream, open_join_pipe
from meshd.relay.rendezvous import NO_OFFER_RETRY_DELAY_S, NO_OFFER_RETRY_S

from .daemons import CONVERGE_S, DaemonProcess, RelayProcess, start_all

pytestmark = pytest.mark.slow

# The relay's default per-address join burst (protocol/relay.md, "Rate").
JOIN_BURST = 20


async def _inviting_home(tmp_path: Path) -> tuple[RelayProcess, str, DaemonProcess, DaemonProcess, str]:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    # No mDNS: the devices find each other through the relay only.
    home = DaemonProcess(tmp_path, "home", relays=[address], discovery=False)
    away = DaemonProcess(tmp_path, "away", discovery=False)
    await start_all([home, away])

    async def relay_up() -> bool:
        return all(r.get("connected") for r in (await home.status())["relays"])

    await home.until(relay_up, CONVERGE_S, "home's relay connection")
    code = (await home.request("POST", "/v1/invite"))["code"]
    return relay, address, home, away, code


async def _join_once_offered(address: str, nameplate: int) -> PipeStream:
    """Join as a device does: /v1/invite answers before its offer reaches the relay, so a
    joiner told "no-offer" tries again for a while (meshd/relay/rendezvous.py)."""
    deadline = trio.current_time() + NO_OFFER_RETRY_S
    while True:
        try:
            return await open_join_pipe(address, DHKeyPair.generate(os.urandom), nameplate)
        except RelayError as err:
            if err.code != NO_OFFER or trio.current_time() >= deadline:
                raise
        await trio.sleep(NO_OFFER_RETRY_DELAY_S)


async def test_a_stranger_who_joins_and_leaves_spoils_nothing(tmp_path: Path) -> None:
    relay, address, home, away = None, "", None, None
    try:
        relay, address, home, away, code = await _inviting_home(tmp_path)
        nameplate = int(code.split("-")[0])
        stranger = await _join_once_offered(address, nameplate)
        await stranger.send_all(b"not a pairing handshake")
        await stranger.aclose()  # it took the relay's offer, and leaves without an attempt
        joined = await away.request("POST", "/v1/join", {"code": code, "relay": address})
        assert {d["name"] for d in joined["devices"]} == {"home", "away"}
    finally:
        for process in (home, away, relay):
            if process is not None:
                process.kill()


async def test_probing_from_the_same_address_does_not_block_the_joiner(tmp_path: Path) -> None:
    relay, address, home, away = None, "", None, None
    try:
        relay, address, home, away, code = await _inviting_home(tmp_path)
        nameplate = int(code.split("-")[0])
        # A stranger on the same address (loopback, like a shared NAT) probes nameplates
        # until its address is rate-limited.
        codes = []
        for probe in [n for n in range(1, 1000) if n != nameplate][:JOIN_BURST + 2]:
            with pytest.raises(RelayError) as refused:
                await open_join_pipe(address, DHKeyPair.generate(os.urandom), probe)
            codes.append(refused.value.code)
        assert codes[0] == NO_OFFER and codes[-1] == RATE_LIMITED
        joined = await away.request("POST", "/v1/join", {"code": code, "relay": address})
        assert {d["name"] for d in joined["devices"]} == {"home", "away"}
    finally:
        for process in (home, away, relay):
            if process is not None:
                process.kill()
