"""The device port's handshake: Noise_XXpsk0 keyed by the circle's epoch (protocol/channel.md).

A stranger without an epoch key cannot produce a message 1 that decrypts, and the responder
answers such a message with nothing: no static key and no stable bytes reach anyone who has
not proven circle membership. Members across an epoch change: the responder trial-decrypts
message 1 under each PSK it accepts (current epoch, previous one); the initiator offers one
PSK per connection (the shell dials again with the next).

Sans-IO: a HandshakePhase for channel.Channel, like XXHandshake and PairingHandshake. The
Noise work is noisexx.XXState in psk mode (XXpsk0 written out; the same bytes as the generic
HandshakeState's XXpsk0, tests/protocol/test_noisexx_psk0.py): this is the handshake every
pair of daemons runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .channel import HandshakeResult, UnauthorizedPeer, handshake_result
from .constants import PROLOGUE
from .crypto import DHKeyPair, PublicKey, RandomSource
from .errors import LocalProtocolError, RemoteProtocolError
from .noisexx import XXState

MEMBER_PATTERN = "XXpsk0"  # what XXState(psk=...) runs


class NotACircleMember(RemoteProtocolError):
    """Message 1 opens under no PSK this device accepts: a stranger (or a very stale device)."""

    reason = "not-a-circle-member"


class MemberHandshake:
    """Noise_XXpsk0 with prologue meshd/1; empty payloads; authorize as XXHandshake does.

    initiator: psks is [the one PSK to offer]. responder: the PSKs it accepts, best first.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static: DHKeyPair,
        rng: RandomSource,
        authorize: Callable[[PublicKey], bool],
        psks: Sequence[bytes],
        prologue: bytes = PROLOGUE,
    ) -> None:
        if not psks or (initiator and len(psks) != 1):
            raise LocalProtocolError("an initiator offers one PSK; a responder accepts at least one")
        self._initiator = initiator
        self._static = static
        self._rng = rng
        self._authorize = authorize
        self._psks = list(psks)
        self._prologue = prologue
        self._state: XXState | None = self._new_state(self._psks[0]) if initiator else None
        self.psk_index: int | None = 0 if initiator else None  # which PSK opened message 1

    def _new_state(self, psk: bytes) -> XXState:
        return XXState(initiator=self._initiator, prologue=self._prologue, rng=self._rng,
                       s=self._static, psk=psk)

    def initial_frames(self) -> list[bytes]:
        return [self._state.write_message(b"")] if self._state is not None and self._initiator else []

    def on_frame(self, frame: bytes) -> list[bytes]:
        if self._state is None:
            self._state = self._first_message(frame)
        else:
            self._state.read_message(frame)  # later versions' payloads are ignored
        state = self._state
        if state.rs is not None and not self._authorize(state.rs):
            raise UnauthorizedPeer(f"{state.rs!r} is not authorised here")
        if not state.complete and state.is_my_turn:
            return [state.write_message(b"")]
        return []

    def _first_message(self, frame: bytes) -> XXState:
        """The responder's state whose PSK opens message 1 (a fresh one per candidate)."""
        for index, psk in enumerate(self._psks):
            state = self._new_state(psk)
            try:
                state.read_message(frame)
            except RemoteProtocolError:
                continue
            self.psk_index = index
            return state
        raise NotACircleMember("message 1 opens under no epoch of this circle")

    @property
    def done(self) -> bool:
        return self._state is not None and self._state.complete

    def result(self) -> HandshakeResult:
        if self._state is None:
            raise LocalProtocolError("handshake is not complete")
        return handshake_result(self._state)
