"""F4 (issue 15): recovery keeps what a device wrote before it was removed, or says it did not.

Real daemons and a real relay process. protocol/relay.md, "Recovery".
"""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from .daemons import (
    CONVERGE_S,
    DaemonProcess,
    RelayProcess,
    pair,
    start_all,
    wait_connected,
    wait_texts,
)

pytestmark = pytest.mark.slow


async def _backed_up_at(daemon: DaemonProcess, relay: str, action) -> None:  # noqa: ANN001
    async with daemon.event_stream() as events:
        await action()
        with trio.fail_after(CONVERGE_S):
            while True:
                event = await events.next()
                if event.get("type") == "relay.backup" and event["data"]["relay"] == relay:
                    return


async def test_recovery_keeps_a_removed_devices_messages(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    alpha = DaemonProcess(tmp_path, "alpha", relays=[address])
    beta = DaemonProcess(tmp_path, "beta", relays=[address])
    phoenix = DaemonProcess(tmp_path, "phoenix", relays=[address], discovery=False)
    try:
        await start_all([alpha, beta])
        await pair(alpha, beta)
        await wait_connected(alpha, 1)
        words = (await alpha.request("POST", "/v1/recovery-key"))["words"]
        await alpha.write("notes", "from alpha")
        await beta.write("notes", "from beta")
        await wait_texts(alpha, "notes", {"from alpha", "from beta"})
        beta_id = (await beta.status())["device"]
        alpha_id = (await alpha.status())["device"]
        beta.kill()
        await _backed_up_at(alpha, address,
                            lambda: alpha.request("POST", f"/v1/devices/{beta_id[:16]}/remove"))
        alpha.kill()
        await phoenix.start()
        preview = await phoenix.request("POST", "/v1/recover", {"words": words, "preview": True})
        told = [(d["device"], d["backed_up"]) for d in preview["removed_before"]]
        assert told == [(beta_id, 1)], "the owner is told which removed device's entries are kept"
        assert "beta" in preview["warning"]
        # As the user runs it: meshctl shows the note, and the daemon logs it.
        shown = await trio.to_thread.run_sync(partial(
            subprocess.run, [sys.executable, "-m", "meshd.cmd.meshctl", "--socket", str(phoenix.socket_path),
                             "recover", "--yes"], input=" ".join(words), capture_output=True, text=True,
            timeout=120))
        assert shown.returncode == 0, shown.stderr
        note = next(line for line in shown.stdout.splitlines() if line.startswith("NOTE:"))
        assert "were removed from the circle" in note and "beta" in note, shown.stdout
        assert set(await phoenix.texts("notes")) == {"from alpha", "from beta"}
        assert "were removed from the circle" in phoenix.log()
        assert [d["device"] for d in (await phoenix.request("GET", "/v1/devices"))["devices"]
                if d["device"] != (await phoenix.status())["device"]] == [alpha_id]
    finally:
        for process in (alpha, beta, phoenix, relay):
            process.kill()
