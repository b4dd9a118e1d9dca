"""Real daemons and a real relay process: the mailbox path when the LAN cannot connect them."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from .daemons import (
    CONVERGE_S,
    ApiFailure,
    pair,
    start_all,
    wait_connected,
    wait_texts,
)
from .relayed import pair_through_relay, relay_and_daemons


async def test_offline_device_catches_up_through_the_relay(tmp_path: Path) -> None:
    async with relay_and_daemons(tmp_path, ["alpha", "beta"]) as setup:
        relay, (alpha, beta) = setup.relay, setup.daemons
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


async def test_recovery_from_the_words_alone(tmp_path: Path) -> None:
    async with relay_and_daemons(tmp_path, ["original", "phoenix"], discovery=False,
                                 start=False) as setup:
        address, (original, phoenix) = setup.address, setup.daemons
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


async def test_two_relays_one_wiped_loses_nothing(tmp_path: Path) -> None:
    async with relay_and_daemons(tmp_path, ["alpha", "beta"],
                                 relay_names=("relay-1", "relay-2")) as setup:
        first, (alpha, beta) = setup.relays[0], setup.daemons
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


async def test_pairing_through_the_relay_across_networks(tmp_path: Path) -> None:
    async with relay_and_daemons(tmp_path, start=False) as setup:
        # No mDNS at all: the two devices cannot see each other, only the relay.
        address = setup.address
        home = setup.daemon("home", discovery=False)
        away = setup.daemon("away", use_relay=False, discovery=False)
        stranger = setup.daemon("stranger", use_relay=False, discovery=False)
        await start_all([home, away, stranger])
        code, joined = await pair_through_relay(home, away, address)
        assert len(joined["sas"]) == 4
        assert {d["name"] for d in joined["devices"]} == {"home", "away"}
        await home.write("chat", "paired across networks")
        await wait_texts(away, "chat", {"paired across networks"})
        with pytest.raises(ApiFailure) as spent:  # one attempt: the relay's offer is gone
            await stranger.request("POST", "/v1/join", {"code": code, "relay": address})
        assert spent.value.code == "invitation-not-found"
