"""offer() and join() over real loopback TCP (and memory streams for the timing cases)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from meshd.net.transport import open_secure_connection
from meshd.pairing import (
    InvalidCode,
    Invitation,
    InvitationExpired,
    InvitationUsed,
    PairingAborted,
    PairingOutcome,
    PairingRefused,
    WrongCode,
    join,
    make_invitation,
    offer,
)
from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.errors import RemoteProtocolError
from meshd.protocol.pairing import PairingHandshake

from ..protocol.harness import seeded_rng

INVITER = DHKeyPair.generate(seeded_rng(1))
JOINER = DHKeyPair.generate(seeded_rng(2))
CLAIM = b"signed device record"


class BadClaim(RemoteProtocolError):
    reason = "bad-signature"


def other_code(code: str) -> str:
    """The same nameplate with a different second word."""
    nameplate, first, second = code.split("-")
    return f"{nameplate}-{first}-{'zoo' if second != 'zoo' else 'zone'}"


async def welcome_records(claim: bytes) -> dict[str, Any]:
    return {"t": "pair.welcome", "records": [b"genesis", claim], "epoch_key": b"k" * 32}


async def attempt(
    listener: trio.SocketListener,
    invitation: Invitation,
    code: str,
    welcome: Callable[[bytes], Awaitable[dict[str, Any]]] = welcome_records,
    **offer_options: Any,
) -> tuple[PairingOutcome | BaseException, tuple[dict[str, Any], list[str]] | BaseException]:
    """One joiner dials the listener; the inviter offers on the accepted stream."""
    port = listener.socket.getsockname()[1]
    results: dict[str, Any] = {}

    async def inviter() -> None:
        stream = await listener.accept()
        try:
            results["offer"] = await offer(stream, invitation, INVITER, welcome, **offer_options)
        except Exception as err:
            results["offer"] = err

    async def joiner() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            results["join"] = await join(stream, code, JOINER, CLAIM)
        except Exception as err:
            results["join"] = err

    async with trio.open_nursery() as nursery:
        nursery.start_soon(inviter)
        nursery.start_soon(joiner)
    return results["offer"], results["join"]


@pytest.fixture
async def listener():
    [tcp] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with tcp:
        yield tcp


def no_secret_logged(caplog: pytest.LogCaptureFixture, code: str) -> None:
    words = code.split("-")[1:]
    for record in caplog.records:
        text = record.getMessage()
        assert code not in text
        assert not any(word in text.split() for word in words)


async def test_right_code_pairs_and_both_sides_show_the_same_words(
    listener: trio.SocketListener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshd.pairing")
    invitation = make_invitation(seeded_rng(10), trio.current_time())
    seen: list[bytes] = []

    async def welcome(claim: bytes) -> dict[str, Any]:
        seen.append(claim)
        return await welcome_records(claim)

    outcome, joined = await attempt(listener, invitation, invitation.code.upper(), welcome)
    assert isinstance(outcome, PairingOutcome), outcome
    assert not isinstance(joined, BaseException), joined
    reply, sas = joined
    assert seen == [CLAIM]
    assert outcome.claim == CLAIM
    assert outcome.remote_static == JOINER.public
    assert reply == {"t": "pair.welcome", "records": [b"genesis", CLAIM], "epoch_key": b"k" * 32}
    assert outcome.reply == reply
    assert len(sas) == 4 and sas == outcome.sas
    assert invitation.used
    no_secret_logged(caplog, invitation.code)

    # Reusing the code after a success is refused at once.
    outcome, joined = await attempt(listener, invitation, invitation.code)
    assert isinstance(outcome, InvitationUsed)
    assert isinstance(joined, PairingAborted)


async def test_wrong_code_is_logged_and_burns_the_invitation(
    listener: trio.SocketListener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshd.pairing")
    invitation = make_invitation(seeded_rng(11), trio.current_time())
    called: list[bytes] = []

    async def welcome(claim: bytes) -> dict[str, Any]:
        called.append(claim)
        return await welcome_records(claim)

    outcome, joined = await attempt(listener, invitation, other_code(invitation.code), welcome)
    assert isinstance(outcome, WrongCode)
    assert isinstance(joined, PairingAborted)
    assert called == []
    assert invitation.used
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"failed attempt on invitation {invitation.nameplate} (wrong-code)" in w
               for w in warnings)
    no_secret_logged(caplog, invitation.code)
    no_secret_logged(caplog, other_code(invitation.code))

    # The right code, second: too late.
    outcome, joined = await attempt(listener, invitation, invitation.code, welcome)
    assert isinstance(outcome, InvitationUsed)
    assert isinstance(joined, PairingAborted)
    assert called == []


async def test_expired_code_is_refused_and_not_spent(listener: trio.SocketListener) -> None:
    invitation = make_invitation(seeded_rng(12), trio.current_time(), ttl=0)
    outcome, joined = await attempt(listener, invitation, invitation.code)
    assert isinstance(outcome, InvitationExpired)
    assert isinstance(joined, PairingAborted)
    assert not invitation.used


async def test_expiry_is_checked_again_when_message_1_arrives(
    listener: trio.SocketListener,
) -> None:
    invitation = make_invitation(seeded_rng(13), 0.0, ttl=600)
    times = iter([1.0, 601.0])  # accepted in time, message 1 arrives too late
    outcome, joined = await attempt(listener, invitation, invitation.code, clock=lambda: next(times))
    assert isinstance(outcome, InvitationExpired)
    assert isinstance(joined, PairingAborted)


async def test_refused_claim_reaches_the_joiner(listener: trio.SocketListener) -> None:
    async def reject(claim: bytes) -> dict[str, Any]:
        raise BadClaim("claim signature does not verify")

    invitation = make_invitation(seeded_rng(14), trio.current_time())
    outcome, joined = await attempt(listener, invitation, invitation.code, reject)
    assert isinstance(outcome, BadClaim)
    assert isinstance(joined, PairingRefused)
    assert joined.detail == "bad-signature"

    async def refuse(claim: bytes) -> dict[str, Any]:
        return {"t": "pair.refused", "reason": "duplicate-device"}

    invitation = make_invitation(seeded_rng(15), trio.current_time())
    outcome, joined = await attempt(listener, invitation, invitation.code, refuse)
    assert isinstance(outcome, PairingOutcome)
    assert isinstance(joined, PairingRefused) and joined.detail == "duplicate-device"


async def test_two_joiners_at_once_get_one_attempt(
    listener: trio.SocketListener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshd.pairing")
    invitation = make_invitation(seeded_rng(16), trio.current_time())
    port = listener.socket.getsockname()[1]
    offers: list[Any] = []
    joins: list[Any] = []
    both_accepted = trio.Event()

    async def inviter(stream: trio.abc.Stream) -> None:
        try:
            offers.append(await offer(stream, invitation, INVITER, welcome_records))
        except Exception as err:
            offers.append(err)

    async def accept_two(nursery: trio.Nursery) -> None:
        streams = [await listener.accept(), await listener.accept()]
        # Both connections pass the first check before either sends message 1.
        for stream in streams:
            nursery.start_soon(inviter, stream)
        both_accepted.set()

    async def joiner(connected: trio.Event) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        connected.set()
        await both_accepted.wait()
        try:
            joins.append(await join(stream, invitation.code, JOINER, CLAIM))
        except Exception as err:
            joins.append(err)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_two, nursery)
        first = trio.Event()
        nursery.start_soon(joiner, first)
        await first.wait()
        nursery.start_soon(joiner, trio.Event())
    assert sorted(type(o).__name__ for o in offers) == ["InvitationUsed", "PairingOutcome"]
    assert sorted(type(j).__name__ for j in joins) == ["PairingAborted", "tuple"]
    # The loser was refused when its message 3 arrived, not by the check at accept time.
    assert any("refused an attempt" in r.getMessage() for r in caplog.records)


async def test_invalid_code_fails_before_any_io() -> None:
    left, right = trio.testing.memory_stream_pair()
    with pytest.raises(InvalidCode):
        await join(left, "seven-puppy-sausage", JOINER, CLAIM)
    assert await right.receive_some(10) == b""  # closed, nothing sent


async def test_a_silent_joiner_hits_the_handshake_deadline(autojump_clock: Any) -> None:
    left, right = trio.testing.memory_stream_pair()
    invitation = make_invitation(seeded_rng(17), trio.current_time())
    start = trio.current_time()
    with pytest.raises(RemoteProtocolError, match="handshake not finished"):
        await offer(left, invitation, INVITER, welcome_records)
    assert trio.current_time() - start == pytest.approx(10.0)
    assert not invitation.used  # no message 1, no attempt spent
    del right


async def test_a_joiner_that_never_sends_its_claim_times_out(autojump_clock: Any) -> None:
    inviter_stream, joiner_stream = trio.testing.memory_stream_pair()
    invitation = make_invitation(seeded_rng(18), trio.current_time())
    async def silent_joiner() -> None:
        connection = await open_secure_connection(
            joiner_stream, initiator=True, static=JOINER, authorize=lambda key: True,
            handshake=PairingHandshake.joiner(invitation.code, static=JOINER, rng=seeded_rng(3)),
        )
        await trio.sleep_forever()
        del connection

    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent_joiner)
        with pytest.raises(trio.TooSlowError):
            await offer(inviter_stream, invitation, INVITER, welcome_records)
        nursery.cancel_scope.cancel()
    assert invitation.used
