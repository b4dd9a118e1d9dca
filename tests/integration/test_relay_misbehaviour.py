"""A real relay that serves an older state of itself (its database put back from a copy: the
same incarnation, an older backup) is caught, and it shows where people look: /v1/relays,
/v1/status, /metrics and `meshctl status`, not only in the event stream."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from meshd.api.client import Client

from .daemons import (
    CONVERGE_S,
    DaemonProcess,
    pair,
    wait_connected,
)
from .relayed import relay_and_daemons

BACKUP_S = 30.0


async def _write_and_back_up(daemon: DaemonProcess, text: str, version: int) -> None:
    async with daemon.event_stream() as events:
        await daemon.write("diary", text)
        with trio.fail_after(BACKUP_S):
            while True:
                event = await events.next()
                if event.get("type") == "relay.backup" and event["data"]["version"] >= version:
                    return


@pytest.mark.slow
async def test_a_served_rollback_shows_in_status_metrics_and_meshctl(tmp_path: Path) -> None:
    copy = tmp_path / "relay-copy"
    async with relay_and_daemons(tmp_path, ["alpha"], discovery=False) as setup:
        relay, address, (alpha,) = setup.relay, setup.address, setup.daemons
        await _write_and_back_up(alpha, "one", 1)
        relay.kill()
        shutil.copytree(relay.state_dir, copy)  # the operator keeps a copy of version 1
        await relay.start()
        await _write_and_back_up(alpha, "two", 2)
        relay.kill()
        shutil.rmtree(relay.state_dir)
        shutil.copytree(copy, relay.state_dir)  # ...and serves it again
        await relay.start()
        await alpha.write("diary", "three")  # the next backup finds version 1 where 2 was

        async def caught() -> dict | None:
            entry = (await alpha.request("GET", "/v1/relays"))["relays"][0]
            return entry if entry.get("misbehaviour") else None

        entry = await alpha.until(caught, CONVERGE_S + BACKUP_S, "the rollback caught")
        assert entry["misbehaviour"]["reason"] == "rollback"
        assert entry["misbehaviour"]["at"] > 0
        assert entry["error"].startswith("rollback at ")
        status = await alpha.status()
        assert status["relays"][0]["misbehaviour"]["reason"] == "rollback"
        metrics = await trio.to_thread.run_sync(Client(alpha.socket_path).metrics)
        counted = [line for line in metrics.splitlines()
                   if line.startswith('meshd_relay_misbehaviour_total{reason="rollback"} ')]
        # At least this one (each later backup attempt at this relay is caught again).
        assert len(counted) == 1 and int(counted[0].split()[-1]) >= 1
        shown = await trio.run_process(
            [sys.executable, "-m", "meshd.cmd.meshctl", "--socket", str(alpha.socket_path), "status"],
            capture_stdout=True, check=True, stdin=subprocess.DEVNULL)
        out = shown.stdout.decode()
        assert f"WARNING: relay {address}: rollback at " in out, out


@pytest.mark.slow
async def test_a_dropped_envelope_shows_as_a_hole_at_that_relay(tmp_path: Path) -> None:
    async with relay_and_daemons(tmp_path, ["alpha", "beta"]) as setup:
        relay, (alpha, beta) = setup.relay, setup.daemons
        await pair(alpha, beta)
        await wait_connected(beta, 1)
        assert await beta.stop() == 0
        for text in ("one", "two", "three"):
            await alpha.write("diary", text)

        async def deposited() -> bool:
            return (await alpha.status())["relay_backlog"] == 0

        await alpha.until(deposited, CONVERGE_S, "deposits for beta")
        assert await alpha.stop() == 0
        relay.kill()
        with sqlite3.connect(relay.state_dir / "relay.sqlite3") as db:  # the relay drops one
            db.execute("DELETE FROM envelopes WHERE id = (SELECT min(id) FROM envelopes)")
        await relay.start()
        beta.reconfigure(discovery=False)
        await beta.start()

        async def hole() -> dict | None:
            entry = (await beta.request("GET", "/v1/relays"))["relays"][0]
            return entry if entry.get("holes") else None

        entry = await beta.until(hole, CONVERGE_S, "the hole shown")
        assert entry["error"].startswith("hole at ") and "missing" in entry["error"]
        metrics = await trio.to_thread.run_sync(Client(beta.socket_path).metrics)
        assert 'meshd_relay_misbehaviour_total{reason="hole"} 1' in metrics.splitlines()
