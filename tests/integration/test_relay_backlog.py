"""A mailbox backlog far beyond any buffer reaches its device whole, through the relay only.

The writer goes offline for good once its envelopes are at the relay, so the relay is the only
source: every entry the writer acknowledged must arrive, and nothing may stay missing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from .daemons import DaemonProcess, RelayProcess, pair, start_all, wait_connected

BACKLOG_ENTRIES = 3000
MIN_ENVELOPES = 1000  # the point of the test: far more than any device-side buffer
DRAIN_S = 120.0


async def _wait_status(daemon: DaemonProcess, check: Callable[[dict[str, Any]], bool],
                       limit_s: float, what: str) -> dict[str, Any]:
    with trio.move_on_after(limit_s):
        while True:
            status = await daemon.status()
            if check(status):
                return status
            await trio.sleep(0.1)  # polled: status has no event for this counter
    raise AssertionError(f"{daemon.name}: timed out waiting for {what}: {await daemon.status()}"
                         f"\n--- log ---\n{daemon.log()[-4000:]}")


@pytest.mark.slow
async def test_a_backlog_of_thousands_of_envelopes_arrives_whole(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    alpha = DaemonProcess(tmp_path, "alpha", relays=[address])
    beta = DaemonProcess(tmp_path, "beta", relays=[address])
    try:
        await start_all([alpha, beta])
        await pair(alpha, beta)
        await wait_connected(alpha, 1)
        beta_key = (await beta.status())["device"]
        assert await beta.stop() == 0

        for n in range(BACKLOG_ENTRIES):
            await alpha.write("backlog", f"entry {n}")
        # Everything alpha acknowledged is at the relay before alpha goes away for good.
        status = await _wait_status(alpha, lambda s: s["relay_outbox"][beta_key]["behind"] == 0,
                                    60.0, "alpha's deposits for beta")
        queued = status["relay_outbox"][beta_key]["envelopes"]
        assert queued >= MIN_ENVELOPES, f"only {queued} envelopes queued: not a backlog"
        assert await alpha.stop() == 0

        beta.reconfigure(discovery=False)
        await beta.start()
        expected = (await beta.status())["entries"] + BACKLOG_ENTRIES
        status = await _wait_status(beta, lambda s: s["entries"] >= expected, DRAIN_S,
                                    f"{BACKLOG_ENTRIES} entries through the relay")
        texts = await beta.texts("backlog")
        assert sorted(texts) == sorted(f"entry {n}" for n in range(BACKLOG_ENTRIES))
        assert "relay.sequence" not in beta.log() and "out-of-order" not in beta.log(), status
    finally:
        for process in (alpha, beta, relay):
            process.kill()
        await trio.lowlevel.checkpoint()
