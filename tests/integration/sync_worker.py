"""A real meshd process for the crash tests (a Store and a LogService, nothing faked).

    sync_worker.py receive DB HOST PORT SENDER_HEX TARGET
        Connect to HOST:PORT over meshd's secure channel, sync, print "committed N" after
        every batch commit (N = entries of SENDER we hold), "done" once N == TARGET.
    sync_worker.py write DB SEED COUNT
        Write until our log has COUNT entries, printing "acked N" as each write returns
        (single writes, and every tenth step a bulk write of 50).

The parent SIGKILLs it at random moments and checks the database after each kill.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from meshd.net.logsync import LogService  # noqa: E402
from meshd.net.transport import PeerClosed, connect_secure  # noqa: E402
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair  # noqa: E402
from meshd.store.db import Store  # noqa: E402

RECEIVER_SEED = bytes(range(32))


def wall_ms() -> int:
    return int(time.time() * 1000)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def receive(db: Path, host: str, port: int, sender: bytes, target: int) -> None:
    service = LogService(Store(db), SigningKeyPair(RECEIVER_SEED), wall_ms)
    if service.version_vector().get(sender, 0) >= target:
        say("done")
        return
    connection = await connect_secure(
        host, port, static=DHKeyPair.from_private_bytes(RECEIVER_SEED),
        authorize=lambda key: True,
    )
    peer = service.peer(connection.send, lambda author: True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.run)
        try:
            async for message in connection:
                await peer.handle(message)
                if message["t"] == "log.entries":
                    await peer.drain()  # (its commit runs after handle() returns)
                    have = service.version_vector().get(sender, 0)
                    say(f"committed {have}")
                    if have >= target:
                        say("done")
                        break
        except PeerClosed:
            pass
        nursery.cancel_scope.cancel()
    await connection.aclose()


async def write(db: Path, seed: int, count: int) -> None:
    signer = SigningKeyPair(seed.to_bytes(32, "big"))
    service = LogService(Store(db), signer, wall_ms)
    step = 0
    while (have := service.version_vector().get(service.author, 0)) < count:
        step += 1
        if step % 10 == 0:
            service.write_many_nowait((("s", None, os.urandom(100)) for _ in range(50)), chunk_entries=50)
        else:
            await service.write("s", f"r{have % 97}", os.urandom(150))
        say(f"acked {service.version_vector()[service.author]}")
    say("done")


def main(argv: list[str]) -> None:
    if argv[0] == "receive":
        trio.run(receive, Path(argv[1]), argv[2], int(argv[3]), bytes.fromhex(argv[4]),
                 int(argv[5]))
    elif argv[0] == "write":
        trio.run(write, Path(argv[1]), int(argv[2]), int(argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
