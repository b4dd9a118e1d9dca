"""`meshd relay` as a real process: what it acknowledged survives SIGTERM, restart and kill -9."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from meshd.protocol.relay import UNAVAILABLE, RelayError
from meshd.relay.address import RelayAddress
from meshd.relay.command import KEY_FILE
from meshd.relay.session import open_relay_session

from ..shell.test_relay import Inbox, make_circle, seal_for

START_TIMEOUT_S = 20


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    """The relay's storage: SQLite in its state directory (None), or a PostgreSQL DSN."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_dsn")


async def start_relay(state_dir: Path, database: str | None = None) -> tuple[trio.Process, str]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "meshd.relay.server", "--state-dir", str(state_dir),
         "--listen", "127.0.0.1:0", "--log-level", "warning",
         *(["--database", database] if database else [])],
        stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = b""
    with trio.fail_after(START_TIMEOUT_S):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            if not chunk:
                raise AssertionError(f"relay exited with {await process.wait()} before it was ready")
            line += chunk
    return process, line.decode().strip()


async def stop(process: trio.Process, how: int) -> int:
    process.send_signal(how)
    with trio.fail_after(10):
        return await process.wait()


async def test_nothing_acknowledged_is_lost_to_kill_9(tmp_path: Path, database: str | None) -> None:
    circle, m, _ = make_circle("alice", "bob")
    inbox = Inbox(circle, m["bob"])
    process, address = await start_relay(tmp_path / "relay", database)
    acknowledged: dict[int, bytes] = {}
    try:
        async with open_relay_session(address, m["alice"].dh, circle.records()) as alice:
            killed = trio.Event()

            async def depositor(first_seq: int) -> None:
                seq = first_seq
                while True:
                    envelope = seal_for(circle, m["alice"], m["bob"], seq, f"message {seq}")
                    try:
                        envelope_id = await alice.deposit(inbox.mailbox(), envelope)
                    except RelayError as err:
                        assert err.code == UNAVAILABLE
                        return
                    acknowledged[seq] = envelope
                    assert envelope_id > 0
                    if len(acknowledged) >= 300 and not killed.is_set():
                        process.kill()  # SIGKILL, mid-stream: other deposits are in flight
                        killed.set()
                    seq += 8

            async with trio.open_nursery() as nursery:
                for first in range(1, 9):
                    nursery.start_soon(depositor, first)
        assert await process.wait() == -signal.SIGKILL
        process, again = await start_relay(tmp_path / "relay", database)
        assert RelayAddress.parse(again).key == RelayAddress.parse(address).key
        async with open_relay_session(again, m["bob"].dh, circle.records()) as bob:
            stored: list[tuple[int, bytes]] = []
            more = True
            while more:
                page = await bob.fetch(inbox.mailbox(), stored[-1][0] if stored else 0)
                stored.extend(page.items)
                more = page.more
        assert set(acknowledged.values()) <= {envelope for _, envelope in stored}
        inbox.read(stored)
        assert "bad-mac" not in inbox.problems and "replay" not in inbox.problems
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_stops_cleanly_and_a_restart_keeps_key_and_mail(
    tmp_path: Path, database: str | None
) -> None:
    circle, m, _ = make_circle("alice", "bob")
    inbox = Inbox(circle, m["bob"])
    process, address = await start_relay(tmp_path / "relay", database)
    try:
        key_file = tmp_path / "relay" / KEY_FILE
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        async with open_relay_session(address, m["alice"].dh, circle.records()) as alice:
            await alice.deposit(inbox.mailbox(), seal_for(circle, m["alice"], m["bob"], 1, "kept"))
        assert await stop(process, signal.SIGTERM) == 0
        process, again = await start_relay(tmp_path / "relay", database)
        assert RelayAddress.parse(again).key == RelayAddress.parse(address).key
        async with open_relay_session(again, m["bob"].dh, circle.records()) as bob:
            inbox.read((await bob.fetch(inbox.mailbox())).items)
        assert [letter["text"] for letter in inbox.letters] == ["kept"]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999"])
def test_a_bad_listen_address_is_refused(tmp_path: Path, listen: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshd.relay.server", "--state-dir", str(tmp_path),
         "--listen", listen], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


@pytest.mark.parametrize(("database", "said"), [
    ("sqlite:///relay.db", "takes a postgresql:// URL"),
    # Nothing listens on port 1: refused at once, and the password is never shown.
    ("postgresql://relay:s3cret-pw@127.0.0.1:1/relay?connect_timeout=5", "cannot connect"),
])
def test_a_database_the_relay_cannot_use_is_refused(tmp_path: Path, database: str,
                                                    said: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshd.relay.server", "--state-dir", str(tmp_path),
         "--listen", "127.0.0.1:0", "--database", database],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and said in result.stderr, result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout
