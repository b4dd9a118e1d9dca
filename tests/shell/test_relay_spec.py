"""The relay does what protocol/relay.md and channel.md say about pushes and closing.

Each test pins one sentence of the spec that a client written from the spec alone relies on
(issue 18, gaps 11 and 12): who gets a relay.records push, and that the relay's CLOSE
carries a reason, including at the registration deadline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from meshd.net.transport import PeerClosed, connect_secure, open_secure_connection
from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.relay import BAD_RECORDS, NOT_A_MEMBER, NOT_REGISTERED, RelayError
from meshd.relay.address import RelayAddress
from meshd.relay.server import REGISTER_TIMEOUT_S, RelayServer
from meshd.relay.session import open_relay_session

from ..protocol.harness import seeded_rng
from .test_relay import bare_server, make_circle, running_relay, session

__all__ = ["bare_server"]  # a fixture, used by name below


async def test_a_records_push_goes_to_the_others_not_to_the_registrant(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice", "bob")
    to_alice: list[list[bytes]] = []
    to_bob: list[list[bytes]] = []
    bob_told = trio.Event()

    def bob_hears(records: list[bytes]) -> None:
        to_bob.append(records)
        bob_told.set()

    async with running_relay(tmp_path / "relay") as relay:
        async with session(relay, m["alice"], circle) as alice, \
                session(relay, m["bob"], circle) as bob:
            alice.on_records = to_alice.append
            bob.on_records = bob_hears
            circle.rotate_epoch(m["alice"].signer, rng)
            # The push, had alice been sent one, precedes her relay.registered on the same
            # connection, so it would have been read by the time register() returns.
            await alice.register(circle.records())
            with trio.fail_after(5):
                await bob_told.wait()
    assert to_bob == [circle.records()]
    assert to_alice == []


async def _read_until_closed(connection: Any) -> tuple[list[dict[str, Any]], PeerClosed]:
    answers: list[dict[str, Any]] = []
    with pytest.raises(PeerClosed) as closed:
        while True:
            answers.append(await connection.receive())
    return answers, closed.value


async def test_a_client_that_never_registers_is_told_why_before_the_close(
    bare_server: RelayServer, autojump_clock: trio.abc.Clock
) -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bare_server.handle_stream, server_side)
        connection = await open_secure_connection(
            client_side, initiator=True, static=DHKeyPair.generate(seeded_rng(8)),
            authorize=lambda key: True)
        start = trio.current_time()
        answers, closed = await _read_until_closed(connection)
    assert trio.current_time() - start == pytest.approx(REGISTER_TIMEOUT_S, abs=0.1)
    assert [(a["t"], a["code"], "rid" in a) for a in answers] == [
        ("relay.error", NOT_REGISTERED, False)]
    assert closed.reason == NOT_REGISTERED


async def test_the_relays_close_names_the_error_that_ended_the_connection(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice", "carol")
    async with running_relay(tmp_path / "relay") as relay:
        address = RelayAddress.parse(relay.address)

        async def raw(member: str) -> Any:
            return await connect_secure("127.0.0.1", address.port, static=m[member].dh,
                                        authorize=lambda k: k == address.key)

        connection = await raw("alice")
        async with connection:
            await connection.send({"t": "relay.fetch", "rid": 1, "mailbox": bytes(32), "after": 0})
            with trio.fail_after(5):
                answers, closed = await _read_until_closed(connection)
        assert answers[-1]["code"] == NOT_REGISTERED and closed.reason == NOT_REGISTERED

        # A member removed while connected: relay.error not-a-member, then CLOSE saying so.
        carol = await raw("carol")
        async with carol, session(relay, m["alice"], circle) as alice:
            await carol.send({"t": "relay.register", "rid": 1, "records": circle.records()})
            with trio.fail_after(5):
                assert (await carol.receive())["t"] == "relay.registered"
            circle.remove_device(m["alice"].signer, m["carol"].sign_key, rng)
            await alice.register(circle.records())
            with trio.fail_after(5):
                answers, closed = await _read_until_closed(carol)
        assert answers[-1]["code"] == NOT_A_MEMBER and closed.reason == NOT_A_MEMBER


async def test_registration_needs_the_complete_record_set_from_genesis(tmp_path: Path) -> None:
    """relay.md "register": a partial set is bad-records (no-genesis, unknown-parents),
    even when the relay holds the rest; a set it holds entirely is accepted as it is."""
    circle, m, rng = make_circle("alice", "bob")
    async with running_relay(tmp_path / "relay") as relay:
        async with session(relay, m["alice"], circle):
            pass
        circle.rotate_epoch(m["alice"].signer, rng)
        records = circle.records()
        for partial, reason in ((records[-1:], "no-genesis"),
                                (records[:1] + records[-1:], "unknown-parents")):
            with pytest.raises(RelayError) as refused:
                async with open_relay_session(relay.address, m["bob"].dh, partial):
                    pass
            assert refused.value.code == BAD_RECORDS and reason in refused.value.message
        async with open_relay_session(relay.address, m["bob"].dh, records[:2]) as bob:
            assert bob.registration is not None  # genesis and epoch 1: both held already
        async with open_relay_session(relay.address, m["bob"].dh, records) as bob:
            assert len(await bob.records()) == len(records)
