"""A failed join tells the truth about the code: one that never reached the inviter is unspent."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from .daemons import ApiFailure, DaemonProcess, start_all


@pytest.mark.slow
async def test_an_unreachable_inviter_leaves_the_code_usable(tmp_path: Path) -> None:
    alpha = DaemonProcess(tmp_path, "alpha", discovery=False)
    beta = DaemonProcess(tmp_path, "beta", discovery=False)
    closed = socket.socket()  # bound, never listening: connections to it are refused
    closed.bind(("127.0.0.1", 0))
    try:
        await start_all([alpha, beta])
        invitation = await alpha.request("POST", "/v1/invite")
        dead_end = f"127.0.0.1:{closed.getsockname()[1]}"
        with pytest.raises(ApiFailure) as failed:
            await beta.request("POST", "/v1/join", {"code": invitation["code"], "address": dead_end})
        message = str(failed.value)
        assert "used up" not in message and "spent" not in message
        assert "not used" in message and dead_end in message
        assert failed.value.code == "inviter-unreachable"
        # The same code then works.
        joined = await beta.request("POST", "/v1/join", {
            "code": invitation["code"], "address": f"127.0.0.1:{invitation['port']}"})
        assert len(joined["sas"]) == 4
    finally:
        closed.close()
        for daemon in (alpha, beta):
            daemon.kill()
        await trio.lowlevel.checkpoint()
