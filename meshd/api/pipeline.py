"""Reading and preparing a connection's next request while this one is in the daemon.

Theory of operation. A client that pipelines its requests (HTTP/1.1: sends request n+1
before the answer to n; `meshctl import` does, Client.import_lines) lets the server work on
request n+1 while request n commits. The server still answers in order and runs one request
of a connection at a time against the daemon; only the per-request work an endpoint can do
before it asks the daemon anything is done early: an endpoint may carry a `prepare`
function (a pure function of the request, e.g. decoding a batch body) that runs in a worker
thread. So while batch n is composed and committed by the store's writer thread, batch
n+1's body is read and decoded (issue 16: decode n+1 while n commits).

read_ahead() runs beside the endpoint call of a request whose endpoint can be prepared, and
stops at the first thing it does not expect, leaving every byte in the connection's buffer
for the normal path, which checks and answers it as it always does (limits, 403, 404, 413,
malformed requests): it reads at most one more request (head bounded by max_header_bytes,
body by max_body_bytes), prepares it only if it is plain (http1.parse_head), routed to an
endpoint with `prepare`, and complete. The answer it gives, an Ahead, holds the request's
exact bytes: the normal path uses the prepared value (and the body's bytes, rather than a
copy of its own) only for a request with those bytes.
The connection cancels read_ahead when the endpoint call ends, unless it is preparing (the
value is about to be used; cancelling would wait for the thread anyway).

A client gone or a socket error ends read_ahead with None; the normal path meets the same
end on its next read and closes the connection as before. A prepare that raises (a bug) is
not hidden: the normal path runs the endpoint unprepared and meets the same error, which is
reported there as every endpoint bug is.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .connio import ConnectionIO
from .http1 import parse_head
from .values import ApiError, EventStream, Request, Response

Endpoint = Callable[[Request], Awaitable["Response | EventStream"]]
Dispatch = Callable[[str, str], tuple[Endpoint, Request]]


@dataclass
class Ahead:
    """The next request's bytes (head and body) and its endpoint's prepare(request)."""

    head: bytes
    body: bytes
    prepared: Any

    def starts(self, buffer: bytearray, end: int) -> bool:
        """buffer starts with this very request, `end` bytes long: compared in place (a
        batch is ~1 MiB; a copy of it costs a fresh allocation whose pages all fault)."""
        return (len(self.head) + len(self.body) == end and buffer.startswith(self.head)
                and buffer.startswith(self.body, len(self.head)))


@dataclass
class ReadAhead:
    """One read-ahead's state: preparing (a worker thread is running), and its result."""

    preparing: bool = False
    ahead: Ahead | None = None


def preparer(endpoint: Endpoint) -> Callable[[Request], Any] | None:
    """The endpoint's prepare function, if it has one."""
    return getattr(endpoint, "prepare", None)


async def read_ahead(state: ReadAhead, io: ConnectionIO, buffer: bytearray, dispatch: Dispatch, *,
                     max_header_bytes: int, max_body_bytes: int) -> None:
    """Read the next request into buffer and prepare it (module docstring); the result goes
    to state.ahead. Never raises for anything the client does."""
    try:
        while (head := parse_head(bytes(buffer[:max_header_bytes + 4]), max_header_bytes)) is None:
            if b"\r\n\r\n" in buffer or len(buffer) > max_header_bytes + 4:
                return  # a head that is not plain, or too long: the normal path's business
            if not await _read_more(io, buffer):
                return
        if head.content_length > max_body_bytes:
            return
        try:
            endpoint, request = dispatch(head.method, head.target)
        except ApiError:
            return
        prepare = preparer(endpoint)
        if prepare is None:
            return
        end = head.size + head.content_length
        while len(buffer) < end:
            if not await _read_more(io, buffer):
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    with memoryview(buffer) as view:  # (one copy of the body, not a slice's and then bytes')
        request.body = bytes(view[head.size:end])
    state.preparing = True
    try:
        prepared = await trio.to_thread.run_sync(prepare, request)
    except Exception:  # a bug: the normal path meets it again and reports it (docstring)
        return
    finally:
        state.preparing = False
    state.ahead = Ahead(bytes(buffer[:head.size]), request.body, prepared)


async def _read_more(io: ConnectionIO, buffer: bytearray) -> bool:
    data = await io.receive_some(math.inf)  # the connection cancels this read when done
    if not data:
        return False
    buffer += data
    return True
