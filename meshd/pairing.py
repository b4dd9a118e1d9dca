"""Pairing over a trio stream: the inviter's offer() and the joiner's join().

The decisions (code format, one attempt per invitation, expiry, the handshake, the message
checks) live in meshd/protocol/pairing.py (the code format in meshd/protocol/codes.py).
This shell runs them over one stream, whatever carried it there (a LAN connection found
over mDNS, or later a relay rendezvous), applies the timeouts and logs each attempt on an
invitation. It never logs the code.

Failure contract: offer() and join() raise PairingError subclasses for pairing outcomes
(WrongCode, InvitationUsed, InvitationExpired, PairingRefused, PairingAborted, ...) and
otherwise what transport.CONNECTION_ERRORS names; the stream is closed either way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from .identity import fingerprint
from .net.transport import PeerClosed, SecureConnection, open_secure_connection
from .protocol.crypto import DHKeyPair, PublicKey, RandomSource
from .protocol.errors import ProtocolError, RemoteProtocolError
from .protocol.pairing import (
    INVITATION_TTL_S,
    InvalidCode,
    Invitation,
    InvitationExpired,
    InvitationUsed,
    MalformedPairingMessage,
    PairingAborted,
    PairingError,
    PairingHandshake,
    PairingRefused,
    WrongCode,
    WrongNameplate,
    check_reply_to_send,
    device_message,
    make_invitation,
    parse_device_message,
    parse_reply,
    refused_message,
    sas_words,
)
from .protocol.records import DeviceInfo
from .quietlog import QuietLogger

__all__ = [
    "INVITATION_TTL_S",
    "InvalidCode",
    "Invitation",
    "InvitationExpired",
    "InvitationUsed",
    "MalformedPairingMessage",
    "PairingAborted",
    "PairingError",
    "PairingOutcome",
    "PairingRefused",
    "WrongCode",
    "WrongNameplate",
    "join",
    "make_invitation",
    "offer",
]

log = logging.getLogger(__name__)
quiet = QuietLogger(log)

# After the handshake, each side waits at most this long for the other's message (the
# inviter's welcome() runs inside it).
EXCHANGE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PairingOutcome:
    """A finished pairing, as the inviter saw it."""

    remote_static: PublicKey
    claim: bytes
    sas: list[str]
    reply: dict[str, Any]


def _accept_any_key(_key: PublicKey) -> bool:
    return True  # knowing the code is the authorisation: the PSK proves it


async def offer(
    stream: trio.abc.Stream,
    invitation: Invitation,
    static: DHKeyPair,
    welcome: Callable[[bytes], Awaitable[dict[str, Any]]],
    *,
    clock: Callable[[], float] = trio.current_time,
    rng: RandomSource = os.urandom,
) -> PairingOutcome:
    """Answer one joiner on stream with this invitation.

    The invitation is spent the moment the joiner's third handshake message (the one that
    tests the code) arrives, right code or wrong; a joiner that leaves before spends nothing. welcome(claim) gets the joiner's claim and returns the reply to send
    (pair.welcome, or pair.refused); if it raises RemoteProtocolError (a bad claim), the
    joiner is sent pair.refused with the error's reason and the error propagates.
    """
    try:
        invitation.check(clock())
    except PairingError as err:
        quiet.warning(("refused", invitation.nameplate, err.reason),
                      "pairing: refused a connection for invitation %d: %s", invitation.nameplate, err)
        await trio.aclose_forcefully(stream)
        raise

    attempted = False

    def on_attempt() -> None:
        nonlocal attempted
        invitation.claim_attempt(clock())
        attempted = True

    phase = PairingHandshake.inviter(invitation, static=static, rng=rng, on_attempt=on_attempt,
                                     check_open=lambda: invitation.check(clock()))
    try:
        connection = await open_secure_connection(
            stream, initiator=False, static=static, authorize=_accept_any_key, rng=rng,
            handshake=phase,
        )
    except (InvitationUsed, InvitationExpired) as err:
        log.info("pairing: refused an attempt on invitation %d: %s", invitation.nameplate, err)
        raise
    except Exception as err:
        reason = getattr(err, "reason", type(err).__name__)
        if attempted:
            log.warning("pairing: failed attempt on invitation %d (%s); the invitation is used up",
                        invitation.nameplate, reason)
        else:
            quiet.warning(("handshake", invitation.nameplate, reason),
                          "pairing: connection for invitation %d ended before an attempt: %s",
                          invitation.nameplate, err)
        raise

    claim: bytes | None = None
    async with connection:
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT_S):
                claim = parse_device_message(await connection.receive())
                try:
                    reply = check_reply_to_send(await welcome(claim))
                except RemoteProtocolError as err:
                    await connection.send(refused_message(getattr(err, "reason", "bad-claim")))
                    raise
                await connection.send(reply)
        except Exception as err:
            log.warning("pairing: invitation %d: %s got no welcome (%s)", invitation.nameplate,
                        _who(claim), getattr(err, "reason", type(err).__name__))
            raise
    sas = sas_words(connection.handshake_hash)
    log.info("pairing: invitation %d answered %s to %s", invitation.nameplate, reply["t"], _who(claim))
    return PairingOutcome(connection.remote_static, claim, sas, reply)


def _who(claim: bytes | None) -> str:
    """The joiner as the log names every device: name and fingerprint, from its signed claim
    (never its X25519 key, which no screen shows)."""
    try:
        device = DeviceInfo.verify_claim(claim) if claim is not None else None
    except ProtocolError:
        device = None
    return f"{device.name} ({fingerprint(device.sign_key)})" if device else "a device with no valid claim"


async def join(
    stream: trio.abc.Stream,
    code: str,
    static: DHKeyPair,
    claim: bytes,
    *,
    rng: RandomSource = os.urandom,
) -> tuple[dict[str, Any], list[str]]:
    """Join with code over stream (connected to the inviter): (welcome message, SAS words).

    Raises InvalidCode before any I/O for a code that does not parse, PairingRefused when
    the inviter refused the claim, and PairingAborted when it closed without a welcome
    (a mistyped, expired or used code: the inviter does not say which).
    """
    try:
        phase = PairingHandshake.joiner(code, static=static, rng=rng)
    except InvalidCode:
        await trio.aclose_forcefully(stream)
        raise
    try:
        connection = await open_secure_connection(
            stream, initiator=True, static=static, authorize=_accept_any_key, rng=rng,
            handshake=phase,
        )
    except (RemoteProtocolError, trio.BrokenResourceError) as err:
        if phase.received_second_message or isinstance(err, PairingError):
            raise
        raise PairingAborted(
            "the inviting device closed the connection: the code may be mistyped, expired or"
            " already used; ask for a new code"
        ) from err
    async with connection:
        welcome = await _exchange(connection, claim)
    return welcome, sas_words(connection.handshake_hash)


async def _exchange(connection: SecureConnection, claim: bytes) -> dict[str, Any]:
    try:
        with trio.fail_after(EXCHANGE_TIMEOUT_S):
            await connection.send(device_message(claim))
            return parse_reply(await connection.receive())
    except (PeerClosed, trio.BrokenResourceError) as err:
        # A wrong code shows here: the inviter cannot decrypt message 3 and hangs up.
        raise PairingAborted(
            "the inviting device did not accept this code (mistyped, expired or already"
            " used); ask for a new code"
        ) from err
