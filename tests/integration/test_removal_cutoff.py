"""Removing a device undoes what its entries past the removal point did, on every device and
across restarts (protocol/logs.md, "A removed member's entries").

Real `meshd run` processes on loopback: alpha, beta and a stolen gamma. gamma writes a
message everyone keeps, then floods the chat and another stream; alpha removes it with
--distrust-since a time between the two. alpha's and beta's views drop the flood, keep the
message, stay so after both restart, and the two still sync.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from .daemons import CONVERGE_S, DaemonProcess, form_circle, start_all, wait_connected, wait_texts

pytestmark = pytest.mark.slow


async def _until_texts(daemon: DaemonProcess, stream: str, expected: list[str]) -> None:
    async def check() -> bool:
        return await daemon.texts(stream) == expected

    await daemon.until(check, CONVERGE_S, f"exactly {expected} in {stream}")


async def test_a_removed_devices_later_entries_stop_counting_everywhere(tmp_path: Path) -> None:
    daemons = [DaemonProcess(tmp_path, name) for name in ("alpha", "beta", "gamma")]
    alpha, beta, gamma = daemons
    try:
        await form_circle(daemons)
        await alpha.write("chat", "alpha 1")
        await gamma.write("chat", "gamma before")
        for daemon in (alpha, beta):
            await wait_texts(daemon, "chat", {"alpha 1", "gamma before"})
        [before] = [r for r in await gamma.records("chat") if r["body"] == "gamma before"]
        distrust_since_ms = (before["hlc"] >> 16) + 1
        # The flood must be dated from that time on: what is awaited is the wall clock
        # itself (gamma's is ours), at most 2 ms.
        await trio.sleep(max(0.0, (distrust_since_ms + 1) / 1000 - time.time()))
        flood = [f"spam {i}" for i in range(5)]
        for text in flood:
            await gamma.write("chat", text)
        await gamma.write("junk", "more spam")
        for daemon in (alpha, beta):
            await wait_texts(daemon, "chat", {"alpha 1", "gamma before", *flood})
            await wait_texts(daemon, "junk", {"more spam"})

        gamma_id = (await gamma.status())["device"]
        removed = await alpha.request(
            "POST", f"/v1/devices/{gamma_id[:16]}/remove?distrust_since={distrust_since_ms}")
        assert removed["counts_up_to"] >= 1  # gamma's first entry counts, the flood does not
        for daemon in (alpha, beta):
            await _until_texts(daemon, "chat", ["alpha 1", "gamma before"])
            await _until_texts(daemon, "junk", [])
        assert "past its removal point dropped" in beta.log()
        gamma.kill()

        for daemon in (alpha, beta):
            assert await daemon.stop() == 0
        await start_all([alpha, beta])
        await wait_connected(alpha, 1)
        for daemon in (alpha, beta):
            assert await daemon.texts("chat") == ["alpha 1", "gamma before"]
            assert await daemon.texts("junk") == []
        await beta.write("chat", "beta after")
        await _until_texts(alpha, "chat", ["alpha 1", "gamma before", "beta after"])
    finally:
        for daemon in daemons:
            daemon.kill()
