"""Pipelined batch requests (issue 16): the server decodes batch n+1 while batch n is in the
daemon (meshd/api/pipeline.py), and Client.import_lines sends batch n+1 before batch n is
answered (meshd/api/pipelined.py). Answers stay in order, and whatever follows a batch on
the connection is answered exactly as before."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.api import routes
from meshd.api.client import Client, ClientError
from meshd.api.pipeline import Ahead
from meshd.api.routes import open_unix_listener, serve_api
from tests.shell.test_api_hotpath import post, read_answer


class Control:
    """write_puts in memory; the first batch waits for `release`."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.release = trio.Event()
        self.first_in = trio.Event()

    def require_member(self) -> None:
        return None

    async def write_puts(self, stream: str, bodies: list[bytes]) -> list[tuple[str, int]]:
        if not self.batches:
            self.batches.append(bodies)
            self.first_in.set()
            await self.release.wait()
        else:
            self.batches.append(bodies)
        start = sum(map(len, self.batches[:-1]))
        return [(f"r{n}", n) for n in range(start + 1, start + len(bodies) + 1)]


@pytest.fixture
async def served(nursery: trio.Nursery, short_dir: Path) -> AsyncIterator[tuple[Control, Path]]:  # noqa: F811
    control = Control()
    path = short_dir / "meshd.sock"
    listener = await open_unix_listener(path)
    await nursery.start(partial(serve_api, control, listener, allowed_uids=set()))  # type: ignore[arg-type]
    yield control, path


def lines(*texts: str) -> bytes:
    return "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()


def decodes_while(control: Control, monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[bytes, bool]], trio.Event]:
    """Each batch body decoded, and whether the first batch was held in the daemon then;
    and an event set once two bodies are decoded (from whichever thread decodes them)."""
    seen: list[tuple[bytes, bool]] = []
    two = trio.Event()
    token = trio.lowlevel.current_trio_token()
    original = routes._parse_batch

    def parse(body: bytes, stream: str | None) -> Any:
        seen.append((body, control.first_in.is_set() and not control.release.is_set()))
        if len(seen) == 2:
            token.run_sync_soon(two.set)
        return original(body, stream)
    monkeypatch.setattr(routes, "_parse_batch", parse)
    return seen, two


async def test_the_next_batch_is_decoded_while_this_one_is_in_the_daemon(
        served: tuple[Control, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    control, path = served
    seen, decoded = decodes_while(control, monkeypatch)
    one, two = lines("a", "b"), lines("c")
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(post("/v1/batch?stream=s", one) + post("/v1/batch?stream=s", two))
        await control.first_in.wait()
        with trio.fail_after(5):
            await decoded.wait()  # batch 2, decoded while batch 1 is held
        control.release.set()
        buffer = bytearray()
        answers = [json.loads((await read_answer(stream, buffer))[1]) for _ in range(2)]
    assert seen == [(one, False), (two, True)]
    assert [[r["seq"] for r in a["results"]] for a in answers] == [[1, 2], [3]]
    assert control.batches == [[b"a", b"b"], [b"c"]]


@pytest.mark.parametrize(("after", "status"), [
    (post("/v1/nowhere", b"x"), 404),
    (b"POST /v1/batch?stream=s HTTP/1.1\r\nhost: m\r\ncontent-length: 2000000\r\n\r\n", 413),
    (b"GET /v1/batch HTTP/1.1\r\nhost: m\r\n\r\n", 405),
    (b"POST /v1/batch?stream=s HTTP/1.1\r\nhost: m\r\ncontent-length: x\r\n\r\n", 400),
])
async def test_what_follows_a_batch_is_answered_in_order_as_before(
        served: tuple[Control, Path], after: bytes, status: int) -> None:
    control, path = served
    async with await trio.open_unix_socket(str(path)) as stream:
        await stream.send_all(post("/v1/batch?stream=s", lines("a")) + after)
        await control.first_in.wait()
        control.release.set()
        buffer = bytearray()
        first = await read_answer(stream, buffer)
        second = await read_answer(stream, buffer)
    assert (first[0], json.loads(first[1])["written"]) == (200, 1)
    assert second[0] == status
    assert control.batches == [[b"a"]]


async def test_import_lines_sends_the_next_batch_before_this_one_is_answered(
        served: tuple[Control, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 1 is held in the daemon until batch 2 has been decoded: only a pipelining
    client gets past that (a client that waits for each answer would wait forever)."""
    control, path = served
    seen, decoded = decodes_while(control, monkeypatch)

    async def release_after_the_second_decode() -> None:
        await decoded.wait()
        control.release.set()

    texts = [f"line {n:03d}" for n in range(300)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_after_the_second_decode)
            result = await trio.to_thread.run_sync(lambda: Client(path).import_lines(
                (json.dumps({"body": t}).encode() for t in texts), "s", request_bytes=2000))
    assert (result["written"], result["failed"], result["errors"]) == (300, 0, [])
    assert [b for batch in control.batches for b in batch] == [t.encode() for t in texts]
    assert seen[1][1]  # the second batch was decoded while the first was held


async def test_import_lines_reports_a_refused_request_as_the_daemons_error(
        served: tuple[Control, Path]) -> None:
    control, path = served
    control.release.set()
    client = Client(path)
    with pytest.raises(ClientError) as caught:
        await trio.to_thread.run_sync(lambda: client.import_lines(
            [json.dumps({"body": "x" * 700_000}).encode()] * 2, "s", request_bytes=2 * 1024 * 1024))
    assert (caught.value.status, caught.value.code) == (413, "too-large")
    assert control.batches == []


def test_a_read_ahead_request_is_recognised_in_place_by_its_exact_bytes() -> None:
    """The normal path takes the read-ahead's prepared value and body (no copy of its own)
    only for the very bytes read ahead: compared in the buffer, where they still are."""
    request = post("/v1/batch?stream=s", lines("a", "b"))
    size = request.index(b"\r\n\r\n") + 4
    ahead = Ahead(request[:size], request[size:], prepared=object())
    assert ahead.starts(bytearray(request + b"POST /next"), len(request))
    assert not ahead.starts(bytearray(request), len(request) - 1)  # another length
    changed = bytearray(request)
    changed[-3] ^= 1  # one bit of the body
    assert not ahead.starts(changed, len(request))
    assert not ahead.starts(bytearray(request.replace(b"stream=s", b"stream=t")), len(request))
