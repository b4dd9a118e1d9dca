"""The local API server over a real unix socket, driven by raw HTTP (h11 on the client side).

FakeControl stands in for the daemon: in-memory streams, fixed devices, and switches to make
it raise. Each test checks what a client sees on the wire, so a change to the routes, the
error codes or the limits shows up here.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from meshd import errors as meshd_errors
from meshd.api import eventstream, httpserver
from meshd.api.errors import STATUS, api_error
from meshd.api.events import EventBus
from meshd.api.metrics import INTERNAL_ERRORS, MeshdMetrics, Registry
from meshd.api.routes import ApiError, ApiSocketError, open_unix_listener, serve_api
from meshd.errors import Forbidden, NotFound
from tests.polling import poll_until


class FakeControl:
    """A DaemonControl with in-memory state; `broken` makes peers() hit a bug."""

    def __init__(self) -> None:
        self.events = EventBus()
        self.metrics = MeshdMetrics()
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.relay_list: list[dict[str, Any]] = []
        self.relay_tokens: list[bytes | None] = []  # the enrolment token of each add_relay
        self.device_list = [
            {"id": "a1b2c3d4", "name": "laptop", "this": True},
            {"id": "e5f6a7b8", "name": "pi", "this": False},
        ]
        self.broken = False
        self.calls: list[tuple[Any, ...]] = []
        self.join_gate: trio.Event | None = None
        self.forced = False
        self.removal_words: list[str] | None = None
        self.recover_options: list[tuple[bool, list[str] | None]] = []
        self.member = True  # False: removed from its circle

    def require_member(self) -> None:
        if not self.member:
            raise meshd_errors.Conflict("not-a-member", "this device has been removed from its circle")

    def status(self) -> dict[str, Any]:
        return {"device": {"id": "a1b2c3d4", "name": "laptop"}, "circle": "c0ffee", "peers": 1}

    def peers(self) -> list[dict[str, Any]]:
        if self.broken:
            raise RuntimeError("epoch key 0123456789abcdef leaked into a message")
        return [{"device": "e5f6a7b8" * 8, "name": "pi", "path": "lan", "address": "127.0.0.1:7743"}]

    def devices(self) -> list[dict[str, Any]]:
        return self.device_list

    async def invite(self) -> dict[str, Any]:
        return {"code": "17-purple-sausage", "expires_in_s": 300}

    async def join(self, code: str) -> dict[str, Any]:
        self.calls.append(("join", code))
        if code != "17-purple-sausage":
            raise Forbidden("wrong-code", "the code did not match; ask for a new invitation")
        self.events.publish("pair.found", address="127.0.0.1:7743")
        if self.join_gate is not None:
            await self.join_gate.wait()
        self.events.publish("pair.done", circle="c0ffee")
        return {"circle": "c0ffee", "device": "0a0b0c0d", "sas": ["apple", "brick", "cloud", "delta"]}

    async def remove(self, device: str, *, force: bool = False,
                     recovery_words: list[str] | None = None,
                     distrust_since_ms: int | None = None) -> dict[str, Any]:
        self.forced = force
        self.distrust_since_ms = distrust_since_ms
        self.removal_words = recovery_words
        if device not in {d["id"] for d in self.device_list}:
            raise NotFound("unknown-device", f"no device {device} in the circle")
        self.device_list = [d for d in self.device_list if d["id"] != device]
        return {"removed": device, "epoch": 2}

    async def recovery_key(self) -> dict[str, Any]:
        return {"words": [f"word{i}" for i in range(24)]}

    async def recover(self, words: list[str], relay: str, *, preview: bool = False,
                      readmit: list[str] | None = None) -> dict[str, Any]:
        self.calls.append(("recover", words, relay))
        self.recover_options.append((preview, readmit))
        if preview:
            return {"preview": True, "circle": "c0ffee", "devices": [
                {"device": "a1" * 32, "name": "laptop", "last_seen": 1_700_000_000.0},
                {"device": "e5" * 32, "name": "stolen phone", "last_seen": None}]}
        return {"circle": "c0ffee", "entries": 42}

    def relays(self) -> list[dict[str, Any]]:
        return self.relay_list

    async def add_relay(self, address: str, *, token: bytes | None = None) -> dict[str, Any]:
        if "#" not in address:
            raise ApiError(400, "bad-relay-address", "a relay address looks like HOST:PORT#KEY")
        self.relay_tokens.append(token)
        self.relay_list.append({"address": address, "connected": False})
        return {"address": address}

    async def write(self, stream: str, record_id: str | None, body: bytes) -> dict[str, Any]:
        records = self.records.setdefault(stream, [])
        record_id = record_id or f"r{len(records) + 1}"
        records.append({"id": record_id, "author": bytes.fromhex("a1b2c3d4"), "body": body})
        self.events.publish("entry", stream=stream, id=record_id)
        return {"id": record_id, "stream": stream}

    def read(self, stream: str, after: str | None, limit: int) -> dict[str, Any]:
        records = self.records.get(stream, [])
        start = 0 if after is None else int(after)
        page = records[start:start + limit]
        more = start + limit < len(records)
        return {"records": page, "next": str(start + limit) if more else None}

    async def delete(self, stream: str, record_id: str) -> dict[str, Any]:
        records = self.records.get(stream, [])
        if not any(r["id"] == record_id for r in records):
            raise ApiError(404, "record-not-found", f"no record {record_id} in {stream}")
        self.records[stream] = [r for r in records if r["id"] != record_id]
        return {"deleted": record_id}

    async def clear(self, stream: str) -> dict[str, Any]:
        self.calls.append(("clear", stream))
        self.records[stream] = []
        return {"stream": stream, "id": "", "seq": 9}

    async def streams(self) -> list[dict[str, Any]]:
        return [{"stream": name, "records": len(rs)} for name, rs in sorted(self.records.items())]


@dataclass
class Served:
    control: FakeControl
    path: Path


@pytest.fixture
async def served(nursery: trio.Nursery, short_dir: Path) -> AsyncIterator[Served]:
    control = FakeControl()
    path = short_dir / "meshd.sock"
    listener = await open_unix_listener(path)
    await nursery.start(partial(serve_api, control, listener, allowed_uids=set()))
    yield Served(control, path)


wait_until = poll_until


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str:
        return self.json["error"]["code"]


async def receive_reply(stream: trio.SocketStream, conn: h11.Connection) -> Reply:
    response = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            assert response is not None
            headers = {k.decode(): v.decode() for k, v in response.headers}
            return Reply(response.status_code, headers, body)


async def call(path: Path, method: str, target: str, body: Any = None,
               raw_body: bytes | None = None) -> Reply:
    data = raw_body if raw_body is not None else (b"" if body is None else json.dumps(body).encode())
    async with await trio.open_unix_socket(str(path)) as stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", "meshd"), ("content-length", str(len(data)))]
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
        await stream.send_all(conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
        return await receive_reply(stream, conn)


async def raw_exchange(path: Path, data: bytes) -> Reply:
    """Send bytes as they are (malformed on purpose) and parse whatever comes back."""
    async def send(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            pass  # the server answered and hung up before reading it all: the point of the test

    async with await trio.open_unix_socket(str(path)) as stream, trio.open_nursery() as nursery:
        nursery.start_soon(send, stream)
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        return await receive_reply(stream, conn)


# --- routes -------------------------------------------------------------------------------

async def test_read_only_routes_return_the_daemons_answers(served: Served) -> None:
    status = await call(served.path, "GET", "/v1/status")
    assert (status.status, status.headers["content-type"]) == (200, "application/json")
    assert status.json == served.control.status()
    assert (await call(served.path, "GET", "/v1/peers")).json == {"peers": served.control.peers()}
    assert (await call(served.path, "GET", "/v1/devices")).json["devices"][1]["name"] == "pi"
    assert (await call(served.path, "GET", "/v1/relays")).json == {"relays": []}
    assert (await call(served.path, "GET", "/v1/streams")).json == {"streams": []}


async def test_invite_join_remove_and_recovery(served: Served) -> None:
    assert (await call(served.path, "POST", "/v1/invite")).json["code"] == "17-purple-sausage"
    joined = await call(served.path, "POST", "/v1/join", {"code": " 17-purple-sausage\n"})
    assert (joined.status, joined.json["circle"]) == (200, "c0ffee")
    wrong = await call(served.path, "POST", "/v1/join", {"code": "3-wrong-code"})
    assert (wrong.status, wrong.error_code) == (403, "wrong-code")
    assert "new invitation" in wrong.json["error"]["message"]

    refused = await call(served.path, "POST", "/v1/devices/e5f6a7b8/remove?force=yes")
    assert (refused.status, refused.error_code) == (400, "invalid-argument")
    for since in ("-5", "1e3", "tomorrow", str(1 << 48)):
        refused = await call(served.path, "POST", f"/v1/devices/e5f6a7b8/remove?distrust_since={since}")
        assert (refused.status, refused.error_code) == (400, "invalid-argument"), since
    removed = await call(served.path, "POST", "/v1/devices/e5f6a7b8/remove?force=1")
    assert removed.json == {"removed": "e5f6a7b8", "epoch": 2} and served.control.forced
    again = await call(served.path, "DELETE", "/v1/devices/e5f6a7b8")
    assert (again.status, again.error_code) == (404, "unknown-device")
    served.control.device_list.append({"id": "e5f6a7b8"})
    await call(served.path, "POST", "/v1/devices/e5f6a7b8/remove", {"recovery_words": "Alpha beta"})
    assert served.control.removal_words == ["alpha", "beta"]
    served.control.device_list.append({"id": "e5f6a7b8"})
    refused = await call(served.path, "POST", "/v1/devices/e5f6a7b8/remove", {"recovery_words": [1]})
    assert (refused.status, refused.error_code) == (400, "invalid-argument")
    assert "1" not in refused.json["error"]["message"]

    words = (await call(served.path, "POST", "/v1/recovery-key")).json["words"]
    assert len(words) == 24
    await call(served.path, "POST", "/v1/recover", {"words": " ".join(words).upper(), "relay": "r:1#k"})
    await call(served.path, "POST", "/v1/recover", {"words": words})
    assert served.control.calls[-2:] == [("recover", words, "r:1#k"), ("recover", words, "")]
    await call(served.path, "POST", "/v1/recover", {"words": words, "preview": True})
    await call(served.path, "POST", "/v1/recover", {"words": words, "readmit": ["ab" * 32]})
    assert served.control.recover_options[-2:] == [(True, None), (False, ["ab" * 32])]
    for bad in ({"preview": "yes"}, {"readmit": "ab" * 32}, {"readmit": ["not hex"]}):
        refused = await call(served.path, "POST", "/v1/recover", {"words": words, **bad})
        assert (refused.status, refused.error_code) == (400, "invalid-argument")


async def test_relays_can_be_added_and_listed(served: Served) -> None:
    added = await call(served.path, "POST", "/v1/relays", {"address": "relay.example:7744#abcd"})
    assert added.status == 200
    bad = await call(served.path, "POST", "/v1/relays", {"address": "relay.example"})
    assert (bad.status, bad.error_code) == (400, "bad-relay-address")
    listed = await call(served.path, "GET", "/v1/relays")
    assert listed.json == {"relays": [{"address": "relay.example:7744#abcd", "connected": False}]}


async def test_records_are_written_read_in_pages_and_deleted(served: Served) -> None:
    first = await call(served.path, "POST", "/v1/streams/chat%2Fhome/records", {"body": "héllo"})
    assert (first.status, first.json) == (201, {"id": "r1", "stream": "chat/home"})
    binary = base64.b64encode(b"\xff\x00\xfe").decode()
    await call(served.path, "POST", "/v1/streams/chat%2Fhome/records", {"id": "bin", "body_b64": binary})
    await call(served.path, "POST", "/v1/streams/chat%2Fhome/records", {"body": "third"})

    page = (await call(served.path, "GET", "/v1/streams/chat%2Fhome/records?limit=2")).json
    # Text bodies come back as text, others as body_b64; other bytes (author) as hex.
    assert page["records"] == [
        {"id": "r1", "author": "a1b2c3d4", "body": "héllo"},
        {"id": "bin", "author": "a1b2c3d4", "body_b64": binary},
    ]
    rest = (await call(served.path, "GET", f"/v1/streams/chat%2Fhome/records?after={page['next']}")).json
    assert ([r["body"] for r in rest["records"]], rest["next"]) == (["third"], None)

    deleted = await call(served.path, "DELETE", "/v1/streams/chat%2Fhome/records/bin")
    assert deleted.json == {"deleted": "bin"}
    missing = await call(served.path, "DELETE", "/v1/streams/chat%2Fhome/records/bin")
    assert (missing.status, missing.error_code) == (404, "record-not-found")
    assert (await call(served.path, "GET", "/v1/streams")).json == {
        "streams": [{"stream": "chat/home", "records": 2}]}


@pytest.mark.parametrize(("body", "raw", "code"), [
    (None, b"{not json", "bad-json"),
    (None, b"[1, 2]", "bad-json"),
    (None, b"\xff\xfe", "bad-json"),
    ({}, None, "invalid-argument"),
    ({"body": "a", "body_b64": "YQ=="}, None, "invalid-argument"),
    ({"body_b64": "not base64!"}, None, "invalid-argument"),
    ({"body": 7}, None, "invalid-argument"),
    ({"body": "x", "id": 5}, None, "invalid-argument"),
])
async def test_bad_write_bodies_are_400_with_a_stable_code(served: Served, body: Any, raw: bytes | None,
                                                           code: str) -> None:
    reply = await call(served.path, "POST", "/v1/streams/s/records", body, raw_body=raw)
    assert (reply.status, reply.error_code) == (400, code)
    assert served.control.records == {}


@pytest.mark.parametrize(("method", "target", "status", "code"), [
    ("GET", "/v2/status", 404, "not-found"),
    ("GET", "/v1/streams/s/records/x/y", 404, "not-found"),
    ("GET", "/v1/streams//records", 404, "not-found"),
    ("POST", "/v1/status", 405, "method-not-allowed"),
    ("GET", "/v1/streams/s/records?limit=0", 400, "invalid-argument"),
    ("GET", "/v1/streams/s/records?limit=1001", 400, "invalid-argument"),
    ("GET", "/v1/streams/s/records?limit=ten", 400, "invalid-argument"),
    ("GET", "/v1/streams/%ff/records", 400, "bad-request"),
    ("POST", "/v1/join", 400, "invalid-argument"),
    ("POST", "/v1/recover", 400, "invalid-argument"),
])
async def test_routing_and_argument_errors(served: Served, method: str, target: str, status: int,
                                           code: str) -> None:
    reply = await call(served.path, method, target)
    assert (reply.status, reply.error_code) == (status, code)


async def test_wrong_method_lists_the_allowed_ones(served: Served) -> None:
    reply = await call(served.path, "PUT", "/v1/devices/a1b2c3d4")
    assert (reply.status, reply.headers["allow"]) == (405, "DELETE")


async def test_a_bug_in_the_daemon_is_a_500_without_details_and_logged_once(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    served.control.broken = True
    before = INTERNAL_ERRORS.value(where="api")
    with caplog.at_level(logging.DEBUG, logger="meshd.bug"):
        first = await call(served.path, "GET", "/v1/peers")
        second = await call(served.path, "GET", "/v1/peers")
    assert (first.status, first.error_code) == (500, "internal")
    assert "epoch key" not in first.body.decode() and second.status == 500
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "RuntimeError" in errors[0].getMessage()
    assert INTERNAL_ERRORS.value(where="api") == before + 2
    assert (await call(served.path, "GET", "/v1/status")).status == 200


async def test_metrics_are_served_in_prometheus_text_format(served: Served) -> None:
    served.control.metrics.peers.set(2, path="lan")
    served.control.metrics.errors.inc(kind="protocol")
    reply = await call(served.path, "GET", "/metrics")
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = reply.body.decode()
    assert 'meshd_peers{path="lan"} 2\n' in text
    assert 'meshd_peers{path="relay"} 0\n' in text
    assert 'meshd_errors_total{kind="protocol"} 1\n' in text
    assert "# TYPE meshd_sync_bytes_total counter\n" in text
    for name in ("meshd_entries_total", "meshd_relay_deposits_total"):
        assert f"# HELP {name} " in text


# --- hostile and broken clients -------------------------------------------------------------

async def test_keep_alive_serves_several_requests_on_one_connection(served: Served) -> None:
    async with await trio.open_unix_socket(str(served.path)) as stream:
        conn = h11.Connection(h11.CLIENT)
        for target in ("/v1/status", "/v1/peers"):
            request = h11.Request(method="GET", target=target, headers=[("host", "meshd")])
            await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            assert (await receive_reply(stream, conn)).status == 200
            conn.start_next_cycle()


async def test_plain_and_h11_requests_share_a_keep_alive_connection(served: Served) -> None:
    """Two plain writes pipelined in one send (the fast path, http1.py), then a GET (handed to
    h11), then another write (h11 keeps the connection): each answered, in order."""
    def post(record_id: str) -> bytes:
        body = json.dumps({"id": record_id, "body": record_id}).encode()
        return (f"POST /v1/streams/s/records HTTP/1.1\r\nhost: m\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                ).encode() + body

    async with await trio.open_unix_socket(str(served.path)) as stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(post("a") + post("b") + b"GET /v1/status HTTP/1.1\r\nhost: m\r\n\r\n"
                              + post("c"))
        statuses = []
        for method in ("POST", "POST", "GET", "POST"):
            conn.send(h11.Request(method=method, target="/", headers=[("host", "m")]))
            conn.send(h11.EndOfMessage())
            statuses.append((await receive_reply(stream, conn)).status)
            conn.start_next_cycle()
    assert statuses == [201, 201, 200, 201]
    assert [r["id"] for r in served.control.records["s"]] == ["a", "b", "c"]


@pytest.mark.parametrize(("data", "status", "code"), [
    (b"GARBAGE\r\n\r\n", 400, "bad-request"),
    (b"GET /v1/status HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n", 431, "headers-too-large"),
    (b"POST /v1/streams/s/records HTTP/1.1\r\nhost: x\r\ncontent-length: 2000000\r\n\r\n", 413, "too-large"),
    (b"POST /v1/streams/s/records HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
     + (b"80000\r\n" + b"a" * 0x80000 + b"\r\n") * 3, 413, "too-large"),
    (b"POST /v1/join HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nab", 408, "timeout"),
])
async def test_malformed_and_huge_requests_get_4xx_while_others_keep_working(
        served: Served, monkeypatch: pytest.MonkeyPatch, data: bytes, status: int, code: str) -> None:
    monkeypatch.setattr(httpserver, "BODY_TIMEOUT", 0.5)
    async with await trio.open_unix_socket(str(served.path)) as watcher:
        # A well-behaved client with a stream open before, during and after the abuse.
        conn = h11.Connection(h11.CLIENT)
        await watcher.send_all(conn.send(h11.Request(method="GET", target="/v1/events",
                                                     headers=[("host", "meshd")])))
        conn.send(h11.EndOfMessage())
        while not isinstance(event := conn.next_event(), h11.Response):
            conn.receive_data(await watcher.receive_some(65536))
        reply = await raw_exchange(served.path, data)
        assert (reply.status, reply.error_code) == (status, code)
        assert (await call(served.path, "GET", "/v1/status")).status == 200
        served.control.events.publish("entry", stream="s", id="after-abuse")
        while not isinstance(event := conn.next_event(), h11.Data):
            conn.receive_data(await watcher.receive_some(65536))
        assert json.loads(event.data)["data"]["id"] == "after-abuse"
    assert served.control.records == {}


async def test_a_slow_loris_is_cut_off_after_the_header_timeout(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "HEADER_TIMEOUT", 0.3)
    with trio.fail_after(5):
        reply = await raw_exchange(served.path, b"GET /v1/status HTTP/1.1\r\nhost: x\r\nx-a: b")
    assert (reply.status, reply.error_code) == (408, "timeout")


async def test_connections_beyond_the_limit_are_told_the_daemon_is_busy(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver, "MAX_CONNECTIONS", 1)
    async with await trio.open_unix_socket(str(served.path)) as first:
        conn = h11.Connection(h11.CLIENT)
        await first.send_all(conn.send(h11.Request(method="GET", target="/v1/events",
                                                   headers=[("host", "meshd")])))
        while not isinstance(conn.next_event(), h11.Response):  # now it holds the only slot
            conn.receive_data(await first.receive_some(65536))
        busy = await call(served.path, "GET", "/v1/status")
        assert (busy.status, busy.error_code) == (503, "busy")
    # The server notices the hang-up asynchronously; then the slot is free again.
    await wait_until(lambda: served.control.events.subscriber_count == 0)
    assert (await call(served.path, "GET", "/v1/status")).status == 200


# --- events -------------------------------------------------------------------------------

async def open_events(path: Path, target: str) -> tuple[trio.SocketStream, h11.Connection]:
    stream = await trio.open_unix_socket(str(path))
    conn = h11.Connection(h11.CLIENT)
    await stream.send_all(conn.send(h11.Request(method="GET", target=target, headers=[("host", "m")])))
    conn.send(h11.EndOfMessage())
    while not isinstance(response := conn.next_event(), h11.Response):
        conn.receive_data(await stream.receive_some(65536))
    assert response.status_code == 200
    assert (b"content-type", b"application/x-ndjson") in response.headers
    return stream, conn


async def next_lines(stream: trio.SocketStream, conn: h11.Connection, count: int) -> list[dict[str, Any]]:
    buffer = b""
    while buffer.count(b"\n") < count:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        else:
            assert isinstance(event, h11.Data), event
            buffer += event.data
    return [json.loads(line) for line in buffer.splitlines()]


async def test_events_stream_as_ndjson_filtered_by_type(served: Served) -> None:
    stream, conn = await open_events(served.path, "/v1/events?types=entry,peer")
    async with stream:
        bus = served.control.events
        bus.publish("member.added", device="x")
        bus.publish("peer.up", device="e5f6a7b8", path="lan")
        bus.publish("entry", stream="s", id="r1", author=b"\x01\x02")
        lines = await next_lines(stream, conn, 2)
    assert [(line["type"], line["data"]) for line in lines] == [
        ("peer.up", {"device": "e5f6a7b8", "path": "lan"}),
        ("entry", {"stream": "s", "id": "r1", "author": "0102"}),
    ]
    assert lines[0]["id"] < lines[1]["id"]


async def next_chunk(stream: trio.SocketStream, conn: h11.Connection) -> list[str]:
    """The record ids of the events in the next chunk of an events stream."""
    part = b""  # a chunk may arrive in pieces
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        assert isinstance(event, h11.Data)
        part += event.data
        if event.chunk_end:
            return [json.loads(line)["data"]["id"] for line in part.splitlines()]


async def test_a_burst_of_events_goes_out_in_one_chunk(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone event goes at once; the events that follow it within EVENT_GATHER_S share the
    next chunk (issue 20: one socket send per event per subscriber at 20 writes/s). Each
    event here is published in a scheduler pass of its own, so nothing else groups them."""
    monkeypatch.setattr(eventstream, "EVENT_GATHER_S", 1.0)  # > the burst
    stream, conn = await open_events(served.path, "/v1/events")
    async with stream:
        bus = served.control.events
        bus.publish("entry", stream="s", id="first")
        assert await next_chunk(stream, conn) == ["first"]
        burst = [f"r{i}" for i in range(20)]
        for record_id in burst:
            await trio.lowlevel.checkpoint()
            bus.publish("entry", stream="s", id=record_id)
        assert await next_chunk(stream, conn) == burst  # in order, none lost, one send


async def test_a_quiet_stream_sends_heartbeats_and_a_hangup_unsubscribes(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventstream, "HEARTBEAT_SECONDS", 0.05)
    stream, conn = await open_events(served.path, "/v1/events")
    async with stream:
        assert served.control.events.subscriber_count == 1
        assert await next_lines(stream, conn, 1) == [{"type": "heartbeat"}]
    await wait_until(lambda: served.control.events.subscriber_count == 0)


# --- who may connect ----------------------------------------------------------------------

NOBODY = 65534


def get_status_as(uid: int, gid: int, path: Path) -> bytes:
    """GET /v1/status from a forked child running as uid:gid; returns the raw response."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain syscalls only, then _exit
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                sock.sendall(b"GET /v1/status HTTP/1.1\r\nhost: meshd\r\nconnection: close\r\n\r\n")
                while chunk := sock.recv(65536):
                    os.write(write_end, chunk)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    return data


@pytest.mark.parametrize(("allowed_uids", "allowed_gids", "status"), [
    (set(), set(), 403), ({NOBODY}, set(), 200), (set(), {NOBODY}, 200)])
async def test_the_caller_uid_is_checked_with_so_peercred(
        nursery: trio.Nursery, short_dir: Path, allowed_uids: set[int], allowed_gids: set[int],
        status: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    path = short_dir / "meshd.sock"
    # World-writable on purpose: only the SO_PEERCRED check stands between nobody and the API.
    listener = await open_unix_listener(path, mode=0o666)
    await nursery.start(partial(serve_api, FakeControl(), listener, allowed_uids=allowed_uids,
                                allowed_gids=allowed_gids))
    data = await trio.to_thread.run_sync(get_status_as, NOBODY, NOBODY, path)
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ")
    if status == 403:
        assert json.loads(body)["error"]["code"] == "forbidden"
    else:
        assert json.loads(body)["circle"] == "c0ffee"


# --- the socket file ----------------------------------------------------------------------

async def test_the_socket_gets_its_mode_and_group(short_dir: Path) -> None:
    listener = await open_unix_listener(short_dir / "user.sock")
    async with listener:
        assert stat.S_IMODE((short_dir / "user.sock").stat().st_mode) == 0o600
    group = "nogroup"
    try:
        import grp
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        pytest.skip(f"no {group!r} group on this machine")
    listener = await open_unix_listener(short_dir / "run" / "system.sock", 0o660, group)
    async with listener:
        info = (short_dir / "run" / "system.sock").stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, gid)
    with pytest.raises(ApiSocketError, match="does not exist"):
        await open_unix_listener(short_dir / "x.sock", 0o660, "no-such-group-meshd")


async def test_a_stale_socket_is_replaced_but_a_live_one_is_not(short_dir: Path) -> None:
    path = short_dir / "meshd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: connect is refused, like a crashed daemon
    stale.close()
    live = await open_unix_listener(path)
    async with live:
        with pytest.raises(ApiSocketError, match="already serving"):
            await open_unix_listener(path)
        assert path.exists()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(ApiSocketError, match="not a socket"):
        await open_unix_listener(path)
    with pytest.raises(ApiSocketError, match="too long"):
        await open_unix_listener(short_dir / ("x" * 120))


async def test_serve_api_serves_a_socket_from_open_unix_listener_to_a_plain_socket_client(
        served: Served) -> None:
    # The curl convention: any HTTP/1.0 client works too, and the server closes when done.
    def blocking_get() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(served.path))
            sock.sendall(b"GET /v1/status HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data
    data = await trio.to_thread.run_sync(blocking_get)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b'"circle":"c0ffee"' in data


def test_curl_can_talk_to_the_socket(short_dir: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    path = short_dir / "meshd.sock"

    async def main() -> bytes:
        async with trio.open_nursery() as nursery:
            listener = await open_unix_listener(path)
            await nursery.start(partial(serve_api, FakeControl(), listener, allowed_uids=set()))
            result = await trio.run_process([curl, "-sS", "--unix-socket", str(path),
                                             "http://meshd/v1/status"], capture_stdout=True)
            nursery.cancel_scope.cancel()
        return result.stdout
    assert json.loads(trio.run(main))["circle"] == "c0ffee"


# --- metrics registry -----------------------------------------------------------------------

def test_metrics_text_format_escapes_and_orders() -> None:
    registry = Registry()
    counter = registry.counter("a_total", 'help with \\ and\nnewline', ["kind"])
    counter.inc(kind='quo"te\\back\nslash')
    counter.inc(2.5, kind="b")
    gauge = registry.gauge("b_value", "a gauge")
    gauge.set(float("inf"))
    assert registry.render() == (
        '# HELP a_total help with \\\\ and\\nnewline\n'
        '# TYPE a_total counter\n'
        'a_total{kind="b"} 2.5\n'
        'a_total{kind="quo\\"te\\\\back\\nslash"} 1\n'
        '# HELP b_value a gauge\n'
        '# TYPE b_value gauge\n'
        'b_value +Inf\n'
    )
    with pytest.raises(ValueError):
        counter.inc(-1, kind="b")
    with pytest.raises(ValueError):
        counter.inc(kind="b", extra="x")
    with pytest.raises(ValueError):
        registry.counter("a_total", "twice")


def test_every_kind_of_refusal_has_one_status() -> None:
    """meshd/api/errors.py is the one table: every kind the daemon may raise has a status,
    and a refusal becomes that status with its own code and message."""
    kinds = {value for value in vars(meshd_errors).values()
             if isinstance(value, type) and issubclass(value, meshd_errors.Refusal)}
    assert set(STATUS) == kinds - {meshd_errors.Refusal}
    assert len(set(STATUS.values())) == len(STATUS)
    error = api_error(meshd_errors.StorageFull("storage-full", "free some space"))
    assert (error.status, error.code, error.message) == (507, "storage-full", "free some space")


def test_the_route_table_flags_every_route_read_or_write() -> None:
    """One table (meshd/api/routes.py): a GET never writes, everything else does, and no
    method and path appear twice."""
    from meshd.api.routes import ROUTES
    assert {(r.method, r.pattern) for r in ROUTES if not r.writes} == \
        {(r.method, r.pattern) for r in ROUTES if r.method == "GET"}
    assert len({(r.method, r.pattern) for r in ROUTES}) == len(ROUTES)


# --- the R/W flag of every route is enforced (meshd/api/routes.py) --------------------------

# The ways back into a circle: open to a removed device (the daemon checks the rest).
WAYS_BACK = {("POST", "v1/join"), ("POST", "v1/recover"), ("POST", "v1/devices/{device}/remove"),
             ("DELETE", "v1/devices/{device}")}


def _target(route: Any) -> str:
    return "/" + "/".join("x" if part.startswith("{") else part for part in route.pattern)


async def test_a_read_route_is_handed_a_daemon_it_cannot_write_through(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """A route flagged R that calls a write method (a bug) gets no write method: the request
    fails as a bug, and nothing is written."""
    import dataclasses

    from meshd.api import routes

    async def sloppy(control: Any, request: Any) -> Any:
        await control.write("chat", None, b"written by a read route")
        return routes.json_response({})

    status = next(r for r in routes.ROUTES if r.pattern == ("v1", "status"))
    assert not status.writes
    monkeypatch.setattr(routes, "ROUTES", [dataclasses.replace(status, handler=sloppy)
                                           if r is status else r for r in routes.ROUTES])
    reply = await call(served.path, "GET", "/v1/status")
    assert (reply.status, reply.error_code) == (500, "internal")
    assert served.control.records == {}


async def test_write_routes_refuse_a_removed_device_before_the_daemon_is_asked(
        served: Served) -> None:
    """Every route flagged W answers 409 not-a-member while the device is not a member,
    whatever the request (its handler never runs); reads and the ways back in still work."""
    from meshd.api.routes import ROUTES
    served.control.member = False
    refused = [r for r in ROUTES if r.writes and (r.method, "/".join(r.pattern)) not in WAYS_BACK]
    assert {(r.method, "/".join(r.pattern)) for r in refused} >= {
        ("POST", "v1/relays"), ("DELETE", "v1/relays/{address}"), ("POST", "v1/rename"),
        ("POST", "v1/streams/{stream}/records"), ("POST", "v1/invite")}
    for route in refused:
        reply = await call(served.path, route.method, _target(route), {"address": "h:1#k",
                                                                       "name": "n", "body": "b"})
        assert (reply.status, reply.error_code) == (409, "not-a-member"), route
    assert (served.control.records, served.control.relay_list, served.control.calls) == ({}, [], [])
    for route in ROUTES:
        if not route.writes and route.pattern != ("v1", "events"):
            assert (await call(served.path, route.method, _target(route))).status == 200, route
    assert (await call(served.path, "POST", "/v1/join", {"code": "17-purple-sausage"})).status == 200
    assert (await call(served.path, "POST", "/v1/recover", {"words": "a b"})).status == 200
    assert [c[0] for c in served.control.calls] == ["join", "recover"]


def test_only_joining_recovering_and_removing_are_open_to_a_removed_device() -> None:
    from meshd.api.routes import ROUTES, Access
    assert {(r.method, "/".join(r.pattern)) for r in ROUTES if r.access is Access.REJOIN} == WAYS_BACK
