"""An import whose request n of several is refused as a whole (a full disk, the device
removed from its circle) or whose connection ends mid-way (review s9). The records of the
requests answered before and after it are durable: Client.import_lines must say which lines
those were, which lines were refused and from which line nothing was sent, so that the
caller can resume without writing any record twice; and it must send nothing more once a
request was refused (what was already sent is answered and counted)."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.api import routes
from meshd.api.client import Client, ClientError, ImportInterrupted
from meshd.api.pipelined import post_pipelined
from meshd.api.routes import open_unix_listener, serve_api
from meshd.cmd import meshctl
from meshd.errors import Conflict, StorageFull

LINES_PER_REQUEST = 5
REQUEST_BYTES = 120  # five lines of 24 bytes ({"body": "line 00001"}\n) per request


class Control:
    """write_puts in memory; the request numbered `refuse` (from 1) waits until the request
    after it has been read and decoded by the server (it is on its way: pipelined), then is
    refused with `error`."""

    def __init__(self, refuse: int, error: Exception) -> None:
        self.refuse = refuse
        self.error = error
        self.calls = 0
        self.batches: list[list[bytes]] = []
        self.decoded = 0
        self.next_decoded = trio.Event()

    def require_member(self) -> None:
        return None

    async def write_puts(self, stream: str, bodies: list[bytes]) -> list[tuple[str, int]]:
        self.calls += 1
        if self.calls == self.refuse:
            with trio.fail_after(10):
                await self.next_decoded.wait()
            raise self.error
        self.batches.append(bodies)
        start = sum(map(len, self.batches[:-1]))
        return [(f"r{n}", n) for n in range(start + 1, start + len(bodies) + 1)]


@pytest.fixture
async def served(nursery: trio.Nursery, short_dir: Path,
                 monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
                 ) -> AsyncIterator[tuple[Control, Path]]:
    control = Control(*request.param)
    token = trio.lowlevel.current_trio_token()
    original = routes._parse_batch

    def parse(body: bytes, stream: str | None) -> Any:  # (in a worker thread, or trio's)
        result = original(body, stream)
        control.decoded += 1
        if control.decoded == control.refuse + 1:
            token.run_sync_soon(control.next_decoded.set)
        return result
    monkeypatch.setattr(routes, "_parse_batch", parse)
    path = short_dir / "meshd.sock"
    listener = await open_unix_listener(path)
    await nursery.start(partial(serve_api, control, listener, allowed_uids=set()))  # type: ignore[arg-type]
    yield control, path


def texts(count: int) -> list[str]:
    return [f"line {n:05d}" for n in range(1, count + 1)]  # 24 bytes as a line


def encoded(lines: list[str]) -> list[bytes]:
    return [json.dumps({"body": text}).encode() for text in lines]


FULL = StorageFull("storage-full", "the disk is full; free some disk space and retry")


@pytest.mark.parametrize("served", [(2, FULL)], indirect=True)
async def test_a_refused_request_reports_what_was_written_around_it(served: tuple[Control, Path]) -> None:
    control, path = served
    lines = texts(6 * LINES_PER_REQUEST)
    with pytest.raises(ImportInterrupted) as caught:
        await trio.to_thread.run_sync(lambda: Client(path).import_lines(
            encoded(lines), "s", request_bytes=REQUEST_BYTES))
    error = caught.value
    assert isinstance(error, ClientError)  # (callers catching ClientError still do)
    assert (error.status, error.code) == (507, "storage-full")
    # Requests 1 and 3 were written (3 was on its way when 2 was refused); nothing after.
    assert control.batches == [[t.encode() for t in lines[0:5]], [t.encode() for t in lines[10:15]]]
    assert error.result["written"] == 10
    assert error.result["refused"] == [{"first_line": 6, "last_line": 10, "status": 507, "error": {
        "code": "storage-full", "message": "the disk is full; free some disk space and retry"}}]
    assert error.result["not_sent_from"] == 16
    assert error.result["errors"] == [] and error.result["failed"] == 0


@pytest.mark.parametrize("served", [(3, Conflict("not-a-member", "this device was removed"))],
                         indirect=True)
async def test_meshctl_import_says_which_lines_to_send_again(
        served: tuple[Control, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    control, path = served
    # meshctl sends requests of up to BATCH_REQUEST_BYTES: five of these lines each
    lines = [f"{n:05d} " + "x" * 200_000 for n in range(1, 5 * LINES_PER_REQUEST + 1)]
    stdin = io.TextIOWrapper(io.BytesIO(b"".join(line + b"\n" for line in encoded(lines))))
    monkeypatch.setattr("sys.stdin", stdin)
    status = await trio.to_thread.run_sync(
        meshctl.main, ["--socket", str(path), "import", "--stream", "s"])
    out, err = capsys.readouterr()
    assert status == meshctl.EXIT_DAEMON_ERROR
    assert [len(batch) for batch in control.batches] == [5, 5, 5]  # requests 1, 2 and 4
    assert control.batches[2][0] == lines[15].encode()
    assert "this device was removed [not-a-member]" in err
    assert "Imported 15 records" in out
    assert "lines 11-15 were refused" in err
    assert "lines from 21 on were not sent" in err


async def test_a_connection_that_ends_mid_import_reports_the_unanswered_lines(
        nursery: trio.Nursery, short_dir: Path) -> None:
    """A daemon that answers the first request, then goes (killed while the second one was
    on its way): the lines of the first are written, those of the requests sent since may or
    may not be, and the rest were not sent."""
    path = short_dir / "meshd.sock"
    listener = await open_unix_listener(path)
    answered = json.dumps({"written": 5, "failed": 0, "results": []}).encode()

    async def daemon_that_goes() -> None:
        async with listener:
            stream = await listener.accept()
        async with stream:
            buffer = b""
            while b"\r\n\r\n" not in buffer or len(buffer) < buffer.index(b"\r\n\r\n") + 4 + 120:
                buffer += await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                  b"content-length: %d\r\n\r\n" % len(answered) + answered)
            await stream.receive_some(10)  # part of the second request
    nursery.start_soon(daemon_that_goes)
    lines = texts(6 * LINES_PER_REQUEST)
    with pytest.raises(ImportInterrupted) as caught:
        await trio.to_thread.run_sync(lambda: Client(path).import_lines(
            encoded(lines), "s", request_bytes=REQUEST_BYTES))
    result = caught.value.result
    assert caught.value.code in ("disconnected", "connection-failed")  # (EOF, or a reset)
    assert (result["written"], result["refused"]) == (5, [])
    unanswered = result["unanswered"]
    assert unanswered[0] == {"first_line": 6, "last_line": 10}
    # Every line after the first request is accounted for: unanswered, then not sent.
    covered = [n for request in unanswered for n in range(request["first_line"], request["last_line"] + 1)]
    end = result["not_sent_from"] or len(lines) + 1
    assert covered + list(range(end, len(lines) + 1)) == list(range(6, len(lines) + 1))


async def test_nothing_is_sent_after_an_error_answer(nursery: trio.Nursery, short_dir: Path) -> None:
    """post_pipelined: the request already on its way is answered; no later one is sent.
    The server reads until the client closes, so it sees every request that was sent."""
    path = short_dir / "meshd.sock"
    listener = await open_unix_listener(path)
    refused = b'{"error": {"code": "storage-full", "message": "full"}}'
    received = trio.Event()
    requests: list[bytes] = []

    async def daemon() -> None:
        # Batch 1 is answered once batch 2 is in (two are in flight): the error arrives while
        # the client has batches 3-6 still to send.
        async with listener, await listener.accept() as stream:
            buffer = b""
            while data := await stream.receive_some(65536):
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, rest = buffer.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if len(rest) < length:
                        break
                    requests.append(rest[:length])
                    buffer = rest[length:]
                    if len(requests) == 2:
                        await stream.send_all(b"HTTP/1.1 507 Insufficient Storage\r\ncontent-length: %d"
                                              b"\r\n\r\n%s" % (len(refused), refused))
                    if len(requests) >= 2:
                        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
        received.set()
    nursery.start_soon(daemon)

    def post_all() -> list[int]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            return [status for status, _ in post_pipelined(
                sock, "/v1/batch", "application/x-ndjson", (b"batch %d" % n for n in range(1, 7)))]
    statuses = await trio.to_thread.run_sync(post_all)
    with trio.fail_after(10):
        await received.wait()
    assert statuses == [507, 200]
    assert requests == [b"batch 1", b"batch 2"]  # batch 2 was on its way; 3-6 never sent
