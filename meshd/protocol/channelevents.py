"""What a Channel reports and the states it passes through (channel.py is the machine).

Kind is the first plaintext byte of every transport message (protocol/channel.md, "Transport
messages"); State is the channel's state; next_event() returns one of the events below or
NEED_DATA.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .crypto import PublicKey


class Kind(enum.IntEnum):
    """The first plaintext byte of every transport message."""

    MESSAGE = 0  # the last (or only) piece of an application message
    MESSAGE_PART = 1  # a piece of an application message; more pieces follow
    KEEPALIVE = 2  # empty body; proves liveness
    REKEY = 3  # empty body; the sender's direction switches to Rekey(k) after this message
    CLOSE = 4  # body: UTF-8 reason; the sender closes after this message




class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"  # we or the peer closed cleanly
    ERROR = "error"  # terminal; the shell closes the stream


class NeedData(enum.Enum):
    NEED_DATA = "need data"


NEED_DATA = NeedData.NEED_DATA


# ---- Events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    remote_static: PublicKey
    handshake_hash: bytes


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed: with a reason (a CLOSE message) or without one (EOF)."""

    reason: str | None


Event = HandshakeCompleted | MessageReceived | ConnectionClosed
