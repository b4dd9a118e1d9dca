"""Recovery takes the freshest circle among all relays and re-admits no device silently.

Real daemons and real relay processes. A stale relay (down while a thief's device was
removed) serves the circle from before the removal; protocol/relay.md, "Recovery".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from .daemons import (
    CONVERGE_S,
    ApiFailure,
    DaemonProcess,
    RelayProcess,
    pair,
    start_all,
    wait_connected,
)

pytestmark = pytest.mark.slow


async def _backed_up_at(daemon: DaemonProcess, relay: str, action) -> None:  # noqa: ANN001
    """Run action, then wait for a backup at `relay` that follows it (records included)."""
    async with daemon.event_stream() as events:
        await action()
        with trio.fail_after(CONVERGE_S):
            while True:
                event = await events.next()
                if event.get("type") == "relay.backup" and event["data"]["relay"] == relay:
                    return


async def _lose_the_thief_while_one_relay_is_down(tmp_path: Path) -> tuple[list[str], RelayProcess, RelayProcess, str, str]:
    """alpha and thief with relays fresh and stale; the thief is removed while stale is down;
    then every device is lost. Returns the words, both relays and both device ids."""
    fresh, stale = RelayProcess(tmp_path, "fresh"), RelayProcess(tmp_path, "stale")
    addresses = [await fresh.start(), await stale.start()]
    alpha = DaemonProcess(tmp_path, "alpha", relays=addresses)
    thief = DaemonProcess(tmp_path, "thief", relays=addresses)
    try:
        await start_all([alpha, thief])
        await pair(alpha, thief)
        await wait_connected(alpha, 1)
        words = (await alpha.request("POST", "/v1/recovery-key"))["words"]
        await _backed_up_at(alpha, addresses[1], lambda: alpha.write("diary", "before"))
        thief_id = (await thief.status())["device"]
        alpha_id = (await alpha.status())["device"]
        stale.kill()
        thief.kill()
        await _backed_up_at(alpha, addresses[0],
                            lambda: alpha.request("POST", f"/v1/devices/{thief_id[:16]}/remove"))
    finally:
        alpha.kill()
        thief.kill()
    assert await stale.start() == addresses[1]  # back, with the circle from before the removal
    return words, fresh, stale, alpha_id, thief_id


async def test_recovery_takes_the_freshest_relay(tmp_path: Path) -> None:
    words, fresh, stale, alpha_id, thief_id = await _lose_the_thief_while_one_relay_is_down(tmp_path)
    phoenix = DaemonProcess(tmp_path, "phoenix", relays=[fresh.address, stale.address], discovery=False)
    try:
        await phoenix.start()
        preview = await phoenix.request("POST", "/v1/recover",
                                        {"words": words, "relay": stale.address, "preview": True})
        assert [d["device"] for d in preview["devices"]] == [alpha_id], "the removal on one relay counts"
        assert preview["relays"] == {fresh.address: "ok", stale.address: "ok"}
        assert preview["devices"][0]["last_seen"] is not None
        assert (await phoenix.status())["devices"] == 1, "a preview changes nothing"
        with pytest.raises(ApiFailure) as unconfirmed:
            await phoenix.request("POST", "/v1/recover", {"words": words, "relay": stale.address})
        assert (unconfirmed.value.status, unconfirmed.value.code) == (409, "confirm-devices")
        result = await phoenix.request("POST", "/v1/recover",
                                       {"words": words, "relay": stale.address, "readmit": [alpha_id]})
        assert result["restored_entries"] >= 1 and result["removed"] == []
        status = await phoenix.status()
        assert status["member"] and status["devices"] == 2
        listed = (await phoenix.request("GET", "/v1/devices"))["devices"]
        assert thief_id not in {d["device"] for d in listed}
    finally:
        for process in (phoenix, fresh, stale):
            process.kill()


async def test_a_stale_relay_alone_cannot_readmit_without_the_owner(tmp_path: Path) -> None:
    words, fresh, stale, alpha_id, thief_id = await _lose_the_thief_while_one_relay_is_down(tmp_path)
    fresh.kill()
    phoenix = DaemonProcess(tmp_path, "phoenix", discovery=False)
    try:
        await phoenix.start()
        preview = await phoenix.request("POST", "/v1/recover",
                                        {"words": words, "relay": stale.address, "preview": True})
        # The stale relay still lists the thief: the owner sees it and keeps only alpha.
        assert sorted(d["device"] for d in preview["devices"]) == sorted([alpha_id, thief_id])
        result = await phoenix.request("POST", "/v1/recover",
                                       {"words": words, "relay": stale.address, "readmit": [alpha_id]})
        assert result["removed"] == [thief_id]
        listed = (await phoenix.request("GET", "/v1/devices"))["devices"]
        assert {d["device"] for d in listed} == {alpha_id, (await phoenix.status())["device"]}
    finally:
        for process in (phoenix, fresh, stale):
            process.kill()
