"""A removed device learns it was removed; removing oneself or the last device needs force.

Real `meshd run` processes (and a real relay process) on loopback. protocol/circle.md,
"Removal notice" and "Removing oneself, or the last device".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .daemons import (
    CONVERGE_S,
    ApiFailure,
    DaemonProcess,
    RelayProcess,
    connected_count,
    form_circle,
    pair,
    start_all,
    wait_connected,
)

pytestmark = pytest.mark.slow


async def _until_removed(daemon: DaemonProcess) -> None:
    async def told() -> bool:
        return (await daemon.status())["member"] is False

    await daemon.until(told, CONVERGE_S, f"{daemon.name} to learn it was removed")


async def _refuses_as_removed(daemon: DaemonProcess) -> None:
    # Every route flagged W (meshd/api/routes.py) is refused; adding a relay would dial it.
    relay = "127.0.0.1:9#" + "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"  # bytes 0..31
    for method, target, body in (("POST", "/v1/streams/chat/records", {"body": "after removal"}),
                                 ("POST", "/v1/invite", None),
                                 ("POST", "/v1/relays", {"address": relay}),
                                 ("POST", "/v1/rename", {"name": "still here"})):
        with pytest.raises(ApiFailure) as refused:
            await daemon.request(method, target, body)
        assert (refused.value.status, refused.value.code) == (409, "not-a-member")
    assert await daemon.request("GET", "/v1/peers") == {"peers": []}, "it dials no one"
    assert relay not in str(await daemon.request("GET", "/v1/relays")), "nor a relay"
    assert await connected_count(daemon) == 0


async def test_a_removed_device_is_told_by_a_member(tmp_path: Path) -> None:
    daemons = [DaemonProcess(tmp_path, name) for name in ("alpha", "beta", "gamma")]
    alpha, beta, gamma = daemons
    try:
        await form_circle(daemons)
        gamma_id = (await gamma.status())["device"]
        # gamma is connected when alpha removes it: alpha closes that connection, gamma
        # dials again, and alpha answers that handshake with the removal notice only.
        await alpha.request("POST", f"/v1/devices/{gamma_id[:16]}/remove")
        await _until_removed(gamma)
        await _refuses_as_removed(gamma)
        assert "removed from the circle" in gamma.log()
        await alpha.write("chat", "after gamma's removal")
        assert "after gamma's removal" not in await gamma.texts("chat")
        assert (await beta.status())["member"] and (await beta.status())["devices"] == 2
    finally:
        for daemon in daemons:
            daemon.kill()


async def test_a_removed_device_is_told_by_the_relay(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    alpha = DaemonProcess(tmp_path, "alpha", relays=[address])
    beta = DaemonProcess(tmp_path, "beta", relays=[address])
    gamma = DaemonProcess(tmp_path, "gamma", relays=[address])
    try:
        await start_all([alpha, beta, gamma])
        await pair(alpha, beta)
        await pair(alpha, gamma)
        await wait_connected(gamma, 2)
        gamma_id = (await gamma.status())["device"]
        assert await gamma.stop() == 0
        await alpha.request("POST", f"/v1/devices/{gamma_id[:16]}/remove")
        # gamma comes back where it can reach no member: only the relay can tell it.
        gamma.reconfigure(discovery=False)
        await gamma.start()
        await _until_removed(gamma)
        await _refuses_as_removed(gamma)
        assert all(not r["connected"] for r in (await gamma.status())["relays"]), "it stopped dialling"
    finally:
        for process in (alpha, beta, gamma, relay):
            process.kill()


async def test_removing_oneself_or_the_last_device_needs_force(tmp_path: Path) -> None:
    alpha, beta = DaemonProcess(tmp_path, "alpha"), DaemonProcess(tmp_path, "beta")
    try:
        await form_circle([alpha, beta])
        alpha_id = (await alpha.status())["device"]
        with pytest.raises(ApiFailure) as refused:
            await alpha.request("POST", f"/v1/devices/{alpha_id[:16]}/remove")
        assert (refused.value.status, refused.value.code) == (409, "needs-force")
        assert (await alpha.status())["member"] and (await alpha.status())["devices"] == 2
        await alpha.request("POST", f"/v1/devices/{alpha_id[:16]}/remove?force=1")
        assert (await alpha.status())["member"] is False

        async def beta_was_told() -> bool:  # alpha announced its own removal before leaving
            return (await beta.status())["devices"] == 1

        await beta.until(beta_was_told, CONVERGE_S, "beta to learn that alpha removed itself")
        # beta is now the last device: removing it (itself) needs force twice over.
        beta_id = (await beta.status())["device"]
        with pytest.raises(ApiFailure) as last:
            await beta.request("POST", f"/v1/devices/{beta_id[:16]}/remove")
        assert last.value.code == "needs-force"
        assert (await beta.status())["member"]
    finally:
        for daemon in (alpha, beta):
            daemon.kill()
