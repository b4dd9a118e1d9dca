"""The thin wrapper over libsodium (PyNaCl), OpenSSL's AEAD and hashlib.

Nothing else in meshd imports nacl or cryptography: every primitive meshd composes is named
here once, with its failure turned into our error vocabulary. No randomness is drawn here;
callers pass the random bytes in (the shell's rng is os.urandom, tests pass a seeded one).

Choices made by measurement on the target machine (see bench/channel.py):
- ChaCha20-Poly1305 (IETF, 96-bit nonce) comes from the cryptography package (OpenSSL):
  1.9x libsodium's speed at 64 KiB and 5.5x at 64 bytes.
- BLAKE2b comes from hashlib: 15x faster than libsodium's generichash through PyNaCl at
  64 bytes. HMAC-BLAKE2b (inside hkdf) is composed by hand from it (RFC 2104, 128-byte
  block), because the hmac module's generic path costs more than the two hashes themselves.
- X25519, Ed25519, sealed boxes, XChaCha20-Poly1305 and the Ed25519 group operations come
  from libsodium. For X25519 OpenSSL was measured too (issue 16): faster per DH in a tight
  loop (37 us against 58), but a key pair costs it 43 us against libsodium's 21 (its key
  object computes the public key without libsodium's precomputed base table), and whole
  handshakes ran at 0.69-0.93x of libsodium's speed in alternating blocks; with OpenSSL only
  for the static key's DH, 0.99-1.08x. So libsodium stays.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _sodium
from nacl import exceptions as _nacl_exc
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from .errors import LocalProtocolError, RemoteProtocolError

RandomSource = Callable[[int], bytes]
"""A source of random bytes: rng(n) returns n bytes. The shell passes os.urandom."""

DH_LEN = 32
KEY_LEN = 32
HASH_LEN = 64
SIGNATURE_LEN = 64
XAEAD_NONCE_LEN = 24
_HMAC_BLOCK = 128
_TAG_LEN = 16
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


# ---- Keys -----------------------------------------------------------------------------


def short_key(raw: bytes) -> str:
    """An abbreviated, log-safe rendering of a public key: 'AbCd…WxYz'."""
    text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return f"{text[:4]}…{text[-4:]}"


class PublicKey(bytes):
    """A 32-byte public key. Prints abbreviated, as wireguard-go's peer(AbCd…WxYz)."""

    def __new__(cls, raw: bytes) -> PublicKey:
        if len(raw) != DH_LEN:
            raise LocalProtocolError(f"public key must be {DH_LEN} bytes, got {len(raw)}")
        return super().__new__(cls, raw)

    def __repr__(self) -> str:
        return f"peer({short_key(self)})"

    __str__ = __repr__


class PrivateKey:
    """32 secret bytes. Never printed; compared in constant time."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise LocalProtocolError(f"private key must be {KEY_LEN} bytes")
        self._raw = bytes(raw)

    def __bytes__(self) -> bytes:
        return self._raw

    def __repr__(self) -> str:
        return "PrivateKey(<secret>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivateKey) and hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return id(self)


class DHKeyPair:
    """An X25519 key pair (a Noise static or ephemeral key)."""

    __slots__ = ("private", "public")

    def __init__(self, private: PrivateKey, public: PublicKey) -> None:
        self.private = private
        self.public = public

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> DHKeyPair:
        if len(raw) != KEY_LEN:
            raise LocalProtocolError(f"private key must be {KEY_LEN} bytes")
        out = _ffi.new("unsigned char[]", DH_LEN)
        _lib.crypto_scalarmult_base(out, raw)
        return cls(PrivateKey(raw), PublicKey(_ffi.buffer(out, DH_LEN)[:]))

    @classmethod
    def generate(cls, rng: RandomSource) -> DHKeyPair:
        return cls.from_private_bytes(rng(KEY_LEN))

    def dh(self, public: bytes) -> bytes:
        """X25519 of this private key and public (see dh())."""
        return dh(self.private, public)

    def __repr__(self) -> str:
        return f"DHKeyPair({self.public!r})"


def dh(private: PrivateKey, public: bytes) -> bytes:
    """X25519. Raises RemoteProtocolError for a low-order public key (all-zero output).

    Calls libsodium through PyNaCl's cffi module directly: the handshake does six of
    these, and the binding's argument checks cost ~3 us each.
    """
    if len(public) != DH_LEN:
        raise RemoteProtocolError("malformed X25519 public key")
    out = _ffi.new("unsigned char[]", DH_LEN)
    if _lib.crypto_scalarmult(out, private._raw, public) != 0:  # noqa: SLF001
        raise RemoteProtocolError("X25519 with a low-order point")
    return bytes(_ffi.buffer(out, DH_LEN))


class SigningKeyPair:
    """An Ed25519 key pair (a device's identity)."""

    __slots__ = ("_secret", "public", "seed")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_LEN:
            raise LocalProtocolError("Ed25519 seed must be 32 bytes")
        public, secret = _sodium.crypto_sign_seed_keypair(seed)
        self.seed = PrivateKey(seed)
        self.public = PublicKey(public)
        self._secret = secret

    def sign(self, message: bytes) -> bytes:
        return _sodium.crypto_sign(message, self._secret)[:SIGNATURE_LEN]

    def __repr__(self) -> str:
        return f"SigningKeyPair({self.public!r})"


def signature_is_valid(public: bytes, message: bytes, signature: bytes) -> bool:
    """True when signature is a valid Ed25519 signature of message by public."""
    if len(signature) != SIGNATURE_LEN or len(public) != KEY_LEN:
        return False
    try:
        _sodium.crypto_sign_open(signature + message, public)
    except (_nacl_exc.BadSignatureError, _nacl_exc.ValueError, _nacl_exc.TypeError):
        return False
    return True


def ed25519_public_to_x25519(public: bytes) -> bytes:
    """The X25519 form of an Ed25519 public key (for sealing to a signing key)."""
    try:
        return _sodium.crypto_sign_ed25519_pk_to_curve25519(public)
    except (_nacl_exc.RuntimeError, _nacl_exc.ValueError, _nacl_exc.TypeError) as err:
        raise RemoteProtocolError("invalid Ed25519 public key") from err


# ---- Hashing and key derivation -------------------------------------------------------


def blake2b(data: bytes) -> bytes:
    """BLAKE2b-512, the Noise HASH."""
    return hashlib.blake2b(data).digest()


new_blake2b = hashlib.blake2b
"""BLAKE2b-512's hash object, for hot paths: new_blake2b(data).digest() is blake2b(data)
without a Python call around it (the handshake hashes fourteen times)."""


def blake2b_256(data: bytes) -> bytes:
    """BLAKE2b with a 32-byte digest: content hashes (records, entries, bodies)."""
    return hashlib.blake2b(data, digest_size=32).digest()


def hkdf(chaining_key: bytes, input_key_material: bytes, outputs: int) -> tuple[bytes, ...]:
    """Noise's HKDF (section 4.3) with HMAC-BLAKE2b: two or three 64-byte outputs.

    Written out flat (the handshake runs eight of these): temp_key's padded inner and outer
    hash states are computed once and copied for each output, which halves the hashing of
    the later HMACs.
    """
    if len(chaining_key) > _HMAC_BLOCK:
        chaining_key = blake2b(chaining_key)
    key = chaining_key.ljust(_HMAC_BLOCK, b"\0")
    new = hashlib.blake2b
    temp_key = new(
        key.translate(_OPAD) + new(key.translate(_IPAD) + input_key_material).digest()
    ).digest().ljust(_HMAC_BLOCK, b"\0")
    inner = new(temp_key.translate(_IPAD))
    outer = new(temp_key.translate(_OPAD))
    step = inner.copy()
    step.update(b"\x01")
    out = outer.copy()
    out.update(step.digest())
    output1 = out.digest()
    step = inner.copy()
    step.update(output1 + b"\x02")
    out = outer.copy()
    out.update(step.digest())
    output2 = out.digest()
    if outputs == 2:
        return output1, output2
    inner.update(output2 + b"\x03")
    outer.update(inner.digest())
    return output1, output2, outer.digest()


def derive_key(key: bytes, label: bytes, context: bytes = b"", size: int = KEY_LEN) -> bytes:
    """A subkey for one purpose: keyed BLAKE2b with the label as its personalisation.

    Distinct labels give independent keys from the same parent key (domain separation).
    """
    if len(label) > 16:
        raise LocalProtocolError("derivation label longer than 16 bytes")
    return hashlib.blake2b(context, key=key, person=label, digest_size=size).digest()


# ---- AEAD -----------------------------------------------------------------------------


# The 96-bit IETF nonce from Noise's 64-bit counter: 4 zero bytes, then little-endian.
_pack_nonce = struct.Struct("<4xQ").pack


# Messages up to this many bytes are sealed and opened by libsodium's one-shot call, into a
# buffer the key keeps: 0.93 us per 100-byte message against 1.6 us through OpenSSL, whose
# binding sets up a cipher context per call (issue 16); from about 1 KB OpenSSL is as fast,
# and past it faster (AVX-512). The same AEAD: the bytes on the wire are the same.
SODIUM_MAX_BYTES = 1024
_sodium_seal = _lib.crypto_aead_chacha20poly1305_ietf_encrypt
_sodium_open = _lib.crypto_aead_chacha20poly1305_ietf_decrypt
_from_buffer, _NULL = _ffi.from_buffer, _ffi.NULL


class ChaChaPolyKey:
    """ChaCha20-Poly1305 (IETF) under one key, nonce = 4 zero bytes || 64-bit LE counter.

    Plaintexts and ciphertexts may be any bytes-like object (memoryview slices of a receive
    buffer decrypt without a copy). One thread at a time per key (the small-message buffer).
    """

    __slots__ = ("_aead", "_key", "_out", "_out_bytes")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)  # checks the key's length, for both paths
        self._key = bytes(key)
        self._out: Any = None  # the small-message buffer (cffi), made on first use
        self._out_bytes: Any = None  # a buffer-protocol view of it, sliced into bytes

    def _small_buffer(self) -> Any:
        self._out = _ffi.new("unsigned char[]", SODIUM_MAX_BYTES + _TAG_LEN)
        self._out_bytes = _ffi.buffer(self._out)
        return self._out

    def encrypt(self, nonce: int, ad: bytes, plaintext: bytes | bytearray | memoryview) -> bytes:
        size = len(plaintext)
        if size > SODIUM_MAX_BYTES:
            return self._aead.encrypt(_pack_nonce(nonce), plaintext, ad)
        out = self._out or self._small_buffer()
        _sodium_seal(out, _NULL, plaintext if type(plaintext) is bytes else _from_buffer(plaintext),
                     size, ad, len(ad), _NULL, _pack_nonce(nonce), self._key)
        return self._out_bytes[: size + _TAG_LEN]  # type: ignore[no-any-return]  # bytes

    def encrypt_into(
        self, nonce: int, ad: bytes, plaintext: bytes | memoryview, out: memoryview | bytearray
    ) -> None:
        """Encrypt into a caller's buffer of len(plaintext) + 16 bytes (saves a copy)."""
        self._aead.encrypt_into(_pack_nonce(nonce), plaintext, ad, out)

    def decrypt(self, nonce: int, ad: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Raises RemoteProtocolError('bad MAC') when the ciphertext does not authenticate."""
        size = len(ciphertext) - _TAG_LEN
        if size < 0:
            raise RemoteProtocolError("bad MAC")
        if size <= SODIUM_MAX_BYTES:
            out = self._out or self._small_buffer()
            if _sodium_open(out, _NULL, _NULL,
                            ciphertext if type(ciphertext) is bytes else _from_buffer(ciphertext),
                            size + _TAG_LEN, ad, len(ad), _pack_nonce(nonce), self._key) != 0:
                raise RemoteProtocolError("bad MAC")
            return self._out_bytes[:size]  # type: ignore[no-any-return]  # bytes
        try:
            return self._aead.decrypt(_pack_nonce(nonce), ciphertext, ad)
        except InvalidTag as err:
            raise RemoteProtocolError("bad MAC") from err

    def __repr__(self) -> str:
        return "ChaChaPolyKey(<secret>)"


def seal_once(key: bytes, nonce: int, ad: bytes, plaintext: bytes | bytearray | memoryview) -> bytes:
    """ChaChaPolyKey(key).encrypt(nonce, ad, plaintext) for a key used once or twice (the
    handshake's): libsodium's one-shot call takes the key with the message, 0.9 us against
    0.9 (key object) + 1.25 us through OpenSSL. Transport keys stay on ChaChaPolyKey."""
    if not isinstance(plaintext, bytes):  # cffi takes bytes, not other buffers, as char *
        plaintext = bytes(plaintext)
    out = _ffi.new("unsigned char[]", len(plaintext) + _TAG_LEN)
    _lib.crypto_aead_chacha20poly1305_ietf_encrypt(
        out, _ffi.NULL, plaintext, len(plaintext), ad, len(ad), _ffi.NULL, _pack_nonce(nonce), key)
    return bytes(_ffi.buffer(out))


def open_once(key: bytes, nonce: int, ad: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
    """seal_once's inverse. Raises RemoteProtocolError('bad MAC') when it does not authenticate."""
    if len(ciphertext) < _TAG_LEN:
        raise RemoteProtocolError("bad MAC")
    if not isinstance(ciphertext, bytes):  # cffi takes bytes, not other buffers, as char *
        ciphertext = bytes(ciphertext)
    out = _ffi.new("unsigned char[]", len(ciphertext) - _TAG_LEN + 1)  # +1: never a 0-byte array
    if _lib.crypto_aead_chacha20poly1305_ietf_decrypt(
        out, _ffi.NULL, _ffi.NULL, ciphertext, len(ciphertext), ad, len(ad), _pack_nonce(nonce), key
    ) != 0:
        raise RemoteProtocolError("bad MAC")
    return bytes(_ffi.buffer(out, len(ciphertext) - _TAG_LEN))


def xaead_encrypt(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    """XChaCha20-Poly1305 (192-bit random nonces: envelopes and backups)."""
    return _sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def xaead_decrypt(key: bytes, nonce: bytes, ad: bytes, ciphertext: bytes) -> bytes:
    """Raises RemoteProtocolError('bad MAC') when the ciphertext does not authenticate."""
    try:
        return _sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except (_nacl_exc.CryptoError, _nacl_exc.ValueError, _nacl_exc.TypeError) as err:
        raise RemoteProtocolError("bad MAC") from err


# ---- Sealed boxes ---------------------------------------------------------------------


def seal(recipient: bytes, plaintext: bytes) -> bytes:
    """libsodium sealed box to an X25519 public key.

    libsodium draws the box's ephemeral key itself; this is the one place randomness is not
    injected, because the sealed-box construction offers no way to pass it.
    """
    return _sodium.crypto_box_seal(plaintext, recipient)


def unseal(keypair: DHKeyPair, ciphertext: bytes) -> bytes:
    """Open a sealed box. Raises RemoteProtocolError when it was not sealed to this key."""
    try:
        return _sodium.crypto_box_seal_open(ciphertext, keypair.public, bytes(keypair.private))
    except (_nacl_exc.CryptoError, _nacl_exc.ValueError, _nacl_exc.TypeError) as err:
        raise RemoteProtocolError("sealed box does not open with this key") from err


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
