"""A join passed on to the relay process that holds the offer (several processes, one relay).

An offer lives in the process holding the offering connection; a shared storage records
that process's address (RelayStorage.claim_nameplate). A join arriving at another process
is passed on: this process opens a channel to the offer's process with the relay's own
static key (which only the relay's processes hold, so the other side knows it is a sibling
and applies no per-address join limit to it), sends the join there, and from then on
forwards the joiner's pipe frames (checked here first) one way and everything the offer's
process answers the other way, through the joiner's bounded send queue. The pipe's bytes
are the pairing's Noise messages either way: this process reads none of them.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..net.transport import CONNECTION_ERRORS, PeerClosed, SecureConnection, connect_secure
from ..protocol.crypto import DHKeyPair, RandomSource, constant_time_equal
from ..protocol.relay import NO_OFFER, ROLE_JOIN, RelayError, Rendezvous

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def open_upstream(address: str, request: Rendezvous, static: DHKeyPair,
                        rng: RandomSource) -> SecureConnection:
    """A channel to the sibling process at address, the join already sent on it."""
    host, port = split_address(address)
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            upstream = await connect_secure(
                host, port, static=static, rng=rng,
                authorize=lambda key: constant_time_equal(key, static.public))
            await upstream.send({"t": "relay.rendezvous", "rid": request.rid,
                                 "nameplate": request.nameplate, "role": ROLE_JOIN})
    except (*CONNECTION_ERRORS, PeerClosed) as err:
        log.warning("rendezvous %d: the relay process holding the offer (%s) is unreachable: %s",
                    request.nameplate, address, err)
        raise RelayError(NO_OFFER, f"no offer waits on nameplate {request.nameplate}") from None
    return upstream


async def pump_upstream(device: Any, upstream: SecureConnection, max_queued: int) -> None:
    """Forward what the offer's process sends to the joiner's send queue, pacing relay.pipe
    frames as the server does; when it closes, the joiner's connection closes too."""
    async with upstream:
        try:
            while True:
                frame = await upstream.receive()
                if frame.get("t") == "relay.pipe":
                    while device.pipe_queued >= max_queued:
                        device.pipe_room = trio.Event()
                        await device.pipe_room.wait()
                    device.pipe_queued += 1
                device.answer_nowait(frame)
        except PeerClosed:
            pass
        except CONNECTION_ERRORS as err:
            log.info("rendezvous: the channel to the offer's relay process ended: %s", err)
    device.upstream = None
    device.finish = True  # close the joiner's connection once everything queued is sent
    device.wakeup.set()
