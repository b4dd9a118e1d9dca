"""What the per-connection read limit (meshd/net/byterate.py) costs legitimate bulk traffic.

One SecureConnection over loopback TCP carries MiB of 60 KB messages (a log catch-up's
shape) to a reader, with the default PEER_BYTE_RATE and, as the same-run baseline, with no
limit; rounds alternate. Prints MB/s for each and their ratio, and how long reads waited.

Run: .venv/bin/python bench/byterate.py [--mib N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.net.byterate import PEER_BYTE_RATE, ByteRate  # noqa: E402
from meshd.net.transport import SecureConnection, connect_secure, serve_secure  # noqa: E402
from meshd.protocol.crypto import DHKeyPair  # noqa: E402

BLOB = bytes(60_000)


async def one_run(mib: int, rate: ByteRate | None) -> tuple[float, float]:
    total = mib * 1024 * 1024
    done = trio.Event()
    result: dict[str, float] = {}

    async def handler(connection: SecureConnection) -> None:
        received = 0
        started = trio.current_time()
        async for message in connection:
            received += len(message["b"])
            if received >= total:
                result["s"] = trio.current_time() - started
                budget = connection.read_budget
                result["waited"] = budget.throttled_s if budget is not None else 0.0
                done.set()
                return

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server, client = DHKeyPair.generate(os.urandom), DHKeyPair.generate(os.urandom)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_secure, handler, listeners, static=server,
                                   authorize=lambda key: True, byte_rate=rate))
        connection = await connect_secure("127.0.0.1", port, static=client,
                                          authorize=lambda key: True)
        async with connection:
            sent = 0
            while sent < total:
                await connection.send({"t": "bench.blob", "b": BLOB})
                sent += len(BLOB)
            await done.wait()
        nursery.cancel_scope.cancel()
    return total / result["s"] / 1e6, result["waited"]


async def main_async(mib: int, rounds: int) -> None:
    runs: dict[str, list[tuple[float, float]]] = {"unlimited": [], "PEER_BYTE_RATE": []}
    for _ in range(rounds):
        runs["unlimited"].append(await one_run(mib, None))
        runs["PEER_BYTE_RATE"].append(await one_run(mib, PEER_BYTE_RATE))
    for name, results in runs.items():
        print(f"{name:15} {statistics.median(r[0] for r in results):7.1f} MB/s median "
              f"(runs: {', '.join(f'{r[0]:.1f}' for r in results)}); reads waited "
              f"{max(r[1] for r in results):.2f} s at most")
    limited = statistics.median(r[0] for r in runs["PEER_BYTE_RATE"])
    free = statistics.median(r[0] for r in runs["unlimited"])
    print(f"limited / unlimited: {limited / free:.3f} "
          f"(limit {PEER_BYTE_RATE.bytes_per_s / 1e6:.1f} MB/s after a {PEER_BYTE_RATE.burst / 1e6:.1f} MB burst)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trio.run(main_async, args.mib, args.rounds)


if __name__ == "__main__":
    main()
