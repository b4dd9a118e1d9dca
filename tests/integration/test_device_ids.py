"""One device identifier on screen everywhere: the fingerprint (F14)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .daemons import DaemonProcess, form_circle

FINGERPRINT = re.compile(r"^[a-z2-7]{4}(-[a-z2-7]{4}){3}$")
HEX_KEY = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")


def meshctl(daemon: DaemonProcess, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "meshd.cmd.meshctl", "--socket", str(daemon.socket_path),
                             *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
async def test_cli_api_logs_and_events_name_a_device_the_same_way(tmp_path: Path) -> None:
    alpha, beta = DaemonProcess(tmp_path, "alpha"), DaemonProcess(tmp_path, "beta")
    try:
        await form_circle([alpha, beta])
        beta_status = await beta.status()
        fingerprint, key = beta_status["fingerprint"], beta_status["device"]
        assert FINGERPRINT.match(fingerprint)

        peers = (await alpha.request("GET", "/v1/peers"))["peers"]
        assert [(p["device"], p["fingerprint"]) for p in peers] == [(key, fingerprint)]
        devices = (await alpha.request("GET", "/v1/devices"))["devices"]
        assert {d["fingerprint"] for d in devices if d["device"] == key} == {fingerprint}

        for command in ("peers", "devices"):
            shown = await trio.to_thread.run_sync(meshctl, alpha, command)
            row = next(line for line in shown.splitlines() if "beta" in line)
            assert row.split()[0] == fingerprint, shown
            assert key[:8] not in shown  # no hex prefix beside it

        # The log says who connected in the same form (not a base64 key excerpt).
        assert f"connected to beta ({fingerprint}," in alpha.log()
        # Pairing names the joiner by its fingerprint, not by its X25519 key ("peer(AbCd…)").
        assert re.search(rf"pairing: invitation \d+ answered pair\.\w+ to beta \({fingerprint}\)", alpha.log())
        for daemon in (alpha, beta):
            assert "peer(" not in daemon.log(), "an X25519 key excerpt in the log"
            assert not HEX_KEY.search(daemon.log()), f"a 64-hex key in the log: {HEX_KEY.search(daemon.log())}"

        # And so do the events: beta going away is reported with its fingerprint.
        async with alpha.event_stream() as events:
            assert await beta.stop() == 0
            with trio.fail_after(10):
                while (event := await events.next())["type"] != "peer.down":
                    pass
        assert (event["data"]["device"], event["data"]["fingerprint"]) == (key, fingerprint)
    finally:
        for daemon in (alpha, beta):
            daemon.kill()
        await trio.lowlevel.checkpoint()
