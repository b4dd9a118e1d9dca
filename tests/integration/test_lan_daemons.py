"""Real daemons on loopback: pairing by code, mDNS discovery, sync, restarts, removal.

Every daemon is a separate `meshd run` process with mDNS bound to 127.0.0.1. The namespace
variants of these scenarios (separate hosts, cut links, packet loss) are in tests/netns/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .daemons import (
    CONVERGE_S,
    ApiFailure,
    DaemonProcess,
    connected_count,
    form_circle,
    pair,
    start_all,
    wait_connected,
    wait_texts,
)


@pytest.fixture
async def circle_of_three(tmp_path: Path):
    daemons = [DaemonProcess(tmp_path, name) for name in ("alpha", "beta", "gamma")]
    try:
        await form_circle(daemons)
        yield daemons
    finally:
        for daemon in daemons:
            daemon.kill()


async def test_three_daemons_pair_discover_and_sync(circle_of_three: list[DaemonProcess]) -> None:
    alpha, beta, gamma = circle_of_three
    statuses = [await d.status() for d in circle_of_three]
    assert len({s["circle"] for s in statuses}) == 1, "all three must share one circle"
    assert all(s["devices"] == 3 for s in statuses)
    for daemon in circle_of_three:
        await daemon.write("chat", f"hello from {daemon.name}")
    expected = {f"hello from {d.name}" for d in circle_of_three}
    views = [await wait_texts(d, "chat", expected) for d in circle_of_three]
    assert views[0] == views[1] == views[2], "every device shows the same order"


@pytest.mark.slow  # the second join waits out the 15 s search for the burned invitation
async def test_wrong_code_burns_the_invitation(tmp_path: Path) -> None:
    inviter, joiner = DaemonProcess(tmp_path, "inviter"), DaemonProcess(tmp_path, "joiner")
    try:
        await start_all([inviter, joiner])
        invitation = await inviter.request("POST", "/v1/invite")
        nameplate, first, second = invitation["code"].split("-")
        wrong_word = "zoo" if first != "zoo" else "abandon"
        with pytest.raises(ApiFailure) as wrong:
            await joiner.request("POST", "/v1/join", {"code": f"{nameplate}-{wrong_word}-{second}"})
        # The joiner cannot tell a wrong code from an inviter that gave up (pairing.md):
        # PairingAborted, 403 aborted. Any other failure (404, 502...) is a bug here.
        assert (wrong.value.status, wrong.value.code) == (403, "aborted"), wrong.value
        with pytest.raises(ApiFailure) as spent:  # the right code, but its one attempt is spent
            await joiner.request("POST", "/v1/join", {"code": invitation["code"]})
        # The burned invitation is no longer offered on the LAN: the joiner cannot find it.
        assert (spent.value.status, spent.value.code) == (404, "invitation-not-found"), spent.value
        assert (await joiner.status())["devices"] == 1
        assert (await inviter.status())["devices"] == 1
        assert "burned" in inviter.log()
    finally:
        inviter.kill()
        joiner.kill()


async def test_restart_reconnects_and_catches_up(circle_of_three: list[DaemonProcess]) -> None:
    alpha, beta, gamma = circle_of_three
    gamma.kill()  # SIGKILL: no goodbye, the others notice the dead connection
    await alpha.write("chat", "written while gamma was down")
    await gamma.start()
    await wait_connected(gamma, 2)
    await wait_texts(gamma, "chat", {"written while gamma was down"})


async def test_sigterm_stops_cleanly_within_five_seconds(circle_of_three: list[DaemonProcess]) -> None:
    alpha, beta, _ = circle_of_three
    started = trio.current_time()
    assert await beta.stop(limit_s=5.0) == 0
    assert trio.current_time() - started < 5.0
    assert not beta.socket_path.exists(), "the API socket is removed on a clean stop"

    async def beta_gone() -> bool:
        return await connected_count(alpha) == 1

    await alpha.until(beta_gone, CONVERGE_S, "beta's connection to close")


async def test_removed_device_is_locked_out(circle_of_three: list[DaemonProcess]) -> None:
    alpha, beta, gamma = circle_of_three
    gamma_id = (await gamma.status())["device"]
    epoch_before = (await alpha.status())["epoch"]
    result = await alpha.request("POST", f"/v1/devices/{gamma_id[:16]}/remove")
    assert result["removed"] == gamma_id
    assert result["epoch"] > epoch_before

    async def gamma_dropped(daemon: DaemonProcess) -> bool:
        peers = (await daemon.request("GET", "/v1/peers"))["peers"]
        return all(p["device"] != gamma_id for p in peers)

    for daemon in (alpha, beta):
        await daemon.until(lambda d=daemon: gamma_dropped(d), CONVERGE_S, "gamma to be dropped")
    await alpha.write("chat", "after gamma's removal")
    await wait_texts(beta, "chat", {"after gamma's removal"})
    assert "after gamma's removal" not in await gamma.texts("chat")
    # gamma is handed its removal notice when it dials again, and from then on dials no one,
    # even told alpha's address (tests/integration/test_removal_notice.py has the details).
    async def gamma_told() -> bool:
        return (await gamma.status())["member"] is False

    await gamma.until(gamma_told, CONVERGE_S, "gamma to learn it was removed")
    await gamma.stop()
    gamma.reconfigure(peers=(await alpha.status())["listen"])
    await gamma.start()
    assert (await gamma.status())["member"] is False
    assert (await gamma.request("GET", "/v1/peers"))["peers"] == []
    assert "after gamma's removal" not in await gamma.texts("chat")


def test_bad_config_stops_startup_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "meshd.toml"
    config.write_text('listen = "127.0.0.1:0"\nsurprise = 1\n')
    result = subprocess.run([sys.executable, "-m", "meshd", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78  # EX_CONFIG: the units do not restart on it
    assert "surprise" in result.stderr


async def test_meshctl_against_a_real_daemon(circle_of_three: list[DaemonProcess]) -> None:
    alpha, beta, _ = circle_of_three

    def meshctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meshd.cmd.meshctl", "--socket", str(daemon.socket_path),
                               *args], capture_output=True, text=True, timeout=30)

    sent = await trio.to_thread.run_sync(meshctl, alpha, "send", "chat", "via meshctl")
    assert sent.returncode == 0, sent.stderr
    await wait_texts(beta, "chat", {"via meshctl"})
    shown = await trio.to_thread.run_sync(meshctl, beta, "log", "chat")
    assert "via meshctl" in shown.stdout
    devices = await trio.to_thread.run_sync(meshctl, beta, "--json", "devices")
    assert {d["name"] for d in json.loads(devices.stdout)} == {"alpha", "beta", "gamma"}
    missing = await trio.to_thread.run_sync(
        lambda: subprocess.run([sys.executable, "-m", "meshd.cmd.meshctl", "--socket", "/nonexistent/meshd.sock",
                                "status"], capture_output=True, text=True, timeout=30))
    assert missing.returncode == 3 and "meshd" in missing.stderr


async def test_both_sides_show_the_same_check_words(tmp_path: Path) -> None:
    inviter, joiner = DaemonProcess(tmp_path, "inviter"), DaemonProcess(tmp_path, "joiner")
    try:
        await start_all([inviter, joiner])
        async with inviter.event_stream() as events:  # subscribed before the code exists
            joined = await pair(inviter, joiner)
            with trio.fail_after(CONVERGE_S):
                while (event := await events.next()).get("type") != "pair.joined":
                    pass
        assert event["data"]["name"] == "joiner"
        assert event["data"]["sas"] == joined["sas"] and len(joined["sas"]) == 4
    finally:
        inviter.kill()
        joiner.kill()
