"""Noise_XX and Noise_XXpsk0 (25519, ChaChaPoly, BLAKE2b) written out: meshd's relay handshake
(handshake.py) and its device handshake (memberhandshake.py) without the generic token loop.

The same handshakes as noise.HandshakeState with pattern XX or XXpsk0 (the published XX
vector and a message-by-message comparison with HandshakeState in every role combination are
in tests/protocol/test_noisexx.py and test_noisexx_psk0.py), with each side's three steps
written as straight-line code over the same primitives:

    -> e                    XXpsk0: -> psk, e
    <- e, ee, s, es
    -> s, se

In psk mode (section 9) every "e" is also MixKey(e.public), so message 1's payload is
encrypted (under the key from the PSK and the ephemeral) and message 2's "e" rekeys before ee.

The generic state machine spends about as much Python on dispatch (token loops, method
layers of SymmetricState and CipherState) as on the hashing and encryption themselves
(issue 16: a handshake's Python beside its X25519 work is what bench/channel.py compares with
the noiseprotocol package). Here ck, h and k are three fields, and each of the handshake's
few encryptions is one libsodium call with a constant nonce (crypto.seal_once: no cipher
object per key; a handshake key is used once or twice).

The rules of noise.py hold: any error leaves the state dead (every later call raises
LocalProtocolError); no message exceeds 65535 bytes; the ephemeral key is drawn from the rng
passed in, once per handshake.
"""

from __future__ import annotations

from .constants import MAX_NOISE_MESSAGE_BYTES, TAG_BYTES
from .crypto import (
    DH_LEN,
    KEY_LEN,
    DHKeyPair,
    PublicKey,
    RandomSource,
    dh,
    hkdf,
    new_blake2b,
    open_once,
    seal_once,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .noise import CipherState, _initial_ck_and_h

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_BLAKE2b"
PSK0_PROTOCOL_NAME = b"Noise_XXpsk0_25519_ChaChaPoly_BLAKE2b"
PSK_LEN = 32
_STATIC_BYTES = DH_LEN + TAG_BYTES  # an encrypted static key
_DEAD = -1
_STEPS = 3


class XXState:
    """One side of Noise_XX_25519_ChaChaPoly_BLAKE2b: HandshakeState's interface for XX; with
    a psk, one side of Noise_XXpsk0 (HandshakeState's XXpsk0 with psks=[psk]).

    write_message / read_message in pattern order; after the third message `complete` is
    True, and `send_cipher`, `receive_cipher`, `rs` and `handshake_hash` are set.
    """

    __slots__ = (
        "initiator", "_rng", "s", "e", "re", "rs", "_ck", "_h", "_k", "_step", "complete",
        "send_cipher", "receive_cipher", "handshake_hash", "_psk", "_psk_mode",
    )

    def __init__(
        self, *, initiator: bool, prologue: bytes, rng: RandomSource, s: DHKeyPair,
        psk: bytes | None = None,
    ) -> None:
        if psk is not None and len(psk) != PSK_LEN:
            raise LocalProtocolError("a PSK must be 32 bytes")
        self.initiator = initiator
        self._rng = rng
        self.s = s
        self.e: DHKeyPair | None = None
        self.re: PublicKey | None = None
        self.rs: PublicKey | None = None
        self._psk = psk  # dropped once message 1 has mixed it in
        self._psk_mode = psk is not None
        self._ck, self._h = _initial_ck_and_h(PROTOCOL_NAME if psk is None else PSK0_PROTOCOL_NAME, prologue)
        self._k: bytes | None = None  # the cipher key of the last MixKey
        self._step = 0  # messages done; _DEAD after any error
        self.complete = False
        self.send_cipher: CipherState | None = None
        self.receive_cipher: CipherState | None = None
        self.handshake_hash = b""

    @property
    def is_my_turn(self) -> bool:
        return self._step >= 0 and not self.complete and (self._step % 2 == 0) == self.initiator

    def write_message(self, payload: bytes) -> bytes:
        step = self._check_turn(writing=True)
        try:
            out = self._write_first(payload) if step == 0 else (
                self._write_second(payload) if step == 1 else self._write_third(payload))
            if len(out) > MAX_NOISE_MESSAGE_BYTES:
                raise LocalProtocolError("handshake message would exceed 65535 bytes")
        except BaseException:
            self._step = _DEAD
            raise
        self._advance(step)
        return out

    def read_message(self, message: bytes) -> bytes:
        """Raises RemoteProtocolError for a short, oversized or unauthentic message."""
        step = self._check_turn(writing=False)
        try:
            if len(message) > MAX_NOISE_MESSAGE_BYTES:
                raise RemoteProtocolError("handshake message exceeds 65535 bytes")
            payload = self._read_first(message) if step == 0 else (
                self._read_second(message) if step == 1 else self._read_third(message))
        except BaseException:
            self._step = _DEAD
            raise
        self._advance(step)
        return payload

    # -- the six steps (one per message and side) --

    def _write_first(self, payload: bytes) -> bytes:  # initiator: -> e  (XXpsk0: -> psk, e)
        if not self._psk_mode:
            self.e = e = DHKeyPair.generate(self._rng)
            h = new_blake2b(self._h + e.public).digest()
            self._h = new_blake2b(h + payload).digest()  # no key yet: the payload is plaintext
            return e.public + payload
        self._mix_psk()
        self.e = e = DHKeyPair.generate(self._rng)
        h = new_blake2b(self._h + e.public).digest()
        self._mix_key(e.public)  # psk mode: "e" is also MixKey
        sealed = seal_once(self._key(), 0, h, payload)
        self._h = new_blake2b(h + sealed).digest()
        return e.public + sealed

    def _read_first(self, message: bytes) -> bytes:  # responder: -> e  (XXpsk0: -> psk, e)
        if not self._psk_mode:
            if len(message) < DH_LEN:
                raise RemoteProtocolError("handshake message too short for an ephemeral key")
            self.re = re = PublicKey(message[:DH_LEN])
            payload = message[DH_LEN:]
            self._h = new_blake2b(new_blake2b(self._h + re).digest() + payload).digest()
            return payload
        if len(message) < DH_LEN + TAG_BYTES:
            raise RemoteProtocolError("handshake message too short for an ephemeral key and tag")
        self._mix_psk()
        self.re = re = PublicKey(message[:DH_LEN])
        h = new_blake2b(self._h + re).digest()
        self._mix_key(re)
        sealed = message[DH_LEN:]
        payload = open_once(self._key(), 0, h, sealed)  # a stranger's PSK fails here
        self._h = new_blake2b(h + sealed).digest()
        return payload

    def _write_second(self, payload: bytes) -> bytes:  # responder: <- e, ee, s, es
        assert self.re is not None
        self.e = e = DHKeyPair.generate(self._rng)
        h = new_blake2b(self._h + e.public).digest()
        if self._psk_mode:  # "e" is also MixKey; its key is replaced by ee's unused
            self._ck = hkdf(self._ck, e.public, 2)[0]
        self._mix_key(dh(e.private, self.re))  # ee
        static = seal_once(self._key(), 0, h, self.s.public)
        h = new_blake2b(h + static).digest()
        self._mix_key(dh(self.s.private, self.re))  # es
        sealed = seal_once(self._key(), 0, h, payload)
        self._h = new_blake2b(h + sealed).digest()
        return e.public + static + sealed

    def _read_second(self, message: bytes) -> bytes:  # initiator: <- e, ee, s, es
        assert self.e is not None
        if len(message) < DH_LEN + _STATIC_BYTES + TAG_BYTES:
            raise RemoteProtocolError("handshake message too short for its keys and tag")
        self.re = re = PublicKey(message[:DH_LEN])
        h = new_blake2b(self._h + re).digest()
        if self._psk_mode:  # "e" is also MixKey; its key is replaced by ee's unused
            self._ck = hkdf(self._ck, re, 2)[0]
        self._mix_key(dh(self.e.private, re))  # ee
        static = message[DH_LEN : DH_LEN + _STATIC_BYTES]
        self.rs = rs = PublicKey(open_once(self._key(), 0, h, static))
        h = new_blake2b(h + static).digest()
        self._mix_key(dh(self.e.private, rs))  # es
        sealed = message[DH_LEN + _STATIC_BYTES :]
        payload = open_once(self._key(), 0, h, sealed)
        self._h = new_blake2b(h + sealed).digest()
        return payload

    def _write_third(self, payload: bytes) -> bytes:  # initiator: -> s, se
        assert self.re is not None
        static = seal_once(self._key(), 1, self._h, self.s.public)  # es's key, nonce 1
        h = new_blake2b(self._h + static).digest()
        self._mix_key(dh(self.s.private, self.re))  # se
        sealed = seal_once(self._key(), 0, h, payload)
        self._h = new_blake2b(h + sealed).digest()
        return static + sealed

    def _read_third(self, message: bytes) -> bytes:  # responder: -> s, se
        assert self.e is not None
        if len(message) < _STATIC_BYTES + TAG_BYTES:
            raise RemoteProtocolError("handshake message too short for a static key and tag")
        static = message[:_STATIC_BYTES]
        self.rs = rs = PublicKey(open_once(self._key(), 1, self._h, static))
        h = new_blake2b(self._h + static).digest()
        self._mix_key(dh(self.e.private, rs))  # se
        sealed = message[_STATIC_BYTES:]
        payload = open_once(self._key(), 0, h, sealed)
        self._h = new_blake2b(h + sealed).digest()
        return payload

    # -- helpers --

    def _mix_psk(self) -> None:
        """The psk token: MixKeyAndHash(psk). Its cipher key is never used (the "e" right
        after it keys the cipher again), so no AEAD object is made for it."""
        assert self._psk is not None
        self._ck, temp_h, _ = hkdf(self._ck, self._psk, 3)
        self._psk = None
        self._h = new_blake2b(self._h + temp_h).digest()

    def _mix_key(self, input_key_material: bytes) -> None:
        self._ck, temp_k = hkdf(self._ck, input_key_material, 2)
        self._k = temp_k[:KEY_LEN]

    def _key(self) -> bytes:
        assert self._k is not None, "no key before the first DH"
        return self._k

    def _check_turn(self, writing: bool) -> int:
        step = self._step
        if step == _DEAD:
            raise LocalProtocolError("handshake already failed")
        if self.complete:
            raise LocalProtocolError("handshake already complete")
        if ((step % 2 == 0) == self.initiator) != writing:
            raise LocalProtocolError("not this side's turn in the handshake")
        return step

    def _advance(self, step: int) -> None:
        self._step = step + 1
        if self._step < _STEPS:
            return
        self.complete = True
        self._k = None
        temp_k1, temp_k2 = hkdf(self._ck, b"", 2)
        first, second = CipherState(temp_k1[:KEY_LEN]), CipherState(temp_k2[:KEY_LEN])
        self.send_cipher, self.receive_cipher = (first, second) if self.initiator else (second, first)
        self.handshake_hash = self._h
