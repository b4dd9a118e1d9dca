"""Pairing through a relay rendezvous: a real relay on loopback, a registered member that
offers, and a new device with no circle that joins on an unregistered connection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from meshd.net.transport import PeerClosed, SecureConnection, connect_secure, open_secure_connection
from meshd.pairing import (
    InvitationUsed,
    PairingAborted,
    PairingOutcome,
    WrongCode,
    make_invitation,
)
from meshd.protocol.circle import Circle
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair
from meshd.protocol.records import DeviceInfo
from meshd.protocol.relay import (
    MALFORMED,
    MAX_PIPE_DATA_BYTES,
    NAMEPLATE_IN_USE,
    NO_OFFER,
    NOT_REGISTERED,
    OFFER_EXPIRED,
    OFFER_TTL_S,
    RATE_LIMITED,
    Limits,
    RelayError,
)
from meshd.relay.address import RelayAddress
from meshd.relay.client import RelayClient
from meshd.relay.connection import MAX_PIPE_FRAMES_QUEUED
from meshd.relay.pipe import open_join_pipe
from meshd.relay.rendezvous import join_via_relay, offer_via_relay
from meshd.relay.server import RelayServer
from tests.polling import poll_until

from ..protocol.harness import seeded_rng
from .test_relay import Member, RunningRelay, make_circle, running_relay, session


class NewDevice:
    """A device with keys and no circle: what `meshctl join` runs on."""

    def __init__(self, seed: int) -> None:
        rng = seeded_rng(seed)
        self.signer = SigningKeyPair(rng(32))
        self.dh = DHKeyPair.generate(rng)
        self.claim = DeviceInfo(bytes(self.signer.public), bytes(self.dh.public),
                                f"new-{seed}").claim(self.signer)


def welcomer(circle: Circle, founder: Member, rng: Any):
    """The inviter's welcome(claim), as the daemon's: add the device, send the records."""

    async def welcome(claim: bytes) -> dict[str, Any]:
        circle.add_device(founder.signer, DeviceInfo.verify_claim(claim), rng)
        return {"t": "pair.welcome", "records": circle.records(),
                "note": b"WELCOME-CANARY-not-for-the-relay"}

    return welcome


@asynccontextmanager
async def relay_client(relay: RunningRelay, member: Member, circle: Circle) -> AsyncIterator[RelayClient]:
    client = RelayClient(relay.address, member.dh, circle.records, min_backoff_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        with trio.fail_after(5):
            await client.wait_connected()
        yield client
        nursery.cancel_scope.cancel()


wait_until = poll_until  # the relay keeps tallies, not events, for these


async def wait_until_time(condition: Callable[[], bool], limit_s: float = 3600) -> None:
    """For the mock clock: bounded in its (virtual) time, not in wall time."""
    await poll_until(condition, limit_s, interval_s=0.5)


async def wait_for_offers(relay: RunningRelay, count: int) -> None:
    """The offer request is answered only when a device joins: watch the relay instead."""
    await wait_until(lambda: relay.server.rendezvous["offers"] == count)


async def wait_for_nothing_held(relay: RunningRelay) -> None:
    await wait_until(lambda: relay.server.rendezvous == {"offers": 0, "pipes": 0})


def other_code(code: str) -> str:
    nameplate, first, second = code.split("-")
    return f"{nameplate}-{first}-{'zoo' if second != 'zoo' else 'zone'}"


async def raw_connection(relay: RunningRelay, static: DHKeyPair) -> SecureConnection:
    address = RelayAddress.parse(relay.address)
    return await connect_secure(address.host, address.port, static=static,
                                authorize=lambda key: key == address.key)


async def until_closed(connection: SecureConnection) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = []
    with trio.fail_after(5):
        try:
            while True:
                answers.append(await connection.receive())
        except PeerClosed:
            return answers


# ---- pairing end to end ----------------------------------------------------------------


async def test_right_code_pairs_through_the_relay_and_both_see_the_same_words(
    tmp_path: Path,
) -> None:
    circle, m, rng = make_circle("alice")
    newbie = NewDevice(50)
    invitation = make_invitation(seeded_rng(51), trio.current_time())
    results: dict[str, Any] = {}
    async with running_relay(tmp_path / "relay") as relay, \
            relay_client(relay, m["alice"], circle) as alice:

        async def inviter() -> None:
            results["offer"] = await offer_via_relay(alice, invitation, m["alice"].dh,
                                                     welcomer(circle, m["alice"], rng))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(inviter)
            await wait_for_offers(relay, 1)
            # Typed as a person would: the relay path parses the code like the LAN path.
            results["join"] = await join_via_relay(relay.address, invitation.code.upper(),
                                                   newbie.dh, newbie.claim)
        outcome: PairingOutcome = results["offer"]
        welcome, sas = results["join"]
        assert outcome.claim == newbie.claim
        assert outcome.remote_static == newbie.dh.public
        assert len(sas) == 4 and sas == outcome.sas
        assert welcome == outcome.reply
        joined = Circle.from_records(welcome["records"])
        assert joined.state.member_by_dh(bytes(newbie.dh.public)) is not None
        assert invitation.used
        # One rendezvous per nameplate: it was consumed, and the relay holds no pipe.
        with pytest.raises(RelayError) as again:
            await open_join_pipe(relay.address, NewDevice(52).dh, invitation.nameplate)
        assert again.value.code == NO_OFFER
        await wait_for_nothing_held(relay)
        # The member's session carries on serving other requests.
        assert await alice.records()


async def test_a_wrong_code_fails_and_consumes_the_nameplate(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice")
    invitation = make_invitation(seeded_rng(60), trio.current_time())
    added: list[bytes] = []

    async def welcome(claim: bytes) -> dict[str, Any]:
        added.append(claim)
        return {"t": "pair.welcome", "records": circle.records()}

    results: dict[str, Any] = {}
    async with running_relay(tmp_path / "relay") as relay, \
            relay_client(relay, m["alice"], circle) as alice:

        async def inviter() -> None:
            try:
                results["offer"] = await offer_via_relay(alice, invitation, m["alice"].dh, welcome)
            except Exception as err:
                results["offer"] = err

        async with trio.open_nursery() as nursery:
            nursery.start_soon(inviter)
            await wait_for_offers(relay, 1)
            newbie = NewDevice(61)
            with pytest.raises(PairingAborted):
                await join_via_relay(relay.address, other_code(invitation.code), newbie.dh,
                                     newbie.claim)
        assert isinstance(results["offer"], WrongCode), results["offer"]
        assert invitation.used and added == []
        # The second join, even with the right code, finds nothing: one attempt.
        with pytest.raises(RelayError) as second:
            await join_via_relay(relay.address, invitation.code, newbie.dh, newbie.claim)
        assert second.value.code == NO_OFFER
        # And the spent invitation is not offered again.
        with pytest.raises(InvitationUsed):
            await offer_via_relay(alice, invitation, m["alice"].dh, welcome)


async def test_a_join_with_no_offer_is_refused_and_closed(tmp_path: Path) -> None:
    newbie = NewDevice(70)
    async with running_relay(tmp_path / "relay") as relay:
        with pytest.raises(RelayError) as refused:
            await join_via_relay(relay.address, "17-puppy-sausage", newbie.dh, newbie.claim)
        assert refused.value.code == NO_OFFER
        connection = await raw_connection(relay, newbie.dh)
        async with connection:
            await connection.send({"t": "relay.rendezvous", "rid": 1, "nameplate": 17,
                                   "role": "join"})
            answers = await until_closed(connection)  # one attempt per connection
        assert [(a["t"], a["code"], a["rid"]) for a in answers] == [("relay.error", NO_OFFER, 1)]


async def test_a_second_offer_on_the_same_nameplate_is_refused(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice", "bob")
    async with running_relay(tmp_path / "relay") as relay, \
            session(relay, m["alice"], circle) as alice, \
            session(relay, m["bob"], circle) as bob:
        async with trio.open_nursery() as nursery:
            opened: list[Any] = []

            async def offer_first() -> None:
                opened.append(await alice.rendezvous(42, "offer"))

            nursery.start_soon(offer_first)
            await wait_for_offers(relay, 1)
            with pytest.raises(RelayError) as refused:
                await bob.rendezvous(42, "offer")
            assert refused.value.code == NAMEPLATE_IN_USE and not refused.value.fatal
            # One rendezvous per connection: alice cannot hold a second one meanwhile.
            with pytest.raises(RelayError, match="rendezvous-busy"):
                await alice.rendezvous(43, "offer")
            # The first offer is intact: a join meets it, and bytes flow both ways.
            joiner = await open_join_pipe(relay.address, NewDevice(80).dh, 42)
        [offerer] = opened
        async with joiner, offerer:
            await joiner.send_all(b"hello from the new device")
            assert await offerer.receive_some() == b"hello from the new device"
            big = bytes(range(256)) * 1024  # 256 KiB: several relay.pipe frames
            async with trio.open_nursery() as nursery:
                nursery.start_soon(offerer.send_all, big)
                received = bytearray()
                while len(received) < len(big):
                    received += await joiner.receive_some()
            assert bytes(received) == big
            await offerer.aclose()
            assert await joiner.receive_some() == b""  # the other side's close is EOF
        # Both sessions carry on; the nameplate is free again for a new offer.
        assert await bob.records() == circle.records()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bob.rendezvous, 42, "offer")
            await wait_for_offers(relay, 1)
            nursery.cancel_scope.cancel()  # cancelling the wait withdraws the offer
        await wait_for_offers(relay, 0)
        with pytest.raises(RelayError, match=NO_OFFER):
            await open_join_pipe(relay.address, NewDevice(81).dh, 42)


@pytest.mark.parametrize("frames", [
    [{"t": "relay.rendezvous", "rid": 1, "nameplate": 5, "role": "offer"}],
    [{"t": "relay.fetch", "rid": 1, "mailbox": bytes(32), "after": 0}],
    [{"t": "relay.pipe", "data": b"to nobody"}],
    [{"t": "relay.backup_get", "rid": 1}],
], ids=["offer", "fetch", "pipe", "backup"])
async def test_an_unregistered_connection_may_only_join(tmp_path: Path,
                                                        frames: list[dict[str, Any]]) -> None:
    async with running_relay(tmp_path / "relay") as relay:
        connection = await raw_connection(relay, NewDevice(90).dh)
        async with connection:
            for frame in frames:
                await connection.send(frame)
            answers = await until_closed(connection)
        assert answers[-1]["t"] == "relay.error" and answers[-1]["code"] == NOT_REGISTERED


async def test_a_joined_connection_may_use_only_its_pipe(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice")
    async with running_relay(tmp_path / "relay") as relay, \
            session(relay, m["alice"], circle) as alice:
        async with trio.open_nursery() as nursery:
            opened: list[Any] = []

            async def offer() -> None:
                opened.append(await alice.rendezvous(7, "offer"))

            nursery.start_soon(offer)
            await wait_for_offers(relay, 1)
            connection = await raw_connection(relay, NewDevice(91).dh)
            await connection.send({"t": "relay.rendezvous", "rid": 1, "nameplate": 7,
                                   "role": "join"})
            assert await connection.receive() == {"t": "relay.rendezvous_ready", "rid": 1}
        [pipe] = opened
        async with connection, pipe:
            # Registering (or anything else) after the join is refused, and ends the pipe.
            await connection.send({"t": "relay.register", "rid": 2, "records": circle.records()})
            answers = await until_closed(connection)
            assert answers[-1]["code"] == NOT_REGISTERED
            with trio.fail_after(5):
                assert await pipe.receive_some() == b""


async def test_the_relay_stores_nothing_of_the_pipe(tmp_path: Path) -> None:
    circle, m, rng = make_circle("alice")
    newbie = NewDevice(100)
    invitation = make_invitation(seeded_rng(101), trio.current_time())
    async with running_relay(tmp_path / "relay") as relay, \
            relay_client(relay, m["alice"], circle) as alice:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(offer_via_relay, alice, invitation, m["alice"].dh,
                               welcomer(circle, m["alice"], rng))
            await wait_for_offers(relay, 1)
            welcome, _ = await join_via_relay(relay.address, invitation.code, newbie.dh,
                                              newbie.claim)
        raw = b"".join(path.read_bytes() for path in sorted((tmp_path / "relay").iterdir()))
    assert raw  # the relay did store the circle's registration
    assert newbie.claim not in raw and newbie.claim[:24] not in raw and newbie.claim[-24:] not in raw
    assert welcome["note"] not in raw
    assert invitation.code.encode() not in raw


# ---- limits ----------------------------------------------------------------------------


async def test_joins_are_rate_limited_per_source_address(tmp_path: Path) -> None:
    limits = Limits(join_rate_per_s=0.001, join_burst=2)
    async with running_relay(tmp_path / "relay", limits=limits) as relay:
        codes = []
        for seed in range(3):  # a fresh key each time: the address is what is limited
            try:
                await open_join_pipe(relay.address, NewDevice(110 + seed).dh, 9)
            except RelayError as err:
                codes.append(err.code)
        assert codes == [NO_OFFER, NO_OFFER, RATE_LIMITED]


async def test_pipe_frames_are_checked(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice")
    async with running_relay(tmp_path / "relay") as relay:
        connection = await raw_connection(relay, m["alice"].dh)
        async with connection:
            await connection.send({"t": "relay.register", "rid": 1, "records": circle.records()})
            assert (await connection.receive())["t"] == "relay.registered"
            await connection.send({"t": "relay.pipe", "data": bytes(MAX_PIPE_DATA_BYTES + 1)})
            answers = await until_closed(connection)
        assert answers[-1]["code"] == MALFORMED


async def test_a_side_that_stops_reading_holds_back_the_other_with_bounded_memory(
    tmp_path: Path,
) -> None:
    circle, m, _ = make_circle("alice")
    async with running_relay(tmp_path / "relay") as relay, \
            session(relay, m["alice"], circle) as alice:
        async with trio.open_nursery() as nursery:
            opened: list[Any] = []

            async def offer() -> None:
                opened.append(await alice.rendezvous(11, "offer"))

            nursery.start_soon(offer)
            await wait_for_offers(relay, 1)
            joiner = await open_join_pipe(relay.address, NewDevice(120).dh, 11)
        [offerer] = opened
        chunk = bytes(range(256)) * 256  # 64 KiB
        total = 24 * 1024 * 1024  # below the pipe's byte cap, above any socket buffers
        sent = 0

        async def send_everything() -> None:
            nonlocal sent
            while sent < total:
                await offerer.send_all(chunk)
                sent += len(chunk)

        async with joiner, offerer, trio.open_nursery() as nursery:
            nursery.start_soon(send_everything)
            # The joiner does not read: the offerer must stall, with the relay holding at
            # most its bounded queue for the joiner.
            last = -1
            while sent != last:
                last = sent
                await trio.sleep(0.5)
            assert sent < total
            [rendezvous] = relay.server._live  # noqa: SLF001
            assert rendezvous.join.pipe_queued <= MAX_PIPE_FRAMES_QUEUED
            assert len(rendezvous.join.answers) <= MAX_PIPE_FRAMES_QUEUED
            received = 0
            while received < total:  # now it reads, and everything arrives in order
                data = await joiner.receive_some()
                offset = received % len(chunk)
                assert data == (chunk + chunk)[offset:offset + len(data)]
                received += len(data)
            assert received == total


async def test_an_offer_expires_after_ten_minutes(autojump_clock: trio.abc.Clock,
                                                  tmp_path: Path) -> None:
    from .test_relay import open_storage

    circle, m, _ = make_circle("alice")
    storage = open_storage(tmp_path / "relay")
    storage.save_circle_records(circle.circle_id, circle.records())
    server = RelayServer(storage, DHKeyPair.generate(seeded_rng(7)))
    try:
        client_side, server_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_stream, server_side)
            connection = await open_secure_connection(
                client_side, initiator=True, static=m["alice"].dh, authorize=lambda key: True)
            await connection.send({"t": "relay.register", "rid": 1, "records": circle.records()})
            assert (await connection.receive())["t"] == "relay.registered"
            start = trio.current_time()
            await connection.send({"t": "relay.rendezvous", "rid": 2, "nameplate": 3,
                                   "role": "offer"})
            answer = await connection.receive()
            assert answer["t"] == "relay.error" and answer["code"] == OFFER_EXPIRED
            assert answer["rid"] == 2
            assert trio.current_time() - start == pytest.approx(OFFER_TTL_S, abs=1)
            assert server.rendezvous == {"offers": 0, "pipes": 0}
            # The connection stays: it may offer again.
            await connection.send({"t": "relay.rendezvous", "rid": 3, "nameplate": 3,
                                   "role": "offer"})
            await wait_until_time(lambda: server.rendezvous == {"offers": 1, "pipes": 0}, 5)
            await connection.aclose()
            nursery.cancel_scope.cancel()
    finally:
        storage.close()


async def test_a_disconnect_closes_the_other_sides_pipe(tmp_path: Path) -> None:
    circle, m, _ = make_circle("alice")
    async with running_relay(tmp_path / "relay") as relay:
        async with session(relay, m["alice"], circle) as alice:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alice.rendezvous, 12, "offer")
                await wait_for_offers(relay, 1)
                joiner = await open_join_pipe(relay.address, NewDevice(130).dh, 12)
        # alice's whole session is gone (a crash looks the same to the relay)
        async with joiner:
            with trio.fail_after(5):
                assert await joiner.receive_some() == b""
            with pytest.raises(trio.BrokenResourceError):
                await joiner.send_all(b"anyone there?")
        await wait_for_nothing_held(relay)


async def test_a_pipe_ends_after_its_lifetime(autojump_clock: trio.abc.Clock,
                                              tmp_path: Path) -> None:
    from meshd.protocol.relay import PIPE_LIFETIME_S

    from .test_relay import open_storage

    circle, m, _ = make_circle("alice")
    storage = open_storage(tmp_path / "relay")
    storage.save_circle_records(circle.circle_id, circle.records())
    server = RelayServer(storage, DHKeyPair.generate(seeded_rng(7)))

    async def connect(static: DHKeyPair) -> SecureConnection:
        client_side, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, server_side)
        return await open_secure_connection(client_side, initiator=True, static=static,
                                            authorize=lambda key: True)

    try:
        async with trio.open_nursery() as nursery:
            offerer = await connect(m["alice"].dh)
            await offerer.send({"t": "relay.register", "rid": 1, "records": circle.records()})
            assert (await offerer.receive())["t"] == "relay.registered"
            await offerer.send({"t": "relay.rendezvous", "rid": 2, "nameplate": 4,
                                "role": "offer"})
            await wait_until_time(lambda: server.rendezvous["offers"] == 1, 5)
            joiner = await connect(NewDevice(140).dh)
            await joiner.send({"t": "relay.rendezvous", "rid": 1, "nameplate": 4, "role": "join"})
            assert await joiner.receive() == {"t": "relay.rendezvous_ready", "rid": 1}
            assert await offerer.receive() == {"t": "relay.rendezvous_ready", "rid": 2}
            start = trio.current_time()
            ended: dict[str, float] = {}

            async def read(name: str, connection: SecureConnection) -> None:
                # Reading keeps the channel's keepalives going, as a device's reader does.
                try:
                    while True:
                        if (await connection.receive()) == {"t": "relay.pipe_close"}:
                            ended[name] = trio.current_time() - start
                except PeerClosed:
                    ended[name + " connection"] = trio.current_time() - start

            async with trio.open_nursery() as readers:
                readers.start_soon(read, "offerer", offerer)
                readers.start_soon(read, "joiner", joiner)
                await wait_until_time(lambda: "joiner connection" in ended)
                readers.cancel_scope.cancel()
            # The relay ends the pipe at its lifetime, and closes the unregistered joiner.
            assert ended == pytest.approx({"offerer": PIPE_LIFETIME_S, "joiner": PIPE_LIFETIME_S,
                                           "joiner connection": PIPE_LIFETIME_S}, abs=1)
            assert server.rendezvous == {"offers": 0, "pipes": 0}
            await offerer.aclose()
            nursery.cancel_scope.cancel()
    finally:
        storage.close()
