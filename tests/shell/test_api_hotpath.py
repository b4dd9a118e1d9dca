"""The write path's per-request costs (issue 16): what a plain write no longer pays for, and
that each cut answers exactly what the long way did.

- A socket that is ready costs no timer (meshd/api/connio.py): an answer the socket takes at
  once, and a request already waiting in it, are sent and read without a cancel scope; an
  answer larger than the socket's buffer still arrives whole.
- Each route's endpoint is bound once per server, not once per request (routes.serve_api).
- A target that is only a path is split without urlsplit/parse_qs, with their answer
  (routing.split_target); a response head for the usual answer is cached, byte for byte
  response_head's (http1.plain_response_head).
- A plain JSON body is not walked for lone surrogates and depth (values._plainly_fine), and
  every body that could hold either still is.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from meshd.api import routes, values
from meshd.api.events import EventBus
from meshd.api.http1 import plain_response_head, response_head
from meshd.api.routes import open_unix_listener, serve_api
from meshd.api.routing import split_target
from meshd.api.values import ApiError, Request


class Control:
    """Writes and batches in memory; a write whose body is in holds waits for its event."""

    def __init__(self) -> None:
        self.events = EventBus()
        self.written: list[tuple[str, bytes]] = []
        self.holds: dict[bytes, trio.Event] = {}
        self.held: list[bytes] = []
        self.on_hold: Any = None

    def require_member(self) -> None:
        return None

    async def write(self, stream: str, record_id: str | None, body: bytes) -> dict[str, Any]:
        if body in self.holds:
            self.held.append(body)
            if self.on_hold is not None:
                self.on_hold(body)
            await self.holds[body].wait()
        self.written.append((stream, body))
        return {"id": record_id or f"r{len(self.written)}", "stream": stream, "seq": len(self.written)}

    async def write_puts(self, stream: str, bodies: list[bytes]) -> list[tuple[str, int]]:
        start = len(self.written)
        self.written += [(stream, body) for body in bodies]
        return [(f"r{n}", n) for n in range(start + 1, len(self.written) + 1)]


@pytest.fixture
async def served(nursery: trio.Nursery, short_dir: Path) -> AsyncIterator[tuple[Control, Path]]:
    control = Control()
    path = short_dir / "meshd.sock"
    listener = await open_unix_listener(path)
    await nursery.start(partial(serve_api, control, listener, allowed_uids=set()))  # type: ignore[arg-type]
    yield control, path


def post(target: str, body: bytes) -> bytes:
    return (f"POST {target} HTTP/1.1\r\nhost: meshd\r\ncontent-length: {len(body)}\r\n\r\n"
            .encode() + body)


async def read_answer(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bytes]:
    """(status, body) of the next answer on stream; buffer keeps what follows it."""
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive_some(65536)
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    end = len(head) + 4 + length
    while len(buffer) < end:
        buffer += await stream.receive_some(65536)
    status = int(head.split(b" ")[1])
    body = bytes(buffer[len(head) + 4:end])
    del buffer[:end]
    return status, body


class CountTimers:
    """Counts the timers (trio.move_on_after / move_on_at / fail_after) made while on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        self.count = 0
        for name in ("move_on_after", "move_on_at", "fail_after"):
            original = getattr(trio, name)
            monkeypatch.setattr(trio, name, self._counted(original))

    def _counted(self, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.on:
                self.count += 1
            return original(*args, **kwargs)
        return counted


async def test_a_ready_socket_costs_no_timer(served: tuple[Control, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests 2 and 3 arrive while request 1 is in the daemon; from its release until
    request 3 is in the daemon, reading request 2 and sending answers 1 and 2 happen on a
    ready socket: no timer at all."""
    control, path = served
    timers = CountTimers(monkeypatch)
    control.holds = {b"one": trio.Event(), b"three": trio.Event()}
    held = trio.Event()

    def on_hold(body: bytes) -> None:
        if body == b"three":
            timers.on = False
        held.set()
    control.on_hold = on_hold
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(post("/v1/streams/s/records", b'{"body": "one"}'))
        await held.wait()  # request 1 is read and held in the daemon
        await stream.send_all(post("/v1/streams/s/records", b'{"body": "two"}')
                              + post("/v1/streams/s/records", b'{"body": "three"}'))
        timers.on = True
        control.holds[b"one"].set()
        buffer = bytearray()
        answers = [await read_answer(stream, buffer), await read_answer(stream, buffer)]
        assert control.held == [b"one", b"three"] and not timers.on
        control.holds[b"three"].set()
        answers.append(await read_answer(stream, buffer))
    assert [(status, json.loads(body)["id"]) for status, body in answers] == [
        (201, "r1"), (201, "r2"), (201, "r3")]
    assert control.written == [("s", b"one"), ("s", b"two"), ("s", b"three")]
    assert timers.count == 0


async def test_an_answer_larger_than_the_socket_buffer_arrives_whole(
        served: tuple[Control, Path]) -> None:
    control, path = served
    count = 40_000  # an answer of ~1.3 MB: more than a unix socket takes at once
    body = b"".join(b'{"body": "x%d"}\n' % n for n in range(count))
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(post("/v1/batch?stream=s", body))
        status, answer = await read_answer(stream, bytearray())
    parsed = json.loads(answer)
    assert (status, parsed["written"], parsed["failed"]) == (200, count, 0)
    assert [r["seq"] for r in parsed["results"]] == list(range(1, count + 1))
    assert len(control.written) == count


async def test_each_route_is_bound_once_per_server(served: tuple[Control, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    control, path = served
    bound: list[str] = []
    original = routes.endpoint

    def counting(route: routes.Route, control: Any) -> Any:
        bound.append(route.handler.__name__)
        return original(route, control)
    monkeypatch.setattr(routes, "endpoint", counting)
    async with await trio.open_unix_socket(str(path)) as stream:
        buffer = bytearray()
        for n in range(3):
            await stream.send_all(post("/v1/streams/s/records", b'{"body": "%d"}' % n))
            assert (await read_answer(stream, buffer))[0] == 201
    assert bound == ["_write"]
    assert len(control.written) == 3


@given(st.text(alphabet="/ab%?#=&:;[]@!\"'~ \t\x7f\xe9", max_size=12))
def test_a_target_splits_as_urlsplit_and_parse_qs_split_it(tail: str) -> None:
    for target in ("/" + tail, tail):
        try:
            parts = urlsplit(target)
            want: Any = (parts.path, parse_qs(parts.query, keep_blank_values=True, errors="strict"))
        except (ValueError, UnicodeDecodeError) as err:
            want = type(err)
        try:
            got: Any = split_target(target)
        except (ValueError, UnicodeDecodeError) as err:
            got = type(err)
        assert got == want


@given(st.sampled_from(list(HTTPStatus)),
       st.sampled_from(["application/json", "text/plain; version=0.0.4; charset=utf-8"]),
       st.integers(min_value=0, max_value=10**9))
def test_the_cached_response_head_is_response_heads_bytes(status: HTTPStatus, content_type: str,
                                                          length: int) -> None:
    assert plain_response_head(status.value, content_type, length) == response_head(
        status.value, [("content-type", content_type), ("content-length", str(length))])


def test_a_plain_json_body_is_not_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    def walked(value: Any) -> None:
        raise AssertionError("walked")
    monkeypatch.setattr(values, "_check_json", walked)
    body = b'{"id": "a-1", "body": "' + b"x" * 200 + b'", "n": [1, {"k": 2}]}'
    assert Request("POST", "/", {}, body=body).json()["id"] == "a-1"


@pytest.mark.parametrize("body", [
    b'{"body": "\\ud800"}',                                  # a lone surrogate, escaped
    b'{"body": "\xed\xa0\x80"}',                             # encoded in UTF-8 (json.loads takes it)
    '{"body": "\\ud800"}'.encode("utf-16"),                  # escaped, in UTF-16 (no b"\\u")
    b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}",                 # nested too deep
])
def test_a_body_that_may_hold_what_no_route_may_see_is_still_refused(body: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        Request("POST", "/", {}, body=body).json()
    assert (caught.value.status, caught.value.code) == (400, "bad-json")


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=3)
                    | st.dictionaries(st.text(max_size=3), children, max_size=3), max_leaves=40),
       st.booleans())
def test_a_body_passed_unwalked_is_one_the_walk_passes(value: Any, ascii_only: bool) -> None:
    body = json.dumps({"v": value}, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    if values._plainly_fine(body):
        values._check_json(json.loads(body))  # raises if the shortcut let a bad body through


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=3)
                    | st.dictionaries(st.text(max_size=3), children, max_size=3), max_leaves=30))
def test_answers_are_json_dumps_bytes(value: Any) -> None:
    assert values.compact_json(value) == json.dumps(value, separators=(",", ":")).encode() + b"\n"


def test_an_answer_builds_no_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    def dumps(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("json.dumps builds a JSONEncoder per call")
    monkeypatch.setattr(json, "dumps", dumps)
    answer = values.plain_json_response({"id": "a", "stream": "s", "seq": 3}, 201)
    assert (answer.status, answer.body) == (201, b'{"id":"a","stream":"s","seq":3}\n')
    assert values.json_response({"b": b"\x01"}).body == b'{"b":"01"}\n'
