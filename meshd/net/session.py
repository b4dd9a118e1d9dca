"""One device session over a live connection: circle gossip and log sync, full duplex.

The task reading the connection never sends: answers to the peer's requests go through a
small queue and a task of their own, and log sync sends from its own task, so reading never
waits on a peer that does not read. A peer that asks faster than it reads the answers fills
the queue and is dropped (UnexpectedMessage). Any bad input ends this session only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from ..api.metrics import sync_payload_bytes
from ..excgroup import first_leaf
from ..protocol.gossip import Answer, Gossip, Merge, heads_message, is_gossip
from ..protocol.messages import UnexpectedMessage
from ..store.db import StoreError
from .peer import Peer, PeerHost
from .transport import CONNECTION_ERRORS, PeerClosed, SecureConnection

# Answers (circle.want, circle.records) queued for a peer; a peer that asks more without
# reading them is dropped.
MAX_QUEUED_ANSWERS = 16

def new_gossip(daemon: PeerHost) -> Gossip:
    """The circle gossip machine of one session, reading the daemon's current circle."""
    return Gossip(has=lambda record_hash: daemon.circle.has(record_hash),
                  records=lambda: daemon.circle.records())


async def converse(daemon: PeerHost, peer: Peer, connection: SecureConnection, *,
                   arrived: Callable[[], None], gossip: Gossip) -> None:
    """Run the session until the peer closes it (returns) or it fails (raises).

    `arrived` is called for every message from the peer (it records last_seen and confirms the
    connection); `gossip` (protocol/gossip.py) decides what each circle.* message asks of us.
    """
    sync_bytes = daemon.metrics.sync_bytes

    async def send(message: dict[str, Any]) -> None:
        await connection.send(message)
        sync_bytes.inc(sync_payload_bytes(message), direction="sent")

    sync = daemon.logs.peer(send, daemon.is_author_allowed)
    peer.sync = sync
    answers, to_answer = trio.open_memory_channel[dict[str, Any]](MAX_QUEUED_ANSWERS)

    def answer(message: dict[str, Any]) -> None:
        try:
            answers.send_nowait(message)
        except trio.WouldBlock:
            raise UnexpectedMessage("the peer asks faster than it reads the answers") from None

    async def send_answers() -> None:
        async for message in to_answer:
            await connection.send(message)

    async with trio.open_nursery() as nursery:
        await connection.send(heads_message(daemon.circle.heads))
        nursery.start_soon(sync.run)
        nursery.start_soon(send_answers)
        async for message in connection:
            arrived()
            kind = message["t"]
            if kind.startswith("log."):
                await sync.handle(message)
                sync_bytes.inc(sync_payload_bytes(message), direction="received")
            elif is_gossip(kind):
                action = gossip.receive(message)
                if isinstance(action, Answer):
                    answer(action.message)
                elif isinstance(action, Merge):
                    daemon.merge_circle_records(action.records, source=peer.name)
                    if peer.connection is not connection:
                        return  # the merge removed this peer
            else:
                raise UnexpectedMessage(f"unknown message type {kind[:40]!r}")
        await sync.drain()  # the last batch received commits (and wakes the other peers)
        nursery.cancel_scope.cancel()


def single_connection_error(raised: BaseException,
                            report_bugs: Callable[[BaseException], None]) -> BaseException:
    """The connection error inside a nursery's group, or the ExceptionGroup of bugs it holds
    (contained to this connection).

    A group holding Cancelled (the daemon stopping: the connection's own cancel scope leaves
    it to the outermost cancelled scope) or KeyboardInterrupt raises those alone: what the
    session's tasks raised in the same instant (the peer's goodbye, a broken socket, a failed
    commit) ends with the session, and must not leave the daemon's nursery as an error. A bug
    among them is still handed to report_bugs."""
    if not isinstance(raised, BaseExceptionGroup):
        return raised
    errors, stopping = raised.split(Exception)
    if stopping is not None:
        if errors is not None:
            _, bugs = errors.split((PeerClosed, StoreError, *CONNECTION_ERRORS))
            if bugs is not None:
                report_bugs(bugs)
        raise stopping from None
    assert isinstance(errors, ExceptionGroup)
    expected, unexpected = errors.split((PeerClosed, StoreError, *CONNECTION_ERRORS))
    if unexpected is not None:
        return unexpected
    assert expected is not None
    return first_leaf(expected)


def remote_address(connection: SecureConnection) -> str | None:
    return stream_address(connection.stream)


def stream_address(stream: trio.abc.Stream) -> str | None:
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2]  # type: ignore[union-attr]
    except (AttributeError, OSError):
        return None
    return f"{host}:{port}"

