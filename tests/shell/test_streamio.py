"""net/streamio.py: a SocketStream's socket used directly behaves as the stream would."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio
import trio.testing

from meshd.net.streamio import stream_io


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    client = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def test_other_streams_are_used_as_they_are() -> None:
    left, _ = trio.testing.memory_stream_pair()
    send_all, receive_some = stream_io(left)
    assert send_all == left.send_all and receive_some == left.receive_some


async def test_a_large_write_arrives_whole_and_in_order() -> None:
    # 8 MiB is far past the socket buffers: the socket takes it in partial sends.
    client, server = await tcp_pair()
    data = os.urandom(8 << 20)
    send_all, _ = stream_io(client)
    _, receive_some = stream_io(server)
    received = bytearray()

    async def read() -> None:
        while len(received) < len(data):
            received.extend(await receive_some(1 << 16))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await send_all(memoryview(data))
    assert received == data
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("direct", [False, True])
async def test_a_closed_stream_raises_closed_resource_error(direct: bool) -> None:
    client, server = await tcp_pair()
    send_all, receive_some = stream_io(client) if direct else (client.send_all, client.receive_some)
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await receive_some(10)
    await server.aclose()


@pytest.mark.parametrize("direct", [False, True])
async def test_closing_wakes_a_blocked_reader_with_closed_resource_error(direct: bool) -> None:
    client, server = await tcp_pair()
    _, receive_some = stream_io(client) if direct else (client.send_all, client.receive_some)
    raised: list[BaseException] = []

    async def read() -> None:
        try:
            await receive_some(10)
        except trio.ClosedResourceError as err:
            raised.append(err)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
    assert len(raised) == 1
    await server.aclose()


@pytest.mark.parametrize("direct", [False, True])
async def test_a_reset_connection_raises_broken_resource_error(direct: bool) -> None:
    client, server = await tcp_pair()
    send_all, receive_some = stream_io(client) if direct else (client.send_all, client.receive_some)
    # An abortive close (SO_LINGER 0) sends a RST: the next read fails with ECONNRESET.
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await server.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await receive_some(10)
    with pytest.raises(trio.BrokenResourceError):
        await send_all(b"x" * 65536)
    await client.aclose()
