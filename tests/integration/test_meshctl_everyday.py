"""meshctl status, log, streams, delete and rename against real daemons."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .daemons import CONVERGE_S, DaemonProcess, form_circle, wait_texts


def meshctl(daemon: DaemonProcess, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "meshd.cmd.meshctl", "--socket", str(daemon.socket_path),
                             *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def ctl(daemon: DaemonProcess, *args: str) -> str:
    return await trio.to_thread.run_sync(lambda: meshctl(daemon, *args))


@pytest.mark.slow
async def test_status_log_streams_delete_and_rename(tmp_path: Path) -> None:
    alpha, beta = DaemonProcess(tmp_path, "alpha"), DaemonProcess(tmp_path, "beta")
    try:
        await form_circle([alpha, beta])
        beta_fp = (await beta.status())["fingerprint"]
        alpha_status = await alpha.status()

        # status: each other device with its path, last contact and lag.
        shown = await ctl(alpha, "status")
        assert "DEVICE" in shown and "PATH" in shown and "LAST_SEEN" in shown and "BEHIND" in shown
        row = next(line for line in shown.splitlines() if line.startswith(beta_fp)).split()
        assert row[1:3] == ["beta", "lan"] and " ".join(row[3:6]).endswith("ago") and row[6] == "0"

        # devices and peers: tables built from the real daemon's rows (the shell tests' fake
        # rows have another shape), each device named by its fingerprint.
        lines = (await ctl(alpha, "devices")).splitlines()
        assert lines[0].split() == ["DEVICE", "NAME", "THIS_DEVICE", "CONNECTED"]
        yes = {True: "yes", False: "no"}
        assert {line.split()[0]: line.split()[1:] for line in lines[1:]} == {
            d["fingerprint"]: [d["name"], yes[d["this_device"]], yes[d["connected"]]]
            for d in (await alpha.request("GET", "/v1/devices"))["devices"]}
        lines = (await ctl(alpha, "peers")).splitlines()
        assert lines[0].split()[:2] == ["DEVICE", "NAME"]
        assert [line.split()[:2] for line in lines[1:]] == [[beta_fp, "beta"]]

        # log: when, and who by name.
        await ctl(alpha, "send", "chat", "hello", "--id", "m1")
        await wait_texts(beta, "chat", {"hello"})
        line = (await ctl(beta, "log", "chat")).splitlines()[0]
        assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  alpha  m1  hello$", line), line

        # streams and delete.
        assert re.search(r"^chat\s+1$", await ctl(beta, "streams"), re.M)
        await ctl(alpha, "delete", "chat", "m1")

        async def deleted() -> bool:
            return await beta.texts("chat") == []

        await beta.until(deleted, CONVERGE_S, "the deletion to reach beta")

        # rename: this device's new name, everywhere; no device can rename another.
        await beta.write("meshd%2Fnames", "not-alpha", alpha_status["device"])  # a forgery
        assert "now called 'alpha-laptop'" in await ctl(alpha, "rename", "alpha-laptop")
        assert (await alpha.status())["name"] == "alpha-laptop"

        async def renamed_on_beta() -> bool:
            devices = (await beta.request("GET", "/v1/devices"))["devices"]
            return {d["name"] for d in devices} == {"alpha-laptop", "beta"}

        await beta.until(renamed_on_beta, CONVERGE_S, "beta to see alpha's new name")
        peers = (await beta.request("GET", "/v1/peers"))["peers"]
        assert [p["name"] for p in peers] == ["alpha-laptop"]
        assert "not-alpha" not in await ctl(alpha, "devices")
    finally:
        for daemon in (alpha, beta):
            daemon.kill()
        await trio.lowlevel.checkpoint()
