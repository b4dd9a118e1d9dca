"""Accepting secure connections: each gets a handshake, then its handler, and its failure
ends it alone (refused handshakes are tallied, bugs reported, the server goes on)."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from ..containment import report_bug
from ..protocol.crypto import DHKeyPair, PublicKey, RandomSource
from ..quietlog import QuietLogger
from .byterate import PEER_BYTE_RATE, ByteRate
from .tally import RefusalTally, cause_of, host_of
from .transport import CONNECTION_ERRORS, PeerClosed, SecureConnection, open_secure_connection

log = logging.getLogger(__name__)
quiet = QuietLogger(log)


async def serve_secure(
    handler: Callable[[SecureConnection], Awaitable[None]],
    listeners: list[trio.SocketListener],
    *,
    static: DHKeyPair,
    authorize: Callable[[PublicKey], bool],
    rng: RandomSource = os.urandom,
    handler_nursery: trio.Nursery | None = None,
    byte_rate: ByteRate | None = PEER_BYTE_RATE,
) -> NoReturn:
    """Accept connections forever; each gets a handshake, then handler(connection).

    One connection's failure (bad input, timeout, network) is logged once and ends only that
    connection. `handler_nursery` is where per-connection tasks run (trio's serve_listeners
    convention); by default, a nursery of this call.
    """

    refusals = RefusalTally(log, "handshakes")

    async def run_one(stream: trio.abc.Stream) -> None:
        peer = _describe_stream(stream)
        try:
            connection = await open_secure_connection(
                stream, initiator=False, static=static, authorize=authorize, rng=rng,
                byte_rate=byte_rate)
        except CONNECTION_ERRORS as err:
            refusals.note(cause_of(err), host_of(peer), trio.current_time())
            return
        except Exception as bug:  # a bug in the handshake ends this connection only
            report_bug("connection", bug)
            return
        async with connection:
            try:
                await handler(connection)
            except PeerClosed:
                pass
            except CONNECTION_ERRORS as err:
                quiet.warning(("conn", cause_of(err)), "the connection at %s dropped: %s", peer, err)
            except Exception as bug:  # a bug in the handler ends this connection, not the server
                report_bug("connection", bug)

    await trio.serve_listeners(run_one, listeners, handler_nursery=handler_nursery)
    raise AssertionError("serve_listeners returned")  # pragma: no cover


def _describe_stream(stream: trio.abc.Stream) -> str:
    socket = getattr(stream, "socket", None)
    if socket is None:
        return "a stream"
    try:
        host, port = socket.getpeername()[:2]
    except OSError:
        return "a closed socket"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
