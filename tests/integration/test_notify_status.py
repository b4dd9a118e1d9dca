"""systemd's STATUS= line follows the daemon's state (`systemctl status meshd` shows it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from .daemons import DaemonProcess, form_circle


async def next_status(daemon: DaemonProcess, wanted: str, limit_s: float = 10.0) -> str:
    """Read the daemon's sd_notify datagrams (the harness's NOTIFY_SOCKET) until a STATUS=
    line contains wanted."""
    notify = daemon._notify
    assert notify is not None
    with trio.fail_after(limit_s):
        while True:
            for line in (await notify.recv(4096)).decode().split("\n"):
                if line.startswith("STATUS=") and wanted in line:
                    return line


@pytest.mark.slow
async def test_status_changes_as_peers_come_and_go(tmp_path: Path) -> None:
    alpha, beta = DaemonProcess(tmp_path, "alpha"), DaemonProcess(tmp_path, "beta")
    try:
        await form_circle([alpha, beta])
        line = await next_status(alpha, "1 of 1 other devices reachable")
        assert "(1 lan, 0 relay)" in line and "listening on 127.0.0.1:" in line
        assert await beta.stop() == 0
        await next_status(alpha, "0 of 1 other devices reachable")
    finally:
        for daemon in (alpha, beta):
            daemon.kill()
        await trio.lowlevel.checkpoint()
