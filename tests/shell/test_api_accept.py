"""What a request on a NEW connection costs the daemon's trio thread (issue 20: CPU per
daemon; issue 16: writers that connect per write, as curl or the soak's writer do).

Counted, never timed: the trio task steps the server runs per new-connection request
(a trio Instrument), the tasks it starts, the calls that cannot succeed on a unix socket
(TCP setsockopt) and the h11 connections built for plain requests. On main
(trio.serve_listeners and a trio.SocketStream per connection) a new-connection request took
6.9 task steps against 1.1 for a keep-alive one, two failing setsockopt calls and an unused
h11.Connection; here 3.0 steps (accept, request, the client's close) and none of those.

The accept loop keeps trio.serve_listeners' guarantees (tested here too): EMFILE pauses
accepting instead of ending it, a client-caused accept error is skipped, a bug in one
connection ends that connection only, and stopping closes the listener and every connection.

The client is the test's own task, whose steps are not counted, with standard-library
socket calls that never wait: every step counted is the server's.
"""

from __future__ import annotations

import errno
import socket
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

import meshd.api.httpserver as httpserver
from meshd.api import accept
from meshd.api.routes import open_unix_listener
from meshd.api.values import Request, Response

REQUESTS = 40
WRITE = b"POST /v1/w HTTP/1.1\r\nhost: meshd\r\ncontent-length: 2\r\n\r\n{}"


class StepCounter(trio.abc.Instrument):
    """Task steps of every task but the test's own; tasks spawned."""

    def __init__(self, ignored: trio.lowlevel.Task) -> None:
        self.ignored = ignored
        self.steps = 0
        self.spawned = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self.ignored:
            self.steps += 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


async def write(request: Request) -> Response:
    return Response(200, b'{"ok":true}')


def dispatch(method: str, target: str) -> tuple[Any, Request]:
    return write, Request(method, target, {})


async def _answer(sock: socket.socket) -> bytes:
    """The server's answer on sock (one read: it is sent in one piece)."""
    await trio.lowlevel.wait_readable(sock)
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"ok":true}'), answer
    return answer


async def _close(sock: socket.socket) -> None:
    """Close the client's end and see the server close its own."""
    sock.shutdown(socket.SHUT_WR)
    await trio.lowlevel.wait_readable(sock)
    assert sock.recv(4096) == b""
    sock.close()


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))  # (a unix socket connects at once, before the server accepts)
    sock.setblocking(False)
    return sock


async def new_connection_requests(path: Path, count: int) -> None:
    """count requests, each on a connection of its own, as curl or the soak's writer send
    them: connect, send, read the answer, close. The client's socket calls never wait (the
    test's task runs them between the server's steps), so the count does not depend on how
    the two interleave."""
    for _ in range(count):
        sock = _connect(path)
        sock.sendall(WRITE)
        await _answer(sock)
        await _close(sock)


async def keep_alive_requests(path: Path, count: int) -> None:
    sock = _connect(path)
    for _ in range(count):
        sock.sendall(WRITE)
        await _answer(sock)
    await _close(sock)


async def count_server_steps(path: Path, client: Any) -> StepCounter:
    """The server's task steps and spawns while client(path, REQUESTS) runs."""
    listener = await open_unix_listener(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(httpserver.serve_http, listener, dispatch, None,
                                    allowed_uids=set(), allowed_gids=set()))
        await trio.testing.wait_all_tasks_blocked()
        counter = StepCounter(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(counter)
        try:
            with trio.fail_after(30):  # (a bound for a server that never answers, not a measure)
                await client(path, REQUESTS)
        finally:
            trio.lowlevel.remove_instrument(counter)
        nursery.cancel_scope.cancel()
    return counter


async def test_a_new_connection_costs_few_task_steps_more_than_a_keep_alive_request(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setsockopts: list[tuple[Any, ...]] = []
    real_setsockopt = socket.socket.setsockopt

    def counted_setsockopt(self: socket.socket, *args: Any) -> None:
        setsockopts.append(args)
        real_setsockopt(self, *args)

    monkeypatch.setattr(socket.socket, "setsockopt", counted_setsockopt)
    h11_connections: list[Any] = []
    real_h11 = h11.Connection
    monkeypatch.setattr(h11, "Connection", lambda *args, **kwargs: h11_connections.append(args)
                        or real_h11(*args, **kwargs))
    fresh = await count_server_steps(short_dir / "a.sock", new_connection_requests)
    kept = await count_server_steps(short_dir / "b.sock", keep_alive_requests)
    per_fresh = fresh.steps / REQUESTS
    per_kept = kept.steps / REQUESTS
    print(f"task steps per request: new connection {per_fresh:.2f}, keep-alive {per_kept:.2f};"
          f" tasks spawned per new connection {fresh.spawned / REQUESTS:.2f}")
    # One task per connection, started once; its accept, request, answer and close.
    assert fresh.spawned <= REQUESTS
    # One step each for the accept, the request and the client's close. On main 7.0 against
    # 1.2 (the accept loop and listener, the handler and its wrapper, two closes).
    assert per_fresh <= per_kept + 2
    # TCP options on a unix socket only fail (on main: TCP_NODELAY and TCP_NOTSENT_LOWAT).
    assert setsockopts == []
    # Plain requests are served without h11 (http1.py): no h11 state is built for them.
    assert h11_connections == []


async def test_accept_pauses_on_emfile_and_skips_an_aborted_connection(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """trio.serve_listeners' rules, kept by the accept loop: out of descriptors, log and
    accept again after a pause (neither a spin nor the server's end); a connection a client
    aborted is skipped."""
    failures = [OSError(errno.EMFILE, "Too many open files"),
                OSError(errno.ECONNABORTED, "Software caused connection abort")]
    calls = [0]
    real_accept = accept._accept  # noqa: SLF001

    def failing_accept(listening: socket.socket) -> socket.socket:
        calls[0] += 1
        if failures:
            raise failures.pop(0)
        return real_accept(listening)

    monkeypatch.setattr(accept, "_accept", failing_accept)
    counter = await count_server_steps(short_dir / "a.sock", new_connection_requests)
    assert failures == []
    assert calls[0] >= REQUESTS + 2  # every connection was served after both errors
    assert counter.spawned >= REQUESTS
    assert "EMFILE" in caplog.text


async def test_a_bug_in_one_connection_ends_it_and_the_next_is_served(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accept loop's tasks keep httpserver's containment: a bug before the request is
    read (here in the credentials check) is reported and ends that connection only."""
    reported: list[BaseException] = []
    monkeypatch.setattr(httpserver, "report_bug", lambda where, err: reported.append(err))
    bug = ValueError("a bug in the credentials check")
    real = httpserver.peer_credentials
    calls = [0]

    def peer_credentials(sock: Any) -> tuple[int, int, int]:
        calls[0] += 1
        if calls[0] == 1:
            raise bug
        return real(sock)

    monkeypatch.setattr(httpserver, "peer_credentials", peer_credentials)
    path = short_dir / "a.sock"
    listener = await open_unix_listener(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(httpserver.serve_http, listener, dispatch, None,
                                    allowed_uids=set(), allowed_gids=set()))
        with trio.fail_after(30):
            with _connect(path) as first:
                first.sendall(WRITE)
                await trio.lowlevel.wait_readable(first)
                try:  # that connection ended, unanswered (reset: its request was never read)
                    assert first.recv(4096) == b""
                except ConnectionResetError:
                    pass
            await new_connection_requests(path, 2)
        nursery.cancel_scope.cancel()
    assert reported == [bug]


async def test_stopping_the_server_closes_the_listener_and_every_connection(short_dir: Path) -> None:
    path = short_dir / "a.sock"
    listener = await open_unix_listener(path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(httpserver.serve_http, listener, dispatch, None,
                                        allowed_uids=set(), allowed_gids=set()))
            idle = _connect(path)  # a keep-alive connection, waiting for its next request
            idle.sendall(WRITE)
            await _answer(idle)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert listener.socket.fileno() == -1
        await trio.lowlevel.wait_readable(idle)
        assert idle.recv(4096) == b""  # the server closed its end
        idle.close()
        with socket.socket(socket.AF_UNIX) as late, pytest.raises(ConnectionRefusedError):
            late.connect(str(path))
