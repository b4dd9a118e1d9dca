"""Pairing through a relay's rendezvous: for devices that cannot find each other on the LAN.

The inviter offers its invitation's nameplate at a relay it is registered with; the new
device, which has no circle and so cannot register, joins that nameplate with the code it
was told. The relay then forwards bytes between the two (protocol/relay.md "Rendezvous"),
and meshd.pairing's offer() and join() run over that pipe exactly as over a LAN
connection: the relay carries only the Noise_XXpsk3 ciphertext of the pairing handshake,
inside each device's own Noise channel to the relay. The Invitation is the same object the
LAN path uses, so its one attempt is shared by every path it is offered on.

Failure contract: besides what meshd.pairing raises (PairingError subclasses and
transport.CONNECTION_ERRORS), RelayError for the relay's refusals: "nameplate-in-use"
(another offer holds the nameplate: make a new code), "no-offer" (the code's nameplate has
no offer at that relay, or its one join already happened), "rate-limited"; and for the
joiner UnauthorizedPeer / OSError when the relay is the wrong one or unreachable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..net.transport import CONNECTION_ERRORS
from ..pairing import InvitationExpired, PairingError, PairingOutcome, join, offer
from ..protocol.crypto import DHKeyPair, RandomSource
from ..protocol.pairing import Invitation, parse_code
from ..protocol.relay import NO_OFFER, ROLE_OFFER, UNAVAILABLE, RelayError
from .address import RelayAddress
from .client import RelayClient
from .pipe import open_join_pipe

__all__ = ["join_via_relay", "offer_via_relay"]

log = logging.getLogger(__name__)

# After the relay connection dropped under a waiting offer: the client reconnects on its
# own; this only keeps a dead session from being asked again in a tight loop.
REOFFER_DELAY_S = 1.0
# A joiner told "no-offer" tries again for this long (protocol/relay.md, "One pipe per offer").
NO_OFFER_RETRY_S = 5.0
NO_OFFER_RETRY_DELAY_S = 0.25


async def offer_via_relay(
    client: RelayClient,
    invitation: Invitation,
    static: DHKeyPair,
    welcome: Callable[[bytes], Awaitable[dict[str, Any]]],
    *,
    clock: Callable[[], float] = trio.current_time,
    rng: RandomSource = os.urandom,
) -> PairingOutcome:
    """Offer the invitation at the relay until a device joins, then pair with it.

    Waits (cancellable: cancelling withdraws the offer) until the invitation's expiry,
    then raises InvitationExpired. A lost relay connection does not spend the invitation
    (no joiner reached it), so the offer is made again once the client has reconnected.
    Nor does a joiner that leaves before testing the code (a stranger who joined the
    nameplate without it, protocol/pairing.md): the offer is made again at once.
    """
    while True:
        invitation.check(clock())  # InvitationUsed / InvitationExpired: nothing to offer
        pipe = None
        lost = False
        # Only the wait is bounded by the expiry: a pairing that started in time finishes.
        with trio.move_on_after(invitation.expires_at - clock()):
            try:
                pipe = await client.rendezvous(invitation.nameplate, ROLE_OFFER)
            except RelayError as err:
                if err.code != UNAVAILABLE:
                    raise
                lost = True
        if lost:
            log.info("pairing: relay connection lost under the offer of invitation %d; "
                     "offering again once reconnected", invitation.nameplate)
            await trio.sleep(REOFFER_DELAY_S)
            continue
        if pipe is None:
            raise InvitationExpired(f"invitation {invitation.nameplate} has expired")
        log.info("pairing: a device joined invitation %d at relay %s:%d",
                 invitation.nameplate, client.address.host, client.address.port)
        # offer() checks the invitation again: another path may have spent it meanwhile.
        try:
            return await offer(pipe, invitation, static, welcome, clock=clock, rng=rng)
        except (PairingError, *CONNECTION_ERRORS) as err:
            if invitation.used or isinstance(err, InvitationExpired):
                raise  # an attempt was made (right or wrong code), or time is up
            log.info("pairing: the joiner of invitation %d left before any attempt (%s); "
                     "offering it again", invitation.nameplate, getattr(err, "reason", type(err).__name__))


async def join_via_relay(
    relay_address: RelayAddress | str,
    code: str,
    static: DHKeyPair,
    claim: bytes,
    *,
    rng: RandomSource = os.urandom,
) -> tuple[dict[str, Any], list[str]]:
    """Join the invitation named by code's nameplate at the relay: (welcome, SAS words).

    Raises InvalidCode before any I/O, RelayError "no-offer" when the relay holds no offer
    for the nameplate (none made there, or its one attempt already used), and otherwise
    what meshd.pairing.join raises (PairingAborted for a wrong, expired or used code).
    """
    nameplate, _ = parse_code(code)
    deadline = trio.current_time() + NO_OFFER_RETRY_S
    while True:
        try:
            pipe = await open_join_pipe(relay_address, static, nameplate, rng=rng)
            break
        except RelayError as err:
            # The offer may be on its way back (a stranger's pipe just ended): try again.
            if err.code != NO_OFFER or trio.current_time() >= deadline:
                raise
            await trio.sleep(NO_OFFER_RETRY_DELAY_S)
    try:
        return await join(pipe, code, static, claim, rng=rng)
    finally:
        await pipe.aclose()  # join() closed it already unless it failed before the handshake
