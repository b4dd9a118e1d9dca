"""CPace (draft-irtf-cfrg-cpace), suite CPACE-X25519-SHA512: a balanced PAKE.

Theory of operation. Both sides turn the password (PRS), a channel identifier (CI) and a
session id (sid) into the same secret generator g: SHA-512 of a length-prefixed, zero-padded
generator string, read as a field element, mapped to the curve with Elligator2. Each side
picks a random scalar y and sends Y = X25519(y, g); each then computes K = X25519(y, Y_peer)
(aborting on a low-order result) and the intermediate session key
ISK = SHA-512(lv_cat(DSI_ISK, sid, K) || transcript). Without the password, a man in the
middle gets exactly one guess per session: the points on the wire are uniformly random and
say nothing about the password offline.

The names follow the draft (generator_string, calculate_generator, scalar_mult_vfy,
transcript_ir, ...), and tests/protocol/test_cpace.py checks every step against the draft's
published vectors (../shared/vectors/pake/cpace-x25519-sha512.json).

X25519 itself is libsodium's (crypto.dh). libsodium has no Elligator2 that returns the
Montgomery u coordinate without clearing the cofactor (crypto_core_ed25519_from_uniform
multiplies by 8, so its point is not the draft's g), hence the map below is written out with
Python integers mod 2^255-19 as RFC 9380 section 6.7.1 specifies it. Python integers are not
constant-time; the generator depends on the password, so a local attacker able to time this
process precisely could learn something about a code that is valid for one attempt and
10 minutes. We accept that (see protocol/pairing.md, "Limitations").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .crypto import DH_LEN, PrivateKey, RandomSource, dh
from .errors import RemoteProtocolError

DSI = b"CPace255"
DSI_ISK = DSI + b"_ISK"
SID_OUTPUT_LABEL = b"CPaceSidOutput"
# SHA-512's input block size: the generator string is zero-padded so that the password
# fills the first block on its own (the draft's s_in_bytes).
S_IN_BYTES = 128
FIELD_BYTES = 32
ISK_BYTES = 64

_P = 2**255 - 19
_A = 486662  # curve25519's Montgomery A
_Z = 2  # RFC 9380's Elligator2 non-square for curve25519


class CPaceAbort(RemoteProtocolError):
    """The peer's point gives a low-order shared point: CPace says abort."""

    reason = "low-order-point"


# ---- Encoding helpers (draft section "Notation") -------------------------------------


def leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def prepend_len(data: bytes) -> bytes:
    return leb128(len(data)) + data


def lv_cat(*parts: bytes) -> bytes:
    return b"".join(prepend_len(part) for part in parts)


def lexicographically_larger(bytes1: bytes, bytes2: bytes) -> bool:
    """The draft's order: first differing byte decides; on a common prefix, longer wins."""
    for a, b in zip(bytes1, bytes2, strict=False):
        if a != b:
            return a > b
    return len(bytes1) > len(bytes2)


def o_cat(bytes1: bytes, bytes2: bytes) -> bytes:
    if lexicographically_larger(bytes1, bytes2):
        return b"oc" + bytes1 + bytes2
    return b"oc" + bytes2 + bytes1


# ---- The generator -------------------------------------------------------------------


def generator_string(dsi: bytes, prs: bytes, ci: bytes, sid: bytes, s_in_bytes: int) -> bytes:
    len_zpad = max(0, s_in_bytes - 1 - len(prepend_len(prs)) - len(prepend_len(dsi)))
    return lv_cat(dsi, prs, bytes(len_zpad), ci, sid)


def decode_u_coordinate(data: bytes) -> int:
    """RFC 7748's decodeUCoordinate for 255 bits: little-endian, top bit masked."""
    return int.from_bytes(data[:FIELD_BYTES], "little") & ((1 << 255) - 1)


def _is_square(x: int) -> bool:
    return pow(x, (_P - 1) // 2, _P) in (0, 1)


def elligator2_u(r: int) -> int:
    """RFC 9380 map_to_curve_elligator2 for curve25519, u coordinate only."""
    r %= _P
    denominator = (1 + _Z * r * r) % _P
    # 1 + 2r^2 never vanishes mod p (-1/2 is not a square), but the RFC's inv0 rule is kept.
    x1 = (-_A * pow(denominator, _P - 2, _P)) % _P if denominator else 0
    if x1 == 0:
        x1 = -_A % _P
    gx1 = (x1 * x1 * x1 + _A * x1 * x1 + x1) % _P
    if _is_square(gx1):
        return x1
    return (-x1 - _A) % _P


def calculate_generator(prs: bytes, ci: bytes, sid: bytes) -> bytes:
    """The secret generator g (a 32-byte X25519 u coordinate) for this password and session."""
    gen_str = generator_string(DSI, prs, ci, sid, S_IN_BYTES)
    gen_str_hash = hashlib.sha512(gen_str).digest()[:FIELD_BYTES]
    u = elligator2_u(decode_u_coordinate(gen_str_hash))
    return u.to_bytes(FIELD_BYTES, "little")


# ---- Scalars and points --------------------------------------------------------------


def sample_scalar(rng: RandomSource) -> bytes:
    return rng(DH_LEN)


def scalar_mult(y: bytes, g: bytes) -> bytes:
    """X25519(y, g): libsodium clamps y, as the draft's decodeScalar25519 does."""
    return dh(PrivateKey(y), g)


def scalar_mult_vfy(y: bytes, point: bytes) -> bytes:
    """X25519(y, point), aborting when the result is the neutral element (all zeros)."""
    if len(point) != DH_LEN:
        raise CPaceAbort("CPace point is not 32 bytes")
    try:
        return dh(PrivateKey(y), point)
    except RemoteProtocolError as err:
        raise CPaceAbort("CPace point of low order") from err


# ---- Transcripts and keys ------------------------------------------------------------


def transcript_ir(ya: bytes, ada: bytes, yb: bytes, adb: bytes) -> bytes:
    """Initiator-responder transcript: Ya and its AD first, always."""
    return lv_cat(ya, ada) + lv_cat(yb, adb)


def transcript_oc(ya: bytes, ada: bytes, yb: bytes, adb: bytes) -> bytes:
    """Symmetric (parallel) transcript: the two messages in a canonical order."""
    return o_cat(lv_cat(ya, ada), lv_cat(yb, adb))


def intermediate_session_key(sid: bytes, k: bytes, transcript: bytes) -> bytes:
    return hashlib.sha512(lv_cat(DSI_ISK, sid, k) + transcript).digest()


def sid_output(transcript: bytes) -> bytes:
    """The session id both sides can derive when the application supplied none."""
    return hashlib.sha512(SID_OUTPUT_LABEL + transcript).digest()


# ---- The two roles (initiator-responder mode) ----------------------------------------


@dataclass
class CPaceInitiator:
    """Sends Ya first; finish(Yb) gives the ISK."""

    prs: bytes = field(repr=False)
    ci: bytes
    sid: bytes
    rng: RandomSource = field(repr=False)
    ad: bytes = b""
    message: bytes = field(init=False)
    _y: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        g = calculate_generator(self.prs, self.ci, self.sid)
        self._y = sample_scalar(self.rng)
        self.message = scalar_mult(self._y, g)

    def finish(self, yb: bytes, adb: bytes = b"") -> bytes:
        """The ISK. Raises CPaceAbort for a low-order Yb."""
        k = scalar_mult_vfy(self._y, yb)
        return intermediate_session_key(self.sid, k, transcript_ir(self.message, self.ad, yb, adb))


@dataclass
class CPaceResponder:
    """Answers a received Ya with Yb and knows the ISK at once."""

    prs: bytes = field(repr=False)
    ci: bytes
    sid: bytes
    rng: RandomSource = field(repr=False)
    ya: bytes
    ada: bytes = b""
    ad: bytes = b""
    message: bytes = field(init=False)
    isk: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        g = calculate_generator(self.prs, self.ci, self.sid)
        y = sample_scalar(self.rng)
        self.message = scalar_mult(y, g)
        k = scalar_mult_vfy(y, self.ya)
        self.isk = intermediate_session_key(
            self.sid, k, transcript_ir(self.ya, self.ada, self.message, self.ad)
        )
