"""The relay's files are private whatever the umask (protocol/relay.md, "Address and channel").

A real relay process started under umask 022 (the usual default), which takes a deposit so
that the database's WAL and shared-memory files exist too.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

from meshd.relay.session import open_relay_session
from meshd.relay.storage import DATABASE_FILE

from ..shell.test_relay import Inbox, make_circle, seal_for
from .test_relay_process import start_relay, stop


async def _start_under_umask_022(state_dir: Path):  # noqa: ANN202
    previous = os.umask(0o022)  # inherited by the relay process
    try:
        return await start_relay(state_dir)
    finally:
        os.umask(previous)


def _modes(state_dir: Path) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in state_dir.iterdir()}


async def test_relay_files_are_0600_under_umask_022(tmp_path: Path) -> None:
    state_dir = tmp_path / "relay"
    circle, m, _ = make_circle("alice", "bob")
    process, address = await _start_under_umask_022(state_dir)
    try:
        async with open_relay_session(address, m["alice"].dh, circle.records()) as alice:
            await alice.deposit(Inbox(circle, m["bob"]).mailbox(),
                                seal_for(circle, m["alice"], m["bob"], 1, "private"))
        modes = _modes(state_dir)
        assert {DATABASE_FILE, f"{DATABASE_FILE}-wal", f"{DATABASE_FILE}-shm"} <= modes.keys()
        assert modes == dict.fromkeys(modes, 0o600), f"files wider than 0600: {modes}"
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    finally:
        if process.returncode is None:
            await stop(process, signal.SIGTERM)


async def test_a_database_left_0644_is_narrowed_at_start(tmp_path: Path) -> None:
    state_dir = tmp_path / "relay"
    process, _ = await _start_under_umask_022(state_dir)
    assert await stop(process, signal.SIGTERM) == 0
    for path in state_dir.iterdir():
        if path.name.startswith(DATABASE_FILE):
            path.chmod(0o644)  # as an older relay created it
    process, _ = await _start_under_umask_022(state_dir)
    try:
        modes = {name: mode for name, mode in _modes(state_dir).items() if name.startswith(DATABASE_FILE)}
        assert modes and modes == dict.fromkeys(modes, 0o600), f"files wider than 0600: {modes}"
    finally:
        await stop(process, signal.SIGTERM)
