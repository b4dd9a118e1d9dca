"""meshd's constructions written again from protocol/*.md, for the independent vector checker.

Nothing here imports meshd (test_no_meshd_import enforces it): only hashlib, PyNaCl,
noiseprotocol and msgpack. Each function cites the page it follows, so when a vector and
this module disagree, either the code or the page is wrong, and the page is what another
implementation reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl import bindings as sodium
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

# ---- README.md conventions -----------------------------------------------------------


def pack(value: Any) -> bytes:
    """README.md: msgpack 2.0 format (bin for bytes, str for text), smallest encodings."""
    return bytes(msgpack.packb(value, use_bin_type=True))


def unpack(data: bytes) -> Any:
    """README.md: bin as bytes, str as text, str or bin map keys."""
    return msgpack.unpackb(data, raw=False)


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


# ---- circle.md "derive_key" ----------------------------------------------------------


def derive_key(key: bytes, label: bytes, context: bytes = b"", size: int = 32) -> bytes:
    """BLAKE2b(key=key, data=context, digest_size=size, personal=label padded to 16)."""
    return hashlib.blake2b(context, key=key, digest_size=size, person=label.ljust(16, b"\0"),
                           salt=bytes(16)).digest()


def blake2b_256(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


EPOCH_LABELS = {"mailbox": b"mailbox", "backup": b"backup", "discovery": b"discovery",
                "mailbox_id_key": b"mailbox-id"}


def epoch_subkeys(epoch_key: bytes, number: int) -> dict[str, bytes]:
    """circle.md "Per-purpose subkeys": context = the epoch number as 8 bytes big-endian."""
    return {name: derive_key(epoch_key, label, u64(number)) for name, label in EPOCH_LABELS.items()}


# ---- Ed25519, X25519 -----------------------------------------------------------------


def sign(seed: bytes, message: bytes) -> bytes:
    return bytes(SigningKey(seed).sign(message).signature)


def public_of_seed(seed: bytes) -> bytes:
    return bytes(SigningKey(seed).verify_key)


def verifies(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(public).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def x25519_public(private: bytes) -> bytes:
    return bytes(sodium.crypto_scalarmult_base(private))


def x25519(private: bytes, public: bytes) -> bytes | None:
    """None when the result is all zeros (a low-order point: libsodium refuses it)."""
    try:
        out = bytes(sodium.crypto_scalarmult(private, public))
    except Exception:  # noqa: BLE001 - PyNaCl's error type for libsodium's -1 varies
        return None
    return None if out == bytes(32) else out


def xchacha_encrypt(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    """relay.md: libsodium's IETF XChaCha20-Poly1305, combined mode (tag appended)."""
    return bytes(sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key))


def xchacha_decrypt(key: bytes, nonce: bytes, ad: bytes, ciphertext: bytes) -> bytes | None:
    try:
        return bytes(sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key))
    except (CryptoError, ValueError, TypeError):
        return None


def sealed_box_open(box: bytes, public: bytes, private: bytes) -> bytes | None:
    try:
        return bytes(sodium.crypto_box_seal_open(box, public, private))
    except (CryptoError, ValueError, TypeError):
        return None


# ---- relay.md "Envelope", "Backup blob" ----------------------------------------------

ENVELOPE_AD = b"meshd/envelope/1\x00"
ENVELOPE_SIGNATURE = b"meshd/envelope-signature/1\x00"
BACKUP_AD = b"meshd/backup/1\x00"
BACKUP_SIGNATURE = b"meshd/backup-signature/1\x00"
HEADER = 1 + 4 + 24


def mailbox_id(mailbox_id_key: bytes, sign_key: bytes) -> bytes:
    return derive_key(mailbox_id_key, b"meshd-mailbox-id", sign_key)


def seal(key: bytes, epoch: int, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    return b"\x01" + u32(epoch) + nonce + xchacha_encrypt(key, nonce, ad, plaintext)


@dataclass
class Opened:
    reason: str  # "ok" or the EnvelopeRejected reason
    signer: bytes = b""
    number: int = 0  # seq or version
    payload: Any = None
    epoch: int = 0


def open_sealed(
    data: bytes, *, keys: Mapping[int, bytes], ad_prefix: bytes, signature_context: bytes,
    scope: bytes, allowed: Sequence[bytes],
) -> Opened:
    """relay.md's checks, in the order the page gives them. `scope` is the mailbox id
    (envelopes) or the circle id (backups); `keys` maps an epoch to its subkey."""
    if len(data) < HEADER + 16 or data[0] != 1:
        return Opened("malformed")
    epoch = int.from_bytes(data[1:5], "big")
    if epoch not in keys:
        return Opened("unknown-epoch")
    plaintext = xchacha_decrypt(keys[epoch], data[5:HEADER], ad_prefix + scope + u32(epoch),
                                data[HEADER:])
    if plaintext is None:
        return Opened("bad-mac")
    try:
        fields = unpack(plaintext)
    except Exception:  # noqa: BLE001 - any decoding failure is malformed
        return Opened("malformed")
    if not (isinstance(fields, list) and len(fields) == 4
            and isinstance(fields[0], bytes) and len(fields[0]) == 32
            and type(fields[1]) is int and isinstance(fields[2], bytes)
            and isinstance(fields[3], bytes) and len(fields[3]) == 64):
        return Opened("malformed")
    signer, number, body, signature = fields
    if signature_context == ENVELOPE_SIGNATURE and not 1 <= number <= 2**63 - 1:
        return Opened("malformed")
    if signer not in allowed:
        return Opened("unknown-sender")
    if not verifies(signer, signature_context + pack([scope, epoch, number, body]), signature):
        return Opened("bad-signature")
    payload = unpack(body)
    if not isinstance(payload, dict):
        return Opened("malformed")
    return Opened("ok", signer, number, payload, epoch)


# ---- logs.md -------------------------------------------------------------------------

LOG_HEAD = b"meshd/log-head/1\x00"


def header(author: bytes, seq: int, prev: bytes, hlc: int, stream: str, record_id: str, op: str,
           body_hash: bytes, body_len: int) -> bytes:
    """logs.md "Entry header": a 10-field array, version 1 first."""
    return pack([1, author, seq, prev, hlc, stream, record_id, op, body_hash, body_len])


def order_key(hlc: int, author: bytes, seq: int) -> bytes:
    return u64(hlc) + author + u64(seq)


def head_signed_bytes(author: bytes, seq: int, entry_hash: bytes) -> bytes:
    return LOG_HEAD + pack([author, seq, entry_hash])


def verify_batch(message: Mapping[str, Any], allowed: Sequence[bytes], tip: int = 0,
                 tip_hash: bytes = bytes(32)) -> str:
    """logs.md "Verification of a batch", in the order the page lists; "ok" or the reason."""
    author, headers, bodies, head = (message.get(k) for k in ("author", "headers", "bodies", "head"))
    if message.get("t") != "log.entries" or not isinstance(head, dict):
        return "malformed"
    if not (isinstance(author, bytes) and len(author) == 32 and isinstance(headers, list)
            and isinstance(bodies, list) and headers and len(headers) == len(bodies)):
        return "malformed"
    if author not in allowed:
        return "unknown-author"
    fields = [unpack(h) for h in headers]
    if any(not (isinstance(f, list) and len(f) == 10 and f[0] == 1) for f in fields):
        return "malformed"
    first = fields[0][2]
    if type(first) is not int or first < 1 or head["seq"] != first + len(headers) - 1:
        return "malformed"
    if first > tip + 1:
        return "gap"
    skip = tip + 1 - first
    if skip and blake2b_256(headers[skip - 1]) != tip_hash:
        return "broken-chain"
    if blake2b_256(headers[-1]) != head["hash"]:
        return "broken-chain"
    if not verifies(author, head_signed_bytes(author, head["seq"], head["hash"]), head["sig"]):
        return "bad-signature"
    prev, seq = tip_hash, tip
    for i in range(skip, len(headers)):
        _, h_author, h_seq, h_prev, _hlc, _stream, _record, _op, body_hash, body_len = fields[i]
        seq += 1
        if h_seq != seq:
            return "gap"
        if h_author != author:
            return "malformed"
        if h_prev != prev:
            return "broken-chain"
        body = bodies[i]
        if body is not None and (len(body) != body_len or blake2b_256(body) != body_hash):
            return "bad-body"
        prev = blake2b_256(headers[i])
    return "ok"


# ---- circle.md "Recovery words" ------------------------------------------------------


def words_to_entropy(words: Sequence[str], wordlist: Sequence[str]) -> bytes | None:
    """BIP39: 24 words of 11 bits, 256 bits of entropy then 8 bits of SHA-256; None if not."""
    index = {w: i for i, w in enumerate(wordlist)}
    if len(words) != 24 or any(w not in index for w in words):
        return None
    value = 0
    for word in words:
        value = value << 11 | index[word]
    entropy = (value >> 8).to_bytes(32, "big")
    return entropy if value & 0xFF == hashlib.sha256(entropy).digest()[0] else None


def entropy_to_words(entropy: bytes, wordlist: Sequence[str]) -> list[str]:
    value = int.from_bytes(entropy, "big") << 8 | hashlib.sha256(entropy).digest()[0]
    return [wordlist[value >> (11 * (23 - i)) & 0x7FF] for i in range(24)]


def recovery_keys(seed: bytes) -> tuple[bytes, bytes]:
    """(Ed25519 seed, X25519 private key) of the recovery member."""
    return (derive_key(seed, b"recovery-sign", b"meshd/recovery/1"),
            derive_key(seed, b"recovery-dh", b"meshd/recovery/1"))


# ---- pairing.md "CPace", "Short authentication string" -------------------------------

P = 2**255 - 19
A = 486662


def leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def lv_cat(*parts: bytes) -> bytes:
    return b"".join(leb128(len(p)) + p for p in parts)


def cpace_generator_string(prs: bytes, ci: bytes, sid: bytes) -> bytes:
    """draft-irtf-cfrg-cpace: lv_cat(DSI, PRS, zero padding, CI, sid), s_in_bytes 128."""
    dsi = b"CPace255"
    zpad = max(0, 128 - 1 - len(leb128(len(prs)) + prs) - len(leb128(len(dsi)) + dsi))
    return lv_cat(dsi, prs, bytes(zpad), ci, sid)


def elligator2(r: int) -> int:
    """RFC 9380 map_to_curve_elligator2 for curve25519 (Z = 2), the u coordinate."""
    r %= P
    x1 = (-A * pow(1 + 2 * r * r, P - 2, P)) % P
    gx1 = (x1**3 + A * x1 * x1 + x1) % P
    if pow(gx1, (P - 1) // 2, P) in (0, 1):
        return x1
    return (-x1 - A) % P


def cpace_generator(prs: bytes, ci: bytes, sid: bytes) -> bytes:
    digest = hashlib.sha512(cpace_generator_string(prs, ci, sid)).digest()[:32]
    u = int.from_bytes(digest, "little") & ((1 << 255) - 1)
    return elligator2(u).to_bytes(32, "little")


def cpace_isk(sid: bytes, k: bytes, ya: bytes, yb: bytes, ada: bytes = b"", adb: bytes = b"") -> bytes:
    """Initiator-responder ISK; pairing.md: ADa and ADb are empty."""
    return hashlib.sha512(lv_cat(b"CPace255_ISK", sid, k) + lv_cat(ya, ada) + lv_cat(yb, adb)).digest()


def check_words(handshake_hash: bytes, wordlist: Sequence[str]) -> list[str]:
    v = int.from_bytes(derive_key(handshake_hash, b"meshd-pair-sas", b"", 8), "big")
    return [wordlist[(v >> (11 * i)) & 0x7FF] for i in range(4)]
