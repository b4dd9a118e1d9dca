"""net/streamio.py: a SocketStream's socket used directly behaves as the stream would."""

from __future__ import annotations

import os
import socket
import struct
from functools import partial

import pytest
import trio
import trio.testing

from meshd.net.streamio import ReceiveSome, SendAll, raw_socket, stream_error, stream_io
from meshd.net.transport import open_secure_connection
from meshd.protocol.crypto import DHKeyPair


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


async def checked(receive_some: ReceiveSome, max_bytes: int) -> bytes | bytearray:
    """receive_some as SecureConnection calls it: a socket's OSError through stream_error."""
    try:
        return await receive_some(max_bytes)
    except OSError as err:
        raise stream_error(err) from err


def io(stream: trio.SocketStream, direct: bool) -> tuple[SendAll, ReceiveSome]:
    return stream_io(stream) if direct else (stream.send_all, stream.receive_some)


@pytest.mark.parametrize("direct", [False, True])
async def test_a_closed_stream_raises_closed_resource_error(direct: bool) -> None:
    client, server = await tcp_pair()
    send_all, receive_some = io(client, direct)
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await checked(receive_some, 10)
    await server.aclose()


@pytest.mark.parametrize("direct", [False, True])
async def test_closing_wakes_a_blocked_reader_with_closed_resource_error(direct: bool) -> None:
    client, server = await tcp_pair()
    _, receive_some = io(client, direct)
    raised: list[BaseException] = []

    async def read() -> None:
        try:
            await checked(receive_some, 10)
        except trio.ClosedResourceError as err:
            raised.append(err)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
    assert len(raised) == 1
    await server.aclose()


def reset(stream: trio.SocketStream) -> None:
    """Make closing stream an abortive close (SO_LINGER 0): the peer gets a RST."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("direct", [False, True])
async def test_a_reset_connection_raises_broken_resource_error(direct: bool) -> None:
    client, server = await tcp_pair()
    send_all, receive_some = io(client, direct)
    reset(server)
    await server.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await checked(receive_some, 10)
    with pytest.raises(trio.BrokenResourceError):
        await send_all(b"x" * 65536)
    await client.aclose()


async def test_a_secure_connection_over_tcp_reports_a_reset_as_broken() -> None:
    client_stream, server_stream = await tcp_pair()
    accept = lambda key: True  # noqa: E731
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(open_secure_connection, server_stream, initiator=False,
                                   static=DHKeyPair.generate(os.urandom), authorize=accept))
        client = await open_secure_connection(client_stream, initiator=True,
                                              static=DHKeyPair.generate(os.urandom), authorize=accept)
    await client.send({"t": "ping"})
    reset(server_stream)
    await server_stream.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await client.receive()
    await client.aclose()


async def test_the_direct_path_keeps_trios_checkpoints() -> None:
    # Each call is a cancel point and a schedule point, whether it completes at once
    # (send, a receive with data waiting) or waits for the socket (a receive before data).
    client, server = await tcp_pair()
    assert raw_socket(client) is not None and raw_socket(server) is not None
    send_all, _ = stream_io(client)
    _, receive_some = stream_io(server)
    with trio.testing.assert_checkpoints():
        await send_all(b"x")
    await trio.testing.wait_all_tasks_blocked()
    with trio.testing.assert_checkpoints():
        assert await checked(receive_some, 10) == b"x"

    async def send_later() -> None:
        await trio.testing.wait_all_tasks_blocked()
        await send_all(b"y")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_later)
        with trio.testing.assert_checkpoints():
            assert await checked(receive_some, 10) == b"y"
    await client.aclose()
    await server.aclose()


async def test_a_cancelled_send_sends_nothing_and_a_cancelled_receive_takes_nothing() -> None:
    client, server = await tcp_pair()
    send_all, _ = stream_io(client)
    _, receive_some = stream_io(server)
    with trio.CancelScope() as scope:
        scope.cancel()
        await send_all(b"lost")
    await client.send_all(b"kept")
    await trio.testing.wait_all_tasks_blocked()
    with trio.CancelScope() as scope:
        scope.cancel()
        await checked(receive_some, 10)
    assert await server.receive_some(10) == b"kept"
    await client.aclose()
    await server.aclose()
