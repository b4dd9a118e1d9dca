"""kill -9 at random moments loses nothing committed.

A receiving process (tests/integration/sync_worker.py: a real Store and LogService syncing
over loopback TCP with meshd's secure channel) is SIGKILLed at least 20 times during a
large sync and restarted each time; a writing process likewise while it writes. After
every kill: PRAGMA integrity_check is ok, every entry the process reported committed (or
acknowledged to the app) is still there, and the log is contiguous; at the end the whole
chain and every signed head verifies and the sync completed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import trio

from meshd.net.logsync import LogService
from meshd.net.peersync import sync_over
from meshd.net.transport import SecureConnection, serve_secure
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair
from meshd.protocol.log import ZERO_HASH, Batch, verify_batch
from meshd.store.db import Store

WORKER = Path(__file__).with_name("sync_worker.py")
SENDER_ENTRIES = 60_000
KILLS = 20


def wall_ms() -> int:
    return int(time.time() * 1000)


class Lines:
    """A process's stdout, line by line (None at EOF)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self._ready: list[str] = []

    async def next(self) -> str | None:
        while not self._ready:
            data = await self._stream.receive_some(65536)
            if not data:
                return None
            *complete, self._buffer = (self._buffer + data).split(b"\n")
            self._ready = [line.decode() for line in complete]
        return self._ready.pop(0)


def check_after_kill(db: Path, author: bytes, reported: int) -> int:
    """The store is intact and holds at least what the process reported; returns its seq."""
    store = Store(db)
    try:
        assert store.integrity_check() == "ok"
        have = store.version_vector().get(author, 0)
        assert have >= reported, f"reported {reported} committed, only {have} survived"
        assert store.entry_count() == sum(store.version_vector().values())  # contiguous
        return have
    finally:
        store.close()


def verify_whole_log(db: Path, author: bytes) -> int:
    """Re-verify every entry and signed head from the stored bytes, as a peer would."""
    store = Store(db)
    try:
        seq, tip_hash = 0, ZERO_HASH
        while (message := store.batch_since(author, seq, 1 << 20)) is not None:
            verified = verify_batch(Batch.from_message(message), seq, tip_hash, lambda a: True)
            seq, tip_hash = verified.last_seq, verified.last_hash
        assert (seq, tip_hash) == store.tip(author)
        return seq
    finally:
        store.close()


async def run_until(process: trio.Process, rng: random.Random, kill_at: int | None,
                    prefix: str) -> tuple[int, bool]:
    """Read progress lines; SIGKILL once progress passes kill_at. Returns (last reported,
    finished)."""
    reported, finished = 0, False
    assert process.stdout is not None
    output = Lines(process.stdout)
    while (line := await output.next()) is not None:
        if line == "done":
            finished = True
            break
        word, number = line.split()
        assert word == prefix
        reported = int(number)
        if kill_at is not None and reported >= kill_at:
            # A random moment within the next few batches, not right after a report.
            await trio.sleep(rng.random() * 0.01)
            process.kill()
            break
    await process.wait()
    return reported, finished


async def test_a_receiver_killed_mid_sync_loses_nothing_committed(tmp_path: Path) -> None:
    sender = LogService(Store(tmp_path / "sender.db"), SigningKeyPair(b"\x01" * 32), wall_ms)
    sender.write_many_nowait(("chat", None, os.urandom(200)) for _ in range(SENDER_ENTRIES))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handler(connection: SecureConnection) -> None:
        await sync_over(connection, sender, lambda author: True)

    rng = random.Random(20240601)
    db = tmp_path / "receiver.db"
    kills, have, finished = 0, 0, False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_secure, handler, listeners,
                                   static=DHKeyPair.from_private_bytes(b"\x02" * 32),
                                   authorize=lambda key: True))
        while not finished:
            process = await trio.lowlevel.open_process(
                [sys.executable, str(WORKER), "receive", str(db), "127.0.0.1", str(port),
                 sender.author.hex(), str(SENDER_ENTRIES)],
                stdout=subprocess.PIPE,
            )
            # Kill points spread so that at least KILLS land before the sync completes.
            kill_at = have + rng.randrange(1, SENDER_ENTRIES // (2 * KILLS)) \
                if kills < KILLS + 5 else None
            reported, finished = await run_until(process, rng, kill_at, "committed")
            if not finished:
                kills += 1
                assert process.returncode == -9
            have = check_after_kill(db, sender.author, reported)
        nursery.cancel_scope.cancel()
    assert kills >= KILLS
    assert verify_whole_log(db, sender.author) == SENDER_ENTRIES
    receiver = LogService(Store(db), SigningKeyPair(b"\x03" * 32), wall_ms)
    assert receiver.streams() == sender.streams()
    assert receiver.read("chat", limit=1000) == sender.read("chat", limit=1000)


async def test_a_writer_killed_while_writing_loses_no_acknowledged_write(tmp_path: Path) -> None:
    rng = random.Random(7)
    db = tmp_path / "writer.db"
    author = bytes(SigningKeyPair((7).to_bytes(32, "big")).public)
    acked = 0
    for _ in range(KILLS):
        process = await trio.lowlevel.open_process(
            [sys.executable, str(WORKER), "write", str(db), "7", "1000000"],
            stdout=subprocess.PIPE,
        )
        reported, _ = await run_until(process, rng, acked + rng.randrange(1, 150), "acked")
        assert process.returncode == -9
        acked = check_after_kill(db, author, reported)
    final = acked + 20
    process = await trio.lowlevel.open_process(
        [sys.executable, str(WORKER), "write", str(db), "7", str(final)], stdout=subprocess.PIPE)
    _, finished = await run_until(process, rng, None, "acked")
    assert finished and process.returncode == 0
    assert verify_whole_log(db, author) >= final
