"""A relay in enrolment-token mode (`meshd relay --admission token`), as real processes: it
prints its token at start and keeps it (0600) across restarts; a new circle registers only
with that token; a circle it holds needs none; a device daemon given the token by its owner
registers with it. The token never reaches a log line, of the relay or of the device."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.net.transport import connect_secure
from meshd.protocol.admission import format_token, parse_token
from meshd.protocol.crypto import DHKeyPair
from meshd.relay.address import RelayAddress
from meshd.relay.command import TOKEN_FILE
from meshd.relay.session import open_relay_session

from ..shell.test_relay import make_circle
from .daemons import ApiFailure, DaemonProcess, RelayProcess

WAIT_S = 30.0


async def start_token_relay(relay: RelayProcess) -> tuple[RelayAddress, bytes]:
    """Start it; its address, and the token it printed on the line after the address."""
    address = RelayAddress.parse(await relay.start())
    assert relay.process is not None and relay.process.stdout is not None
    with trio.fail_after(WAIT_S):
        line = await trio.to_thread.run_sync(relay.process.stdout.readline)
    label, _, text = line.strip().partition(": ")
    assert label == "enrolment token", line
    return address, parse_token(text)


async def register_raw(address: RelayAddress, dh: DHKeyPair, records: list[bytes],
                       **extra: Any) -> dict[str, Any]:
    connection = await connect_secure(address.host, address.port, static=dh,
                            authorize=lambda key: key == address.key)
    async with connection:
        await connection.send({"t": "relay.register", "rid": 1, "records": records, **extra})
        with trio.fail_after(10):
            answer: dict[str, Any] = await connection.receive()
    return answer


def spellings(token: bytes) -> list[str]:
    return [format_token(token), token.hex()]


async def test_a_token_relay_admits_a_new_circle_only_with_its_printed_token(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice", "bob")
    other, n, _ = make_circle("carol", seed=2)
    relay = RelayProcess(tmp_path, extra=["--admission", "token"])
    try:
        address, token = await start_token_relay(relay)
        token_file = relay.state_dir / TOKEN_FILE
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        for extra in ({}, {"token": bytes(32)}, {"token": token[:-1] + bytes([token[-1] ^ 1])}):
            answer = await register_raw(address, m["alice"].dh, circle.records(), **extra)
            assert (answer["t"], answer["code"]) == ("relay.error", "bad-token"), answer
            assert "enrolment token" in answer["message"]
        answer = await register_raw(address, m["alice"].dh, circle.records(), token=token)
        assert answer["t"] == "relay.registered", answer
        # The circle is held now: its members need no token.
        async with open_relay_session(address, m["bob"].dh, circle.records()) as bob:
            assert await bob.deposit(bytes(32), b"served") > 0
        # Another new circle still does.
        answer = await register_raw(address, n["carol"].dh, other.records())
        assert answer["code"] == "bad-token", answer

        relay.kill()  # a restart: the same token, and the circles held need none
        assert (await start_token_relay(relay))[1] == token
        async with open_relay_session(address, m["alice"].dh, circle.records()) as alice:
            assert alice.registration is not None
        assert relay.process is not None and relay.process.poll() is None
    finally:
        relay.kill()
    log = relay.log_path.read_text()
    assert "bad-token" in log  # the refusals are logged (aggregated) ...
    assert not [s for s in spellings(token) if s in log]  # ... and the token never is


async def test_a_device_registers_with_the_token_its_owner_gave(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path, extra=["--admission", "token"])
    alpha = DaemonProcess(tmp_path, "alpha", discovery=False)
    beta = None
    try:
        address, token = await start_token_relay(relay)
        beta = DaemonProcess(tmp_path, "beta", discovery=False, relays=[str(address)])
        await alpha.start()
        await beta.start()
        added = await alpha.request("POST", "/v1/relays",
                                    {"address": str(address), "token": format_token(token)})
        assert added["address"] == str(address)
        assert format_token(token) not in str(added)

        async def alpha_connected() -> bool:
            (entry,) = (await alpha.request("GET", "/v1/relays"))["relays"]
            return bool(entry["connected"])

        await alpha.until(alpha_connected, WAIT_S, "alpha registered at the token relay")

        async def beta_refused() -> str | None:  # beta's owner gave no token
            (entry,) = (await beta.request("GET", "/v1/relays"))["relays"]
            return str(entry.get("error") or "") if "bad-token" in str(entry.get("error")) else None

        error = await beta.until(beta_refused, WAIT_S, "beta refused for want of a token")
        assert not [s for s in spellings(token) if s in error]
        status = await alpha.status()
        assert not [s for s in spellings(token) if s in str(status)]
        # A token that is not one: refused by the API, without echoing it.
        with pytest.raises(ApiFailure) as caught:
            await alpha.request("POST", "/v1/relays",
                                {"address": str(address), "token": "x" + format_token(token)})
        assert (caught.value.status, caught.value.code) == (400, "bad-token"), caught.value
        assert format_token(token) not in str(caught.value)
    finally:
        alpha.kill()
        if beta is not None:
            beta.kill()
        relay.kill()
    for log in (alpha.log(), beta.log() if beta else "", relay.log_path.read_text()):
        assert not [s for s in spellings(token) if s in log]
