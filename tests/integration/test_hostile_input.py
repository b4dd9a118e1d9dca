"""Hostile input at the trust boundaries, against real relay and daemon processes.

A stranger (any key that finishes the relay's handshake) and a member (a device's own key,
taken from its state directory) send what a fuzzer would: the process answers with an
error or closes that connection, and goes on serving everyone else.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from meshd.circleservice import CIRCLE_STATE_KEY
from meshd.identity import DeviceIdentity, load_or_create_identity
from meshd.net.transport import (
    CONNECTION_ERRORS,
    PeerClosed,
    SecureConnection,
    connect_secure,
    open_secure_connection,
)
from meshd.protocol.circle import Circle
from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.log import CLEAR, MAX_HLC, Write, batch_message, compose_batch
from meshd.protocol.memberhandshake import MemberHandshake
from meshd.protocol.relay import BAD_RECORDS
from meshd.relay.address import RelayAddress
from meshd.relay.session import open_relay_session
from meshd.store.db import Store

from ..shell.test_relay import make_circle
from .daemons import (
    ApiFailure,
    DaemonProcess,
    RelayProcess,
    pair,
    send_hostile_handshakes,
    start_all,
    wait_connected,
    wait_texts,
)

pytestmark = pytest.mark.slow


def mixed_key_record() -> bytes:
    """A record whose body map has one str key and one bin key (the relay killer of #12)."""
    unsigned = [1, b"", "genesis", [], bytes(range(32)), {"a": b"", b"b": b""}]
    return msgpack.packb([unsigned, bytes(64)], use_bin_type=True)


def hostile_records() -> list[bytes]:
    """Records whose bodies or fields would make unchecked code sort, hash or compare."""
    key = bytes(range(32))
    bodies = [
        {"a": b"", b"b": b""},
        {b"device": b"x"},
        {"device": {"nested": [1, 2]}},
        {"boxes": [[key, b"x" * 80]], "epoch": 2**64 - 1},
        {"boxes": [[key, 1], [b"", None]], "epoch": 1},
    ]
    out = [mixed_key_record()]
    for kind, circle_id, parents in (("genesis", b"", []), ("add", key, [key]), ("epoch", key, [key])):
        for body in bodies:
            out.append(msgpack.packb([[1, circle_id, kind, parents, key, body], bytes(64)],
                                     use_bin_type=True))
    out.append(msgpack.packb([[1, key, "add", [key, 5], key, {}], bytes(64)], use_bin_type=True))
    return out


async def connect_as_member(port: int, member: DeviceIdentity, state_dir: Path) -> SecureConnection:
    """Dial a device's port as a member does: Noise_XXpsk0 keyed by the circle's current
    epoch (protocol/channel.md, "The device port"), with the member's own saved circle."""
    store = Store(state_dir / "meshd.db")
    try:
        saved = store.get_state(CIRCLE_STATE_KEY)
    finally:
        store.close()
    assert saved is not None
    circle = Circle.from_records(msgpack.unpackb(saved))
    psk = circle.recent_epochs(member.noise, 1)[0].device_psk
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    return await open_secure_connection(
        stream, initiator=True, static=member.noise, authorize=lambda key: True,
        handshake=MemberHandshake(initiator=True, static=member.noise, rng=os.urandom,
                                  authorize=lambda key: True, psks=[psk]))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_stranger_cannot_end_the_relay_with_bad_records(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice")
    relay = RelayProcess(tmp_path)
    try:
        address = RelayAddress.parse(await relay.start())
        for record in hostile_records():
            stranger = DHKeyPair.generate(rng)
            connection = await connect_secure(address.host, address.port, static=stranger,
                                              authorize=lambda key: key == address.key)
            async with connection:
                await connection.send({"t": "relay.register", "rid": 1, "records": [record]})
                with trio.fail_after(10):
                    answer = await connection.receive()
            assert answer["t"] == "relay.error" and answer["code"] == BAD_RECORDS, answer
        assert relay.process is not None and relay.process.poll() is None
        async with open_relay_session(address, m["alice"].dh, circle.records()) as alice:
            assert alice.registration is not None
    finally:
        relay.kill()
    assert "Traceback" not in relay.log_path.read_text()


async def test_a_member_cannot_end_a_daemon_with_bad_records(tmp_path: Path) -> None:
    port = free_port()
    alpha = DaemonProcess(tmp_path, "alpha", listen=f"127.0.0.1:{port}", discovery=False)
    beta = DaemonProcess(tmp_path, "beta", discovery=False, peers=[f"127.0.0.1:{port}"])
    try:
        await alpha.start()
        await beta.start()
        await pair(alpha, beta, address="127.0.0.1")
        await wait_connected(alpha, 1)
        await beta.stop()
        member = load_or_create_identity(beta.state_dir)
        for record in hostile_records():
            assert alpha.process is not None and alpha.process.poll() is None, alpha.log()
            connection = await connect_as_member(port, member, beta.state_dir)
            async with connection:
                await connection.send({"t": "circle.records", "records": [record]})
                with trio.fail_after(10), pytest.raises((PeerClosed, *CONNECTION_ERRORS)):
                    while True:  # circle.heads first, then the close
                        await connection.receive()
        assert alpha.process is not None and alpha.process.poll() is None
        await alpha.write("notes", "still writing")
        assert "still writing" in await alpha.texts("notes")
    finally:
        alpha.kill()
        beta.kill()
    assert "Traceback" not in alpha.log()


# ---- containment: a bug ends one connection, never the process --------------------------

FAULTY = str(Path(__file__).with_name("faulty.py"))


def faulty(what: str) -> list[str]:
    return [sys.executable, FAULTY, what]


async def test_a_bug_in_a_relay_session_ends_that_session_only(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice", "bob")
    relay = RelayProcess(tmp_path, launcher=faulty("relay-records"))
    try:
        address = RelayAddress.parse(await relay.start())
        for _ in range(3):
            connection = await connect_secure(address.host, address.port, static=m["alice"].dh,
                                              authorize=lambda key: key == address.key)
            async with connection:
                await connection.send({"t": "relay.register", "rid": 1, "records": circle.records()})
                with trio.fail_after(10):
                    assert (await connection.receive())["t"] == "relay.registered"
                await connection.send({"t": "relay.records", "rid": 2})
                with trio.fail_after(10), pytest.raises(PeerClosed):
                    await connection.receive()
        assert relay.process is not None and relay.process.poll() is None
        async with open_relay_session(address, m["bob"].dh, circle.records()) as bob:
            assert bob.registration is not None
    finally:
        relay.kill()
    log = relay.log_path.read_text()
    assert log.count("a bug in meshd ended one relay-session") == 1, log
    assert log.count("InjectedBug: injected") == 1, log  # the traceback, logged once


async def test_a_bug_in_a_peer_connection_or_api_request_leaves_the_daemon_running(tmp_path: Path) -> None:
    port = free_port()
    alpha = DaemonProcess(tmp_path, "alpha", listen=f"127.0.0.1:{port}", discovery=False,
                          launcher=faulty("peer-heads"))
    beta = DaemonProcess(tmp_path, "beta", discovery=False, peers=[f"127.0.0.1:{port}"])
    api = DaemonProcess(tmp_path, "gamma", discovery=False, launcher=faulty("api-peers"))
    try:
        await alpha.start()
        await beta.start()
        await api.start()
        await pair(alpha, beta, address="127.0.0.1")  # pairing is not a peer connection

        async def bugs_counted() -> float | None:
            text = (await alpha.request_text("GET", "/metrics"))
            count = metric(text, 'meshd_internal_errors_total{where="peer"}')
            return count if count >= 2 else None

        await alpha.until(bugs_counted, 20, "two contained peer bugs")
        await alpha.write("notes", "still writing")
        assert "still writing" in await alpha.texts("notes")
        assert alpha.process is not None and alpha.process.poll() is None

        for _ in range(2):
            with pytest.raises(ApiFailure) as caught:
                await api.request("GET", "/v1/peers")
            assert caught.value.status == 500
        assert metric(await api.request_text("GET", "/metrics"),
                      'meshd_internal_errors_total{where="api"}') == 2
        assert await api.status()
    finally:
        for daemon in (alpha, beta, api):
            daemon.kill()
    for daemon, where in ((alpha, "peer"), (api, "api")):
        log = daemon.log()
        assert log.count(f"a bug in meshd ended one {where}") == 1, log
        assert log.count("InjectedBug: injected") == 1, log


def metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics:\n{text}")


# ---- the local API: bad input is a 4xx with a stable code, never a 500 ------------------

BAD_API_INPUT: list[tuple[str, str, bytes | None]] = [
    ("POST", "/v1/streams/notes/records", b"[" * 2000 + b"]" * 2000),
    ("POST", "/v1/streams/notes/records", b'{"body": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
    ("POST", "/v1/streams/notes/records", b'{"body": {"a": ' * 900 + b"1" + b"}" * 901),
    ("POST", "/v1/streams/notes/records", b'{"body": "\\ud800"}'),
    ("POST", "/v1/streams/notes/records", b'{"body": "ok", "id": "\\udfff"}'),
    ("POST", "/v1/streams/notes/records", b'{"body": "\xed\xa0\x80"}'),
    ("POST", "/v1/streams/notes/records", b'{"body": 5}'),
    ("POST", "/v1/streams/notes/records", b'{"body": "x", "id": 5}'),
    ("POST", "/v1/streams/notes/records", b'{"body_b64": ["x"]}'),
    ("POST", "/v1/streams/notes/records", b'{"body": "x", "body_b64": "eA=="}'),
    ("POST", "/v1/streams/notes/records", b'"just a string"'),
    ("POST", "/v1/streams/notes/records", b"1e999999"),
    ("POST", "/v1/streams/notes/records", b'{"body": "x", "id": "' + b"i" * 5000 + b'"}'),
    ("POST", "/v1/streams/" + "s" * 3000 + "/records", b'{"body": "x"}'),
    ("POST", "/v1/streams/%ED%A0%80/records", b'{"body": "x"}'),
    ("POST", "/v1/streams/%FF/records", b'{"body": "x"}'),
    ("GET", "/v1/streams/notes/records?limit=%C2%B2", None),
    ("GET", "/v1/streams/notes/records?limit=99999999999999999999", None),
    ("GET", "/v1/streams/notes/records?after=%ED%A0%80", None),
    ("GET", "/v1/streams/notes/records?after=zz", None),
    ("POST", "/v1/join", b'{"code": "\\ud800-a-b"}'),
    ("POST", "/v1/join", b'{"code": ["7-a-b"]}'),
    ("POST", "/v1/recover", b'{"words": ["\\ud800"], "relay": "x"}'),
    ("POST", "/v1/recover", b'{"words": [1, 2]}'),
    ("POST", "/v1/relays", b'{"address": "\\ud800:1#x"}'),
    ("POST", "/v1/relays", b'{"address": {"host": 1}}'),
    ("DELETE", "/v1/devices/%ED%A0%80", None),
    ("DELETE", "/v1/streams/notes/records/" + "r" * 3000, None),
]


async def test_bad_api_input_gets_a_4xx_with_a_stable_code(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "alpha", discovery=False)
    codes = {"bad-json", "invalid-argument", "bad-request", "too-large", "not-found",
             "bad-code", "bad-words", "bad-address", "bad-relay-address", "unknown-device",
             "invitation-not-found", "no-relay"}
    try:
        await daemon.start()
        wrong = []
        for method, target, body in BAD_API_INPUT:
            status, raw = await daemon.request_raw(method, target, body)
            answer = json.loads(raw)
            if not (400 <= status < 500 and answer["error"]["code"] in codes):
                wrong.append((method, target[:60], (body or b"")[:60], status, answer))
        assert not wrong, "\n".join(map(str, wrong))
        await daemon.write("notes", "still writing")
        assert metric(await daemon.request_text("GET", "/metrics"),
                      'meshd_internal_errors_total{where="api"}') == 0
    finally:
        daemon.kill()
    assert "a bug in meshd" not in daemon.log()


# ---- clocks: a member's far-future entries change nothing -------------------------------


async def test_a_member_signing_far_future_clears_changes_no_view(tmp_path: Path) -> None:
    port = free_port()
    alpha = DaemonProcess(tmp_path, "alpha", listen=f"127.0.0.1:{port}", discovery=False)
    beta = DaemonProcess(tmp_path, "beta", discovery=False, peers=[f"127.0.0.1:{port}"])
    try:
        await alpha.start()
        await beta.start()
        await pair(alpha, beta, address="127.0.0.1")
        await beta.write("chat", "before")
        await wait_texts(alpha, "chat", {"before"})
        await beta.stop()
        member = load_or_create_identity(beta.state_dir)
        store = Store(beta.state_dir / "meshd.db")
        tip_seq, tip_hash = store.tip(bytes(member.signing.public))
        store.close()
        now_ms = int(time.time() * 1000)
        for last_hlc, wall_ms in ((MAX_HLC - 1, now_ms), (0, now_ms + 10 * 365 * 86_400_000)):
            forged = compose_batch(member.signing, tip_seq, tip_hash, last_hlc, wall_ms,
                                   [Write("chat", "", CLEAR)])
            connection = await connect_as_member(port, member, beta.state_dir)
            async with connection:
                await connection.send({"t": "log.hello", "vector": {}})
                await connection.send({"t": "log.credit", "bytes": 1 << 20})
                await connection.send(batch_message(forged.author, forged.headers, forged.bodies,
                                                    forged.heads[-1]))
                credits = 0
                with trio.fail_after(10):
                    while credits < 2:  # the window, then the refund for the handled batch
                        message = await connection.receive()
                        credits += message["t"] == "log.credit"
        await alpha.write("chat", "after")
        assert set(await alpha.texts("chat")) == {"before", "after"}
        await alpha.stop()
        await start_all([alpha, beta])
        await alpha.write("chat", "after a restart")
        await beta.write("chat", "beta after a restart")
        expected = {"before", "after", "after a restart", "beta after a restart"}
        await wait_texts(alpha, "chat", expected)
        await wait_texts(beta, "chat", expected)
    finally:
        alpha.kill()
        beta.kill()
    assert "clock-ahead" in alpha.log()


# ---- logs under attack ------------------------------------------------------------------

HOSTILE_HANDSHAKES = 10_000


async def test_ten_thousand_hostile_handshakes_make_at_most_ten_log_lines(tmp_path: Path) -> None:
    port = free_port()
    daemon = DaemonProcess(tmp_path, "alpha", listen=f"127.0.0.1:{port}", discovery=False)
    try:
        await daemon.start()
        lines_before = len(daemon.log().splitlines())
        with trio.fail_after(240):
            await send_hostile_handshakes(port, HOSTILE_HANDSHAKES)

        async def all_refused() -> bool:
            text = await daemon.request_text("GET", "/metrics")
            return metric(text, 'meshd_errors_total{kind="handshake"}') >= HOSTILE_HANDSHAKES

        await poll_until_async(all_refused, 60)
        await daemon.write("notes", "still fine")
    finally:
        daemon.kill()
    new_lines = daemon.log().splitlines()[lines_before:]
    assert 1 <= len(new_lines) <= 10, "\n".join(new_lines[:20])
    assert any("refused handshake from 127.0.0.1" in line for line in new_lines)


async def poll_until_async(check: Any, limit_s: float) -> None:
    """Bounded polling of a counter that has no event (the metrics of refused handshakes)."""
    with trio.fail_after(limit_s):
        while not await check():  # noqa: ASYNC110 - no event exists for what is polled
            await trio.sleep(0.05)


# ---- relay-wide caps and the admission policy -------------------------------------------


async def register_raw(address: RelayAddress, dh: DHKeyPair, records: list[bytes]) -> dict[str, Any]:
    connection = await connect_secure(address.host, address.port, static=dh,
                                      authorize=lambda key: key == address.key)
    async with connection:
        await connection.send({"t": "relay.register", "rid": 1, "records": records})
        with trio.fail_after(10):
            answer: dict[str, Any] = await connection.receive()
    return answer


def circle_id_text(circle_id: bytes) -> str:
    return base64.urlsafe_b64encode(circle_id).decode().rstrip("=")


async def test_an_open_relay_refuses_new_circles_at_its_caps_and_serves_the_others(tmp_path: Path) -> None:
    circles = [make_circle("alice", seed=seed) for seed in (1, 2, 3)]
    relay = RelayProcess(tmp_path, extra=["--max-circles", "2", "--max-connections-per-source", "3"])
    try:
        address = RelayAddress.parse(await relay.start())
        for circle, m, _ in circles[:2]:
            assert (await register_raw(address, m["alice"].dh, circle.records()))["t"] == "relay.registered"
        circle, m, _ = circles[2]
        answer = await register_raw(address, m["alice"].dh, circle.records())
        assert (answer["t"], answer["code"]) == ("relay.error", "relay-full"), answer
        assert "maximum of 2 circles" in answer["message"]
        # The circles it holds are served as before, up to 3 connections from one address.
        circle, m, _ = circles[0]
        async with open_relay_session(address, m["alice"].dh, circle.records()) as one, \
                open_relay_session(address, m["alice"].dh, circle.records()) as two:
            assert await one.deposit(bytes(32), b"still served") > 0
            assert two.registration is not None
            async with open_relay_session(address, m["alice"].dh, circle.records()):
                connection = await connect_secure(address.host, address.port, static=m["alice"].dh,
                                                  authorize=lambda key: key == address.key)
                async with connection:
                    with trio.fail_after(10):
                        answer = await connection.receive()
                assert (answer["t"], answer["code"]) == ("relay.error", "too-many-connections")
    finally:
        relay.kill()


async def test_an_allow_list_relay_admits_only_the_listed_circles(tmp_path: Path) -> None:
    listed, m, _ = make_circle("alice", seed=1)
    other, n, _ = make_circle("bob", seed=2)
    relay = RelayProcess(tmp_path, extra=["--admission", "allow-list",
                                          "--allow-circle", circle_id_text(listed.circle_id)])
    try:
        address = RelayAddress.parse(await relay.start())
        answer = await register_raw(address, n["bob"].dh, other.records())
        assert (answer["t"], answer["code"]) == ("relay.error", "not-admitted"), answer
        assert (await register_raw(address, m["alice"].dh, listed.records()))["t"] == "relay.registered"
    finally:
        relay.kill()
