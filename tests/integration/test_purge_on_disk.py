"""Deleted means gone from disk: real daemons A and B on the LAN, C reached only through a
real relay. A body deleted (or its stream cleared) on A is in no file of any device, nor of
the relay, within the bound of protocol/logs.md ("Purge on disk") after the delete synced."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import trio

from ..polling import poll_until
from .daemons import (
    DaemonProcess,
    RelayProcess,
    pair,
    start_all,
    wait_connected,
    wait_texts,
)

DELIVERY_S = 30.0
# protocol/logs.md promises 2 s on a device (relay.md: 5 s at a relay); the test allows the
# issue's 10 s for a loaded machine, which main never meets (the WAL keeps the bytes).
PURGE_BOUND_S = 10.0


def files_holding(roots: list[Path], needle: bytes) -> list[str]:
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            try:
                if path.is_file() and needle in path.read_bytes():
                    found.append(str(path.relative_to(root.parent)))
            except FileNotFoundError:
                continue  # a -wal or -shm removed while we looked
    return found


async def _gone(daemons: list[DaemonProcess], stream: str, needle: str) -> None:
    async def check() -> bool:
        return all([needle not in await d.texts(stream) for d in daemons])

    for daemon in daemons:
        await daemon.until(check, DELIVERY_S, f"{needle[:8]}... deleted everywhere")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["delete", "clear"])
async def test_a_deleted_body_leaves_every_file_of_every_device(tmp_path: Path, how: str) -> None:
    relay = RelayProcess(tmp_path)
    address = await relay.start()
    alpha, beta, gamma = (DaemonProcess(tmp_path, name, relays=[address])
                          for name in ("alpha", "beta", "gamma"))
    daemons = [alpha, beta, gamma]
    try:
        await start_all(daemons)
        await pair(alpha, beta)
        await pair(alpha, gamma)
        await wait_connected(alpha, 2)
        # gamma from now on reaches the others only through the relay.
        assert await gamma.stop() == 0
        gamma.reconfigure(discovery=False)
        await gamma.start()

        marker = secrets.token_hex(32)  # 64 hex digits: found only where the body is
        await alpha.write("notes", "kept", record_id="kept")
        await alpha.write("notes", marker, record_id="secret")
        for daemon in daemons:
            await wait_texts(daemon, "notes", {"kept", marker}, DELIVERY_S)
        peers = (await gamma.request("GET", "/v1/peers"))["peers"]
        assert not any(p["connected"] for p in peers), "gamma got it through the relay"
        roots = [d.state_dir for d in daemons] + [relay.state_dir]
        assert files_holding(roots, marker.encode()), "the marker reached the disks"

        if how == "delete":
            await alpha.request("DELETE", "/v1/streams/notes/records/secret")
        else:
            await alpha.request("POST", "/v1/streams/notes/clear")
        await _gone(daemons, "notes", marker)

        try:
            await poll_until(lambda: not files_holding(roots, marker.encode()), PURGE_BOUND_S,
                             interval_s=0.2)
        except trio.TooSlowError:
            pass  # the assertion below says where it stayed
        assert files_holding(roots, marker.encode()) == []
        if how == "delete":
            assert await alpha.texts("notes") == ["kept"]
    finally:
        for process in (*daemons, relay):
            process.kill()
