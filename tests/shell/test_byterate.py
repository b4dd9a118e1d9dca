"""A per-connection byte-rate limit (meshd/net/byterate.py), over real loopback sockets: a
peer that floods is throttled to its budget while another peer keeps being answered."""

from __future__ import annotations

from functools import partial

import trio

from meshd.net.byterate import FRAME_COST, ByteRate, ReadBudget
from meshd.net.transport import RECEIVE_BYTES, SecureConnection, connect_secure, serve_secure
from meshd.protocol.crypto import DHKeyPair

from ..protocol.harness import seeded_rng

RATE = ByteRate(bytes_per_s=256 * 1024, burst=256 * 1024)
BLOB = bytes(60_000)
# The handshake's frames and the flood's per-frame charge, on top of the blobs counted.
SLACK = 16 * 1024


async def test_a_flooding_peer_is_throttled_while_another_is_served() -> None:
    rng = seeded_rng(11)
    server_key, flooder_key, other_key = (DHKeyPair.generate(rng) for _ in range(3))
    received: dict[bytes, int] = {}
    throttled = trio.Event()

    async def handler(connection: SecureConnection) -> None:
        key = bytes(connection.remote_static)
        received[key] = 0
        async for message in connection:
            if message["t"] == "test.echo":
                await connection.send({"t": "test.echo", "i": message["i"]})
                continue
            received[key] += len(message["blob"])
            budget = connection.read_budget
            assert budget is not None
            if budget.throttled_s > 0:
                throttled.set()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_secure, handler, listeners, static=server_key,
                                   authorize=lambda key: True, byte_rate=RATE))
        started = trio.current_time()
        flooder = await connect_secure("127.0.0.1", port, static=flooder_key,
                                       authorize=lambda key: True)
        async with flooder, trio.open_nursery() as flooding:

            async def flood() -> None:
                while True:
                    await flooder.send({"t": "test.blob", "blob": BLOB})

            flooding.start_soon(flood)
            with trio.fail_after(60):  # a hang guard, not a performance bound
                await throttled.wait()
                other = await connect_secure("127.0.0.1", port, static=other_key,
                                             authorize=lambda key: True)
                async with other:
                    for i in range(20):  # the other peer is answered throughout the flood
                        await other.send({"t": "test.echo", "i": i})
                        assert (await other.receive())["i"] == i
            elapsed = trio.current_time() - started
            flooded = max(received.values())
            flooding.cancel_scope.cancel()
        # The budget's invariant: at most burst + rate * elapsed + one read, however fast the
        # flooder writes (without the limit it is everything loopback carries meanwhile).
        bound = RATE.burst + RATE.bytes_per_s * elapsed + RECEIVE_BYTES + SLACK
        print(f"flooder: {flooded:,} bytes read in {elapsed:.2f} s (bound {bound:,.0f})")
        assert flooded <= bound
        nursery.cancel_scope.cancel()


def test_the_budget_charges_bytes_and_frames_and_refills() -> None:
    budget = ReadBudget(ByteRate(bytes_per_s=1000, burst=1000), now=0.0)
    assert budget.delay(0.0) == 0.0
    budget.spend(0.0, 900, frames=2)  # 900 + 2 * FRAME_COST
    assert budget.delay(0.0) == (900 + 2 * FRAME_COST - 1000) / 1000
    assert budget.delay(10.0) == 0.0  # refilled, but never above the burst
    budget.spend(10.0, 1000, frames=0)
    assert budget.delay(10.0) == 0.0
    budget.spend(10.0, 1, frames=0)
    assert budget.delay(10.0) > 0.0
