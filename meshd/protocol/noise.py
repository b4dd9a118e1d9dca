"""The Noise Protocol Framework, revision 34, for 25519 / ChaChaPoly / BLAKE2b.

This file reads like the spec: CipherState (section 5.1), SymmetricState (5.2) and
HandshakeState (5.3), with the spec's own method names. Handshake patterns are data, in
noisepatterns.py. Everything that changes handshake state lives in this file.

Rules we add to the spec's, each because a shipped implementation got it wrong:
- A failed decryption raises before the nonce moves (snow RUSTSEC-2024-0011) and leaves the
  HandshakeState dead: every later call raises.
- Nonce 2**64-1 is never used to encrypt or decrypt (the spec reserves it for Rekey).
- No message may exceed 65535 bytes, in either direction.

Randomness is injected: the ephemeral key comes from the rng passed in, so the published
test vectors run without patching anything.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from .constants import MAX_NOISE_MESSAGE_BYTES, MAX_NONCE, TAG_BYTES
from .crypto import (
    DH_LEN,
    HASH_LEN,
    KEY_LEN,
    ChaChaPolyKey,
    DHKeyPair,
    PublicKey,
    RandomSource,
    blake2b,
    dh,
    hkdf,
    new_blake2b,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .noisepatterns import HandshakePattern, parse_pattern, protocol_name_for

PSK_LEN = 32
_ZEROS_32 = bytes(32)


# ---- 5.1 CipherState -----------------------------------------------------------------


class CipherState:
    """A key and a nonce. Without a key, encryption is the identity (as the spec says).

    The AEAD object is built on first use: a handshake keys its cipher five times per side
    and uses some of those keys never.
    """

    __slots__ = ("_key", "_aead_object", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._key: bytes | None = None
        self._aead_object: ChaChaPolyKey | None = None
        self.n = 0
        if key is not None:
            self.initialize_key(key)

    def initialize_key(self, key: bytes) -> None:
        self._key = key
        self._aead_object = None
        self.n = 0

    @property
    def _aead(self) -> ChaChaPolyKey | None:
        # Transport messages read _aead_object directly and come here only the first time.
        if self._aead_object is None and self._key is not None:
            self._aead_object = ChaChaPolyKey(self._key)
        return self._aead_object

    def has_key(self) -> bool:
        return self._key is not None

    def set_nonce(self, nonce: int) -> None:
        self.n = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        aead = self._aead_object or self._aead
        if aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise LocalProtocolError("nonce space exhausted; the session must end")
        ciphertext = aead.encrypt(self.n, ad, plaintext)
        self.n += 1
        return ciphertext

    def encrypt_into(self, ad: bytes, plaintext: bytes, out: memoryview | bytearray) -> None:
        """encrypt_with_ad into a caller's buffer; a keyless state cannot do this."""
        aead = self._aead_object or self._aead
        if aead is None:
            raise LocalProtocolError("encrypt_into needs a key")
        if self.n >= MAX_NONCE:
            raise LocalProtocolError("nonce space exhausted; the session must end")
        aead.encrypt_into(self.n, ad, plaintext, out)
        self.n += 1

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Raises RemoteProtocolError on a bad MAC; the nonce advances only on success."""
        aead = self._aead_object or self._aead
        if aead is None:
            return bytes(ciphertext)  # before a key: the handshake's cleartext payloads
        if self.n >= MAX_NONCE:
            raise RemoteProtocolError("peer exhausted the nonce space")
        plaintext = aead.decrypt(self.n, ad, ciphertext)
        self.n += 1
        return plaintext

    def rekey(self) -> None:
        """Section 11.3: k = ENCRYPT(k, maxnonce, zerolen, zeros)[:32]; n is unchanged."""
        aead = self._aead
        if aead is None:
            raise LocalProtocolError("rekey without a key")
        self.initialize_key_keeping_nonce(aead.encrypt(MAX_NONCE, b"", _ZEROS_32)[:KEY_LEN])

    def initialize_key_keeping_nonce(self, key: bytes) -> None:
        self._key = key
        self._aead_object = None


@functools.lru_cache(maxsize=64)
def _initial_ck_and_h(protocol_name: bytes, prologue: bytes | None) -> tuple[bytes, bytes]:
    """ck and h after InitializeSymmetric and MixHash(prologue): the same for every handshake
    of a protocol and prologue, so computed once."""
    h = protocol_name.ljust(HASH_LEN, b"\0") if len(protocol_name) <= HASH_LEN else blake2b(protocol_name)
    ck = h
    if prologue is not None:
        h = blake2b(h + prologue)
    return ck, h


# ---- 5.2 SymmetricState --------------------------------------------------------------


class SymmetricState:
    """The chaining key, the handshake hash, and the CipherState they key."""

    __slots__ = ("cipher", "ck", "h")

    def __init__(self, protocol_name: bytes, prologue: bytes | None = None) -> None:
        """InitializeSymmetric(protocol_name), then MixHash(prologue) when one is given."""
        self.ck, self.h = _initial_ck_and_h(protocol_name, prologue)
        self.cipher = CipherState()

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, input_key_material, 2)
        self.cipher.initialize_key(temp_k[:KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = new_blake2b(self.h + data).digest()

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self.ck, temp_h, temp_k = hkdf(self.ck, input_key_material, 3)
        self.h = new_blake2b(self.h + temp_h).digest()
        self.cipher.initialize_key(temp_k[:KEY_LEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.h = new_blake2b(self.h + ciphertext).digest()
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.h = new_blake2b(self.h + ciphertext).digest()
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_k1, temp_k2 = hkdf(self.ck, b"", 2)
        return CipherState(temp_k1[:KEY_LEN]), CipherState(temp_k2[:KEY_LEN])


# ---- 5.3 HandshakeState --------------------------------------------------------------

# Whose move it is; `_turn` holds one of these (plain ints: compared on every message).
_WRITE, _READ, _DONE, _DEAD = 0, 1, 2, 3


class HandshakeState:
    """One side of a handshake. Call write_message/read_message in pattern order.

    After the last message, `complete` is True and split() has produced `send_cipher` and
    `receive_cipher`; `handshake_hash` is the channel binding value. Any error leaves the
    state dead (every later call raises LocalProtocolError).

    Whose move it is lives in one field (`_turn`), checked once per message, and `complete`
    is a plain attribute: the Python around the X25519 work is what bench/channel.py's
    handshake figure compares against the noiseprotocol package.
    """

    __slots__ = (
        "pattern", "initiator", "_rng", "s", "e", "rs", "re", "_psks", "_psk_mode",
        "_message_index", "_turn", "complete", "send_cipher", "receive_cipher",
        "handshake_hash", "_symmetric",
    )

    def __init__(
        self,
        pattern: HandshakePattern | str,
        *,
        initiator: bool,
        prologue: bytes,
        rng: RandomSource,
        s: DHKeyPair | None = None,
        rs: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        self.pattern = parse_pattern(pattern) if isinstance(pattern, str) else pattern
        self.initiator = initiator
        self._rng = rng
        self.s = s
        self.e: DHKeyPair | None = None
        self.rs: PublicKey | None = PublicKey(rs) if rs is not None else None
        self.re: PublicKey | None = None
        for psk in psks:
            if len(psk) != PSK_LEN:
                raise LocalProtocolError("a PSK must be 32 bytes")
        self._psks = list(psks)
        self._psk_mode = self.pattern.has_psk
        self._message_index = 0
        self._turn = _WRITE if initiator else _READ
        self.complete = False
        self.send_cipher: CipherState | None = None
        self.receive_cipher: CipherState | None = None
        self.handshake_hash = b""

        self._symmetric = SymmetricState(protocol_name_for(self.pattern), prologue)
        if self.pattern.initiator_pre or self.pattern.responder_pre:
            for owner_is_initiator, tokens in (
                (True, self.pattern.initiator_pre),
                (False, self.pattern.responder_pre),
            ):
                for token in tokens:
                    self._symmetric.mix_hash(self._pre_message_key(token, owner_is_initiator))

    def _pre_message_key(self, token: str, owner_is_initiator: bool) -> bytes:
        mine = owner_is_initiator == self.initiator
        if token == "s":
            key: bytes | None = self.s.public if (mine and self.s) else (None if mine else self.rs)
        else:
            raise LocalProtocolError(f"pre-message token {token!r} is not supported")
        if key is None:
            raise LocalProtocolError("a pre-message key is missing")
        return key

    @property
    def is_my_turn(self) -> bool:
        return (self._message_index % 2 == 0) == self.initiator

    def _turn_error(self) -> LocalProtocolError:
        if self._turn == _DEAD:
            return LocalProtocolError("handshake already failed")
        if self.complete:
            return LocalProtocolError("handshake already complete")
        return LocalProtocolError("not this side's turn in the handshake")

    def _dh_for(self, token: str) -> bytes:
        if token == "ee":
            local, remote = self.e, self.re
        elif token == "ss":
            local, remote = self.s, self.rs
        elif token == "es":
            local, remote = (self.e, self.rs) if self.initiator else (self.s, self.re)
        else:  # "se"
            local, remote = (self.s, self.re) if self.initiator else (self.e, self.rs)
        if local is None or remote is None:
            raise LocalProtocolError(f"token {token!r} needs a key this side does not have")
        return dh(local.private, remote)

    def set_psk(self, psk: bytes) -> None:
        """Supply a PSK that is only known mid-handshake (pairing derives it from a PAKE
        carried in the first two messages, before the psk token of XXpsk3's third)."""
        if len(psk) != PSK_LEN:
            raise LocalProtocolError("a PSK must be 32 bytes")
        self._psks.append(psk)

    def _next_psk(self) -> bytes:
        if not self._psks:
            raise LocalProtocolError("pattern needs a PSK that was not supplied")
        return self._psks.pop(0)

    def write_message(self, payload: bytes) -> bytes:
        if self._turn != _WRITE:
            raise self._turn_error()
        try:
            out = self._write_tokens(payload)
            if len(out) > MAX_NOISE_MESSAGE_BYTES:
                raise LocalProtocolError("handshake message would exceed 65535 bytes")
        except BaseException:
            self._turn = _DEAD
            raise
        self._advance(_READ)
        return out

    def _write_tokens(self, payload: bytes) -> bytes:
        sym = self._symmetric
        parts: list[bytes] = []
        for token in self.pattern.messages[self._message_index]:
            if token == "e":
                if self.e is None:
                    self.e = DHKeyPair.generate(self._rng)
                parts.append(self.e.public)
                sym.mix_hash(self.e.public)
                if self._psk_mode:
                    sym.mix_key(self.e.public)
            elif token == "s":
                if self.s is None:
                    raise LocalProtocolError("pattern sends a static key this side does not have")
                parts.append(sym.encrypt_and_hash(self.s.public))
            elif token == "psk":
                sym.mix_key_and_hash(self._next_psk())
            else:
                sym.mix_key(self._dh_for(token))
        parts.append(sym.encrypt_and_hash(payload))
        return b"".join(parts)

    def read_message(self, message: bytes) -> bytes:
        """Raises RemoteProtocolError for a short, oversized or unauthentic message."""
        if self._turn != _READ:
            raise self._turn_error()
        try:
            if len(message) > MAX_NOISE_MESSAGE_BYTES:
                raise RemoteProtocolError("handshake message exceeds 65535 bytes")
            payload = self._read_tokens(message)
        except BaseException:
            self._turn = _DEAD
            raise
        self._advance(_WRITE)
        return payload

    def _read_tokens(self, message: bytes) -> bytes:
        sym = self._symmetric
        offset = 0
        for token in self.pattern.messages[self._message_index]:
            if token == "e":
                if len(message) - offset < DH_LEN:
                    raise RemoteProtocolError("handshake message too short for an ephemeral key")
                self.re = PublicKey(message[offset : offset + DH_LEN])
                offset += DH_LEN
                sym.mix_hash(self.re)
                if self._psk_mode:
                    sym.mix_key(self.re)
            elif token == "s":
                length = DH_LEN + (TAG_BYTES if sym.cipher.has_key() else 0)
                if len(message) - offset < length:
                    raise RemoteProtocolError("handshake message too short for a static key")
                self.rs = PublicKey(sym.decrypt_and_hash(message[offset : offset + length]))
                offset += length
            elif token == "psk":
                sym.mix_key_and_hash(self._next_psk())
            else:
                sym.mix_key(self._dh_for(token))
        rest = message[offset:] if offset else message
        if len(rest) < TAG_BYTES and sym.cipher.has_key():
            raise RemoteProtocolError("handshake message too short for its payload tag")
        return sym.decrypt_and_hash(rest)

    def _advance(self, next_turn: int) -> None:
        self._message_index += 1
        if self._message_index < len(self.pattern.messages):
            self._turn = next_turn
            return
        self._turn = _DONE
        self.complete = True
        first, second = self._symmetric.split()
        self.send_cipher, self.receive_cipher = (first, second) if self.initiator else (second, first)
        self.handshake_hash = self._symmetric.h
