"""What a status read and a repeated request head cost the API's trio thread (issue 16 writers,
issue 20 CPU): counts, not times.

- A plain GET (GET /v1/status polled by a monitor, a bench's probe) is served on the fast
  path (http1.py) as writes are, not by h11: h11 reads none of its bytes, and its answer is
  the bytes h11 writes for the same request. GET /v1/events, which streams, is still
  written by h11, on a fresh connection or after plain requests on the same one.
- A head sent again (a writer's POST, a monitor's GET) is parsed once (http1.cached_head):
  the same Head as parse_head, and the cache is bounded.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from meshd.api import http1, httpserver
from meshd.api.events import EventBus
from meshd.api.http1 import Head, cached_head, parse_head
from meshd.api.routes import open_unix_listener, serve_api

STATUS = b"GET /v1/status HTTP/1.1\r\nhost: meshd\r\n\r\n"
# The same request with a header the fast path leaves to h11 (http1._DEFER).
STATUS_BY_H11 = b"GET /v1/status HTTP/1.1\r\nhost: meshd\r\nconnection: keep-alive\r\n\r\n"


class Control:
    def __init__(self) -> None:
        self.events = EventBus()
        self.written: list[bytes] = []

    def require_member(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"device": "ab" * 32, "member": True, "entries": len(self.written),
                "relays": [{"address": "r:1", "connected": False}], "relay_outbox": {}}

    async def write(self, stream: str, record_id: str | None, body: bytes) -> dict[str, Any]:
        self.written.append(body)
        return {"id": record_id or f"r{len(self.written)}", "stream": stream, "seq": len(self.written)}


@pytest.fixture
async def served(nursery: trio.Nursery, short_dir: Path) -> AsyncIterator[tuple[Control, Path]]:
    control = Control()
    path = short_dir / "meshd.sock"
    listener = await open_unix_listener(path)
    await nursery.start(partial(serve_api, control, listener, allowed_uids=set()))  # type: ignore[arg-type]
    yield control, path


class H11Reads:
    """Counts the bytes given to the server's h11 connections (receive_data calls with data:
    b"" is the end of a connection, which an earlier connection's h11 may still be told)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = h11.Connection.receive_data

        def counted(conn: h11.Connection, data: bytes) -> None:
            if conn.our_role is h11.SERVER and data:
                self.calls += 1
            original(conn, data)
        monkeypatch.setattr(h11.Connection, "receive_data", counted)


async def answer(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    """The next whole answer (head and body) on stream; buffer keeps what follows it."""
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive_some(65536)
    head = bytes(buffer[:buffer.index(b"\r\n\r\n") + 4])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(buffer) < len(head) + length:
        buffer += await stream.receive_some(65536)
    whole = bytes(buffer[:len(head) + length])
    del buffer[:len(head) + length]
    return whole


async def test_status_reads_are_served_without_h11_with_h11s_bytes(
        served: tuple[Control, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    control, path = served
    async with await trio.open_unix_socket(str(path)) as stream:  # the long way, for the bytes
        await stream.send_all(STATUS_BY_H11)
        expected = await answer(stream, bytearray())
    reads = H11Reads(monkeypatch)
    async with await trio.open_unix_socket(str(path)) as stream:
        buffer = bytearray()
        answers = []
        for _ in range(3):
            await stream.send_all(STATUS)
            answers.append(await answer(stream, buffer))
        await stream.send_all(STATUS + STATUS)  # pipelined reads too
        answers += [await answer(stream, buffer), await answer(stream, buffer)]
    assert answers == [expected] * 5
    assert json.loads(expected.partition(b"\r\n\r\n")[2]) == control.status()
    assert reads.calls == 0  # main: h11 read every GET (and the connection was h11's for good)


async def test_an_event_stream_after_plain_requests_is_written_by_h11(
        served: tuple[Control, Path]) -> None:
    control, path = served
    async with await trio.open_unix_socket(str(path)) as stream:
        buffer = bytearray()
        await stream.send_all(STATUS)
        assert (await answer(stream, buffer)).startswith(b"HTTP/1.1 200 ")
        await stream.send_all(b"POST /v1/streams/s/records HTTP/1.1\r\nhost: meshd\r\n"
                              b'content-length: 15\r\n\r\n{"body": "one"}')
        assert (await answer(stream, buffer)).startswith(b"HTTP/1.1 201 ")
        await stream.send_all(b"GET /v1/events?types=entry HTTP/1.1\r\nhost: meshd\r\n\r\n")
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/v1/events", headers=[("host", "m")]))
        conn.send(h11.EndOfMessage())
        if buffer:
            conn.receive_data(bytes(buffer))
        while not isinstance(response := conn.next_event(), h11.Response):
            conn.receive_data(await stream.receive_some(65536))
        assert response.status_code == 200
        assert (b"transfer-encoding", b"chunked") in response.headers
        assert (b"connection", b"close") in response.headers
        # Subscribed before the head went out: an event published now is in the stream.
        control.events.publish("peer.up", device="x")  # not asked for
        control.events.publish("entry", stream="s", id="r9")
        lines: list[dict[str, Any]] = []
        while not lines:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            assert isinstance(event, h11.Data), event
            lines = [json.loads(line) for line in bytes(event.data).splitlines()
                     if json.loads(line)["type"] != "heartbeat"]
    assert [(line["type"], line["data"]) for line in lines] == [("entry", {"stream": "s", "id": "r9"})]


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The heads http1.parse_head is asked to parse, with an empty head cache."""
    calls: list[bytes] = []
    original = http1.parse_head

    def counted(buffer: bytes, max_bytes: int) -> Head | None:
        calls.append(bytes(buffer))
        return original(buffer, max_bytes)
    monkeypatch.setattr(http1, "parse_head", counted)
    # (main's server imported parse_head by name: counted there too, so main fails on the count)
    monkeypatch.setattr(httpserver, "parse_head", counted, raising=False)
    monkeypatch.setattr(http1, "_seen", {})
    return calls


def test_a_repeated_head_is_parsed_once(parses: list[bytes]) -> None:
    write = (b"POST /v1/streams/s/records HTTP/1.1\r\nhost: meshd\r\ncontent-length: 11\r\n\r\n"
             b'{"body":""}')
    for body in (b'{"body":""}', b'{"body":"x"}'[:11], b"0123456789a"):  # bodies differ, heads not
        assert cached_head(bytearray(write[:-11] + body), 16384) == parse_head(write, 16384)
    assert len(parses) == 1
    other = write.replace(b"11", b"12") + b" "  # another length: another head
    assert cached_head(other, 16384) == parse_head(other, 16384) and len(parses) == 2
    assert cached_head(STATUS, 16384) == Head("GET", "/v1/status", 0, len(STATUS))
    assert cached_head(STATUS, 4) is None  # the bound is part of the answer
    assert cached_head(write[:30], 16384) is None  # still arriving: never cached


def test_heads_left_to_h11_and_long_heads_are_parsed_each_time(parses: list[bytes]) -> None:
    for data in (STATUS_BY_H11, b"HEAD /v1/status HTTP/1.1\r\nhost: x\r\n\r\n"):
        assert cached_head(data, 16384) is None
        assert cached_head(data, 16384) is None
    long = b"POST /v1/x HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * http1.SEEN_HEAD_BYTES + b"\r\n\r\n"
    assert cached_head(long, 16384) == parse_head(long, 16384)
    assert cached_head(long, 16384) is not None
    assert len(parses) == 6


def test_the_head_cache_is_bounded(parses: list[bytes]) -> None:
    for n in range(http1.SEEN_HEADS * 2 + 1):
        assert cached_head(b"POST /v1/x%d HTTP/1.1\r\nhost: x\r\n\r\n" % n, 16384) is not None
        assert len(http1._seen) <= http1.SEEN_HEADS  # noqa: SLF001


async def test_a_writer_s_repeated_head_is_parsed_once_by_the_server(
        served: tuple[Control, Path], parses: list[bytes]) -> None:
    control, path = served
    async with await trio.open_unix_socket(str(path)) as stream:
        buffer = bytearray()
        for n in range(5):
            body = b'{"body": "n%d"}' % n
            await stream.send_all(b"POST /v1/streams/s/records HTTP/1.1\r\nhost: meshd\r\n"
                                  b"content-length: %d\r\n\r\n" % len(body) + body)
            assert (await answer(stream, buffer)).startswith(b"HTTP/1.1 201 ")
    assert control.written == [b"n%d" % n for n in range(5)]
    assert len(parses) == 1  # main: parse_head for each of the 5
