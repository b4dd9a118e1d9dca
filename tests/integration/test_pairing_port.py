"""Invitations listen on the documented pairing port (a firewall can let it in), or on any
port, with a warning, when another invitation holds it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from .daemons import DaemonProcess


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def with_pairing_port(daemon: DaemonProcess, port: int) -> None:
    daemon.config_path.write_text(f"pairing_port = {port}\n" + daemon.config_path.read_text())


@pytest.mark.slow
async def test_invitations_use_the_configured_pairing_port(tmp_path: Path) -> None:
    alpha = DaemonProcess(tmp_path, "alpha", discovery=False)
    port = free_port()
    with_pairing_port(alpha, port)
    try:
        await alpha.start()
        assert (await alpha.request("POST", "/v1/invite"))["port"] == port
        # While that invitation is open, the next one cannot have the port.
        second = await alpha.request("POST", "/v1/invite")
        assert second["port"] not in (port, 0)
        assert f"pairing port {port} is busy" in alpha.log()
    finally:
        alpha.kill()
        await trio.lowlevel.checkpoint()
