"""An API connection failing as the daemon stops: the bug is reported, the daemon stops cleanly.

The same shape as the peer sessions' stop bug (tests/shell/test_peer_stop.py): the daemon
stops by cancelling its nursery, and with it every API connection. A connection runs a
nursery of its own twice: the event stream (a pump and a hang-up watcher) and a pipelined
batch (the endpoint call and the next request's read-ahead, pipeline.py). A task of such a
nursery that raises in the instant the daemon's scope is cancelled makes the nursery raise
a group holding Cancelled next to that error (trio's inner scopes leave Cancelled to the
outermost cancelled scope), which passed httpserver._handle's `except Exception`. It did not
leave the daemon's nursery only because `async with stream` closes the socket with a
checkpoint, whose fresh Cancelled replaced the group: the bug was lost without a trace (no
log line, no meshd_internal_errors_total). On main the `bug` cases fail for that: nothing
reported. Each test cancels the daemon's scope from inside the failing task, so the two
happen in the same instant by construction.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import meshd.api.httpserver as httpserver
from meshd.api.events import Event
from meshd.api.routes import open_unix_listener
from meshd.api.values import EventStream, Request, Response

BATCH = (b"POST /v1/batch?stream=s HTTP/1.1\r\nhost: meshd\r\ncontent-length: 14\r\n\r\n"
         b'{"body":"x"}\r\n')


@pytest.fixture
def socket_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="meshd-", dir="/tmp") as directory:  # sun_path: 107 bytes
        yield Path(directory) / "api.sock"


def reported_bugs(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    reported: list[BaseException] = []
    monkeypatch.setattr(httpserver, "report_bug", lambda where, err: reported.append(err))
    return reported


def leaves(errors: list[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for error in errors:
        if isinstance(error, BaseExceptionGroup):
            out += leaves(list(error.exceptions))
        else:
            out.append(error)
    return out


async def serve_until_stopped(path: Path, dispatch: Any, subscribe: Any,
                              client: Any) -> trio.CancelScope:
    """Serve on path in a scope standing for the daemon's; run client(stream, daemon_scope)
    against it. Returns the daemon's scope once the server has ended."""
    listener = await open_unix_listener(path)
    with trio.CancelScope() as daemon_scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(httpserver.serve_http, listener, dispatch, subscribe,
                                        allowed_uids=set(), allowed_gids=set()))
            async with await trio.open_unix_socket(str(path)) as stream:
                await client(stream, daemon_scope)
                await trio.sleep_forever()  # until the daemon's scope is cancelled
    return daemon_scope


@pytest.mark.parametrize("error", [ValueError("a bug in the event pump"),
                                   trio.BrokenResourceError("socket connection broken")],
                         ids=["bug", "broken"])
async def test_an_event_stream_failing_as_the_daemon_stops_is_reported_not_raised(
        error: BaseException, socket_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reported = reported_bugs(monkeypatch)
    streaming = trio.Event()  # the pump waits for the next event (the head went out)
    published = trio.Event()

    class Subscription:
        async def next(self) -> Event:
            streaming.set()
            await published.wait()
            return Event("entries", {"first_seq": 1}, 1)

        def take_all(self) -> list[Event]:
            return []

    @asynccontextmanager
    async def subscribe(types: frozenset[str] | None) -> AsyncIterator[Subscription]:
        yield Subscription()

    async def events(request: Request) -> EventStream:
        return EventStream(None)

    def dispatch(method: str, target: str) -> tuple[Any, Request]:
        return events, Request(method, target, {})

    async def failing_send(self: Any, data: bytes) -> None:
        daemon_scope_box[0].cancel()  # the daemon stops in the instant the send fails
        raise error

    daemon_scope_box: list[trio.CancelScope] = []

    async def client(stream: trio.SocketStream, daemon_scope: trio.CancelScope) -> None:
        daemon_scope_box.append(daemon_scope)
        await stream.send_all(b"GET /v1/events HTTP/1.1\r\nhost: meshd\r\n\r\n")
        await streaming.wait()
        monkeypatch.setattr(httpserver._Connection, "send_bytes", failing_send)  # noqa: SLF001
        published.set()

    daemon_scope = await serve_until_stopped(socket_path, dispatch, subscribe, client)
    # It must not leave the daemon's nursery (a group holding it with Cancelled).
    assert daemon_scope.cancelled_caught
    # A bug is still reported; a client gone is not a bug.
    assert leaves(reported) == ([error] if isinstance(error, ValueError) else [])


async def test_a_read_ahead_failing_as_the_daemon_stops_is_reported_not_raised(
        socket_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reported = reported_bugs(monkeypatch)
    error = ValueError("a bug in dispatch")
    committing = trio.Event()
    calls = [0]

    async def batch(request: Request) -> Response:
        committing.set()
        await trio.sleep_forever()  # the batch commits until the daemon stops
        raise AssertionError

    batch.prepare = lambda request: None  # type: ignore[attr-defined]

    def dispatch(method: str, target: str) -> tuple[Any, Request]:
        calls[0] += 1
        if calls[0] == 2:  # the read-ahead's: fails as the daemon stops
            daemon_scope_box[0].cancel()
            raise error
        return batch, Request(method, "/v1/batch", {"stream": ["s"]})

    daemon_scope_box: list[trio.CancelScope] = []

    async def client(stream: trio.SocketStream, daemon_scope: trio.CancelScope) -> None:
        daemon_scope_box.append(daemon_scope)
        await stream.send_all(BATCH)
        await committing.wait()
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(BATCH)  # pipelined: read ahead while the first commits

    daemon_scope = await serve_until_stopped(socket_path, dispatch, lambda types: None, client)
    assert calls[0] == 2
    assert daemon_scope.cancelled_caught
    assert leaves(reported) == [error]  # still reported: a bug
