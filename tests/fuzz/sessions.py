"""What the live fuzzers (live.py) connect with and count: a stranger's and a member's dial
of a device port or relay, the member's PSK, and the count of inputs by kind."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import trio

from meshd.circleservice import CIRCLE_STATE_KEY
from meshd.net.transport import SecureConnection, connect_secure, open_secure_connection
from meshd.protocol.circle import Circle
from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.memberhandshake import MemberHandshake
from meshd.store.db import Store

Dial = Callable[[tuple[str, int], DHKeyPair], Awaitable[SecureConnection]]


async def dial_stranger(address: tuple[str, int], static: DHKeyPair) -> SecureConnection:
    """meshd's plain XX handshake (the relay's; at a device port it fails at message 1)."""
    return await connect_secure(*address, static=static, authorize=lambda key: True)


def dial_member(psk: bytes) -> Dial:
    """Noise_XXpsk0 keyed by the circle's current epoch, as a member dials a device port
    (protocol/channel.md, "The device port")."""
    async def dial(address: tuple[str, int], static: DHKeyPair) -> SecureConnection:
        stream = await trio.open_tcp_stream(*address)
        return await open_secure_connection(
            stream, initiator=True, static=static, authorize=lambda key: True,
            handshake=MemberHandshake(initiator=True, static=static, rng=os.urandom,
                                      authorize=lambda key: True, psks=[psk]))
    return dial


def member_psk(state_dir: Path, member: DHKeyPair) -> bytes:
    """The current epoch's device-port PSK, from the member's own saved circle."""
    store = Store(state_dir / "meshd.db")
    try:
        saved = store.get_state(CIRCLE_STATE_KEY)
    finally:
        store.close()
    assert saved is not None, "the member has no saved circle"
    return Circle.from_records(msgpack.unpackb(saved)).recent_epochs(member, 1)[0].device_psk


@dataclass
class Counts:
    garbage: int = 0  # raw bytes before any handshake
    refused: int = 0  # connections whose handshake the target refused (a stranger's at a device)
    frames: int = 0  # frames sent behind a completed handshake
    connections: int = 0

    @property
    def sent(self) -> int:
        return self.garbage + self.refused + self.frames

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.garbage + other.garbage, self.refused + other.refused,
                      self.frames + other.frames, self.connections + other.connections)

    def figures(self) -> dict[str, int]:
        return {"inputs": self.sent, "garbage": self.garbage, "refused": self.refused,
                "behind_handshake": self.frames, "connections": self.connections}
