"""A write cancelled after its frames left the channel must not corrupt the stream.

SecureConnection._flush takes the channel's frames (their nonces spent) before writing them.
A cancel in between (at the write's first checkpoint, or while a large frame waits for the
socket) lost them, or cut one short; the goodbye that aclose() then sent was read by the
peer against the wrong nonce, or inside the cut frame, and the peer reported "bad MAC": a
forged or corrupted stream, for what was only a stop. Seen when two daemons stopped at once
(bench/results/review-s7-2026-12-03.txt). Now a cancelled write leaves the connection
unusable for writing: later sends raise BrokenResourceError, and aclose() closes it without
a goodbye, so the peer sees the connection end, not a bad MAC.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshd.net.transport import CONNECTION_ERRORS, PeerClosed, SecureConnection
from meshd.protocol.errors import RemoteProtocolError

from .test_streamio import tcp_pair
from .test_transport import connected_pair


async def what_bob_reads(bob: SecureConnection) -> list[object]:
    seen: list[object] = []
    try:
        while True:
            seen.append((await bob.receive())["t"])
    except (PeerClosed, *CONNECTION_ERRORS) as err:
        seen.append(err)
    return seen


@pytest.mark.parametrize("size", [100, 8 << 20], ids=["before-any-byte", "mid-frame"])
async def test_a_cancelled_write_then_close_is_not_a_bad_mac(size: int) -> None:
    alice, bob = await connected_pair(*await tcp_pair())
    await alice.send({"t": "test.first"})
    with trio.CancelScope() as scope:
        if size < 1000:
            scope.cancel()  # cancelled at the write's first checkpoint: nothing sent
            await alice.send({"t": "test.lost", "b": bytes(size)})
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alice.send, {"t": "test.cut", "b": bytes(size)})
                await trio.testing.wait_all_tasks_blocked()  # bob reads nothing: it waits
                scope.cancel()
    assert scope.cancelled_caught
    with pytest.raises(trio.BrokenResourceError):
        await alice.send({"t": "test.after"})  # never sent on a stream in an unknown state
    await alice.aclose("stopping")
    seen = await what_bob_reads(bob)
    assert seen[0] == "test.first"
    assert not any(isinstance(item, RemoteProtocolError) and "MAC" in str(item) for item in seen), seen
    assert "test.after" not in seen
    await bob.aclose()
