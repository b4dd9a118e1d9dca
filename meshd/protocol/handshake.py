"""The handshake phase of a channel: what a Channel needs from a handshake, and meshd's XX.

A Channel (channel.py) frames and encrypts; the phase turns unframed Noise handshake messages
into replies until it is done, then hands over the two cipher states and the peer's static
key (HandshakeResult). XXHandshake is the relay's and the tests' Noise_XX (run by noisexx.py's
XXState, the generic HandshakeState's XX written out); pairing.py and memberhandshake.py supply
the others (protocol/channel.md, protocol/pairing.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .constants import PROLOGUE
from .crypto import DHKeyPair, PublicKey, RandomSource
from .errors import LocalProtocolError, RemoteProtocolError
from .noise import CipherState, HandshakeState
from .noisexx import XXState


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    send_cipher: CipherState
    receive_cipher: CipherState
    remote_static: PublicKey
    handshake_hash: bytes
    initiator: bool


class HandshakePhase(Protocol):
    """What a Channel needs from a handshake: unframed Noise messages in and out."""

    def initial_frames(self) -> list[bytes]: ...

    def on_frame(self, frame: bytes) -> list[bytes]: ...

    @property
    def done(self) -> bool: ...

    def result(self) -> HandshakeResult: ...


class UnauthorizedPeer(RemoteProtocolError):
    """The handshake succeeded but the remote static key is not one we may talk to."""


def handshake_result(state: HandshakeState | XXState) -> HandshakeResult:
    if state.send_cipher is None or state.receive_cipher is None or state.rs is None:
        raise LocalProtocolError("handshake is not complete")
    return HandshakeResult(
        state.send_cipher, state.receive_cipher, state.rs, state.handshake_hash, state.initiator
    )


class XXHandshake:
    """meshd's device and relay handshake: Noise_XX with prologue meshd/1, empty payloads.

    The remote static key goes to `authorize` as soon as it is known: the initiator checks
    the responder before it reveals its own static key in message 3; the responder checks
    the initiator on message 3, before any application message is accepted.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static: DHKeyPair,
        rng: RandomSource,
        authorize: Callable[[PublicKey], bool],
        prologue: bytes = PROLOGUE,
    ) -> None:
        # Noise_XX written out (noisexx.py): the same messages as HandshakeState's XX.
        self._state = XXState(initiator=initiator, prologue=prologue, rng=rng, s=static)
        self._authorize = authorize

    def initial_frames(self) -> list[bytes]:
        return [self._state.write_message(b"")] if self._state.initiator else []

    def on_frame(self, frame: bytes) -> list[bytes]:
        # Version 1 sends empty handshake payloads; a later version's payload is ignored.
        self._state.read_message(frame)
        if self._state.rs is not None and not self._authorize(self._state.rs):
            raise UnauthorizedPeer(f"{self._state.rs!r} is not authorised here")
        if not self._state.complete and self._state.is_my_turn:
            return [self._state.write_message(b"")]
        return []

    @property
    def done(self) -> bool:
        return self._state.complete

    def result(self) -> HandshakeResult:
        return handshake_result(self._state)
