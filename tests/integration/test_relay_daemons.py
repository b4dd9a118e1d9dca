"""Real daemons and a real relay process: the mailbox path when the LAN cannot connect them."""

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
    wait_texts,
)


async def test_offline_device_catches_up_through_the_relay(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    alpha = DaemonProcess(tmp_path, "alpha", relays=[address])
    beta = DaemonProcess(tmp_path, "beta", relays=[address])
    try:
        await start_all([alpha, beta])
        await pair(alpha, beta)
        await wait_connected(beta, 1)
        await alpha.write("chat", "said on the LAN")
        await wait_texts(beta, "chat", {"said on the LAN"})

        # beta leaves; alpha writes; beta comes back where the LAN cannot reach alpha.
        assert await beta.stop() == 0
        secret = "written while beta was away: plaintext-canary-7f3a"
        await alpha.write("chat", secret)

        async def relay_connected() -> bool:
            return any(r.get("connected") for r in (await alpha.status())["relays"])

        await alpha.until(relay_connected, CONVERGE_S, "alpha's relay connection")
        beta.reconfigure(discovery=False)
        await beta.start()
        await wait_texts(beta, "chat", {"said on the LAN", secret})
        peers = (await beta.request("GET", "/v1/peers"))["peers"]
        assert [p["connected"] for p in peers] == [False], "the entry came through the relay only"

        # The relay stored ciphertext only.
        relay.kill()
        assert relay.files_contain(b"plaintext-canary-7f3a") == []
        assert relay.files_contain(secret.encode()) == []
    finally:
        for process in (alpha, beta, relay):
            process.kill()
        await trio.lowlevel.checkpoint()


async def test_recovery_from_the_words_alone(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    original = DaemonProcess(tmp_path, "original", relays=[address], discovery=False)
    phoenix = DaemonProcess(tmp_path, "phoenix", relays=[address], discovery=False)
    try:
        await original.start()
        words = (await original.request("POST", "/v1/recovery-key"))["words"]
        assert len(words) == 24
        for i in range(5):
            await original.write("diary", f"entry {i}")

        async with original.event_stream() as events:
            with trio.fail_after(CONVERGE_S):
                while True:
                    event = await events.next()
                    if event.get("type") == "relay.backup" and event["data"]["entries"] == 5:
                        break
        original.kill()  # every device is lost; the words and the relay remain

        await phoenix.start()
        typo = words[:-1] + ["abandon" if words[-1] != "abandon" else "ability"]
        with pytest.raises(ApiFailure) as refused:
            await phoenix.request("POST", "/v1/recover", {"words": typo, "relay": address})
        assert refused.value.code == "bad-words"
        preview = await phoenix.request("POST", "/v1/recover",
                                        {"words": words, "relay": address, "preview": True})
        assert [d["name"] for d in preview["devices"]] == ["original"]
        result = await phoenix.request("POST", "/v1/recover", {
            "words": words, "relay": address, "readmit": [d["device"] for d in preview["devices"]]})
        assert result["restored_entries"] == 5
        # Which backup, from where, and that newer state may exist elsewhere.
        assert result["relay"] == address and result["backup_version"] >= 1
        assert f"backup version {result['backup_version']} from relay {address}" in result["warning"]
        assert "may hold newer state" in result["warning"]
        assert await phoenix.texts("diary") == [f"entry {i}" for i in range(5)]
        status = await phoenix.status()
        assert status["member"] and status["devices"] == 2  # original (lost) and phoenix
        assert "RECOVERY" in phoenix.log()
    finally:
        for process in (original, phoenix, relay):
            process.kill()


async def test_two_relays_one_wiped_loses_nothing(tmp_path: Path) -> None:
    first, second = RelayProcess(tmp_path, "relay-1"), RelayProcess(tmp_path, "relay-2")
    addresses = [await first.start(), await second.start()]
    alpha = DaemonProcess(tmp_path, "alpha", relays=addresses)
    beta = DaemonProcess(tmp_path, "beta", relays=addresses)
    try:
        await start_all([alpha, beta])
        await pair(alpha, beta)
        await wait_connected(beta, 1)
        assert await beta.stop() == 0
        # The first relay dies and loses its disk; the circle goes on with the second.
        first.kill()
        for path in sorted(first.state_dir.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        await alpha.write("chat", "kept by the relay that survived")
        beta.reconfigure(discovery=False)
        await beta.start()
        await wait_texts(beta, "chat", {"kept by the relay that survived"})
    finally:
        for process in (alpha, beta, first, second):
            process.kill()


async def test_pairing_through_the_relay_across_networks(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    # No mDNS at all: the two devices cannot see each other, only the relay.
    home = DaemonProcess(tmp_path, "home", relays=[address], discovery=False)
    away = DaemonProcess(tmp_path, "away", discovery=False)
    stranger = DaemonProcess(tmp_path, "stranger", discovery=False)
    try:
        await start_all([home, away, stranger])

        async def relay_up() -> bool:
            return all(r.get("connected") for r in (await home.status())["relays"])

        await home.until(relay_up, CONVERGE_S, "home's relay connection")
        code = (await home.request("POST", "/v1/invite"))["code"]
        joined = await away.request("POST", "/v1/join", {"code": code, "relay": address})
        assert len(joined["sas"]) == 4
        assert {d["name"] for d in joined["devices"]} == {"home", "away"}
        await home.write("chat", "paired across networks")
        await wait_texts(away, "chat", {"paired across networks"})
        with pytest.raises(ApiFailure) as spent:  # one attempt: the relay's offer is gone
            await stranger.request("POST", "/v1/join", {"code": code, "relay": address})
        assert spent.value.code == "invitation-not-found"
    finally:
        for process in (home, away, stranger, relay):
            process.kill()
