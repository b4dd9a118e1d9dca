"""Private mDNS adverts: what a device puts on the LAN, and how a member recognises it.

Theory of operation (spec: protocol/discovery.md). Everything an outsider can read in an
advert is either fresh randomness or the network's own facts (addresses, the listen port):

- time is cut into windows of WINDOW_S seconds; window = floor(unix_time / WINDOW_S);
- per window a device makes a new instance name and host name (random base32), and every
  advert carries a fresh random 24-byte nonce;
- the only secret-bearing field is the hint: the device's 8-byte short id encrypted with
  XChaCha20-Poly1305 under a key derived from the circle's discovery key and the window.
  A fresh nonce per advert makes the ciphertext random-looking and unlinkable, even
  between two devices of the same circle in the same window (a per-window tag would link
  them).

A member recognises an advert by trial decryption with each current discovery key for
windows w-1, w and w+1 (clock skew and adverts made just before a boundary). That is at
most a few dozen tiny AEAD openings per advert; no cheap pre-filter tag is sent, because
any tag shared by the circle would be a linkable identifier within its window.

recognise() is fed whatever the LAN sends: the TXT record is checked against its schema
(txt_fields, ADVERT_TXT) first, and anything that does not fit gives None, never an error.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .crypto import XAEAD_NONCE_LEN, RandomSource, derive_key, xaead_decrypt, xaead_encrypt
from .errors import LocalProtocolError, RemoteProtocolError
from .schema import Map, OneOf, Schema, SchemaError, Text

SERVICE_TYPE = "_meshd._tcp.local."
PAIRING_SERVICE_TYPE = "_meshd-pair._tcp.local."
ADVERT_VERSION = "1"

WINDOW_S = 900
# A member accepts adverts made in the neighbouring windows too.
ACCEPTED_WINDOW_OFFSETS = (0, -1, 1)

DEVICE_HINT_LEN = 8
HINT_CIPHERTEXT_LEN = DEVICE_HINT_LEN + 16
NAME_CHARS = 10  # 50 random bits: collisions are negligible, so no mDNS probing is needed
WINDOW_KEY_LABEL = b"meshd/mdns-win"
HINT_AD = b"meshd/mdns-hint/1\x00"
# The largest TXT value we look at; anything longer is not ours (and is not decoded).
MAX_TXT_VALUE = 64

_BASE32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


@dataclass(frozen=True, slots=True)
class Advert:
    """One advert: instance label (without the service type), host name, TXT map."""

    instance: str
    host: str
    txt: Mapping[str, str]

    @property
    def service_name(self) -> str:
        return f"{self.instance}.{SERVICE_TYPE}"


def window_of(unix_time: float) -> int:
    return int(unix_time // WINDOW_S)


def next_window_start(unix_time: float) -> float:
    return float((window_of(unix_time) + 1) * WINDOW_S)


def short_device_id(sign_key: bytes) -> bytes:
    """The 8-byte hint a device puts (encrypted) in its adverts: from its signing key."""
    return derive_key(sign_key, b"meshd/device-id", size=DEVICE_HINT_LEN)


def window_key(discovery_key: bytes, window: int) -> bytes:
    if window < 0:
        raise LocalProtocolError("window must not be negative")
    return derive_key(discovery_key, WINDOW_KEY_LABEL, window.to_bytes(8, "big"))


def random_label(rng: RandomSource, chars: int = NAME_CHARS) -> str:
    """A DNS-safe random label: lower-case base32 (5 bits a character)."""
    raw = int.from_bytes(rng((chars * 5 + 7) // 8), "big")
    return "".join(_BASE32_ALPHABET[(raw >> (5 * i)) & 31] for i in range(chars))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    """Decode what URL_SAFE_B64 accepted (so it cannot fail)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Base64Text(Schema):
    """Unpadded url-safe base64 of 1..MAX_TXT_VALUE characters, nothing else (the base64
    module alone would silently drop characters outside its alphabet)."""

    _alphabet = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

    def check(self, value: object, where: str = "$") -> None:
        if (type(value) is not str or not 0 < len(value) <= MAX_TXT_VALUE
                or not self._alphabet.issuperset(value) or len(value) % 4 == 1):
            raise SchemaError(where, f"unpadded url-safe base64 of 1..{MAX_TXT_VALUE} characters")


URL_SAFE_B64 = _Base64Text()
# The TXT maps a member reads (protocol/discovery.md), after txt_fields(); other keys ignored.
ADVERT_TXT = Map({"v": OneOf(ADVERT_VERSION), "n": URL_SAFE_B64, "h": URL_SAFE_B64}, open_=True)
INVITATION_TXT = Map({"v": OneOf(ADVERT_VERSION), "p": Text(1, 4)}, open_=True)
MAX_TXT_KEYS = 32


def txt_fields(txt: object) -> dict[str, str | None]:
    """A TXT record as zeroconf hands it over (a map of bytes or str keys to bytes, str or
    None), as str -> ASCII str or None. Raises SchemaError naming the bad entry."""
    if not isinstance(txt, Mapping) or len(txt) > MAX_TXT_KEYS:
        raise SchemaError("$", f"a map of at most {MAX_TXT_KEYS} entries")
    fields: dict[str, str | None] = {}
    for index, (key, value) in enumerate(txt.items()):
        name = _text(key)
        if name is None or not 0 < len(name) <= MAX_TXT_VALUE:
            raise SchemaError(f"$<key {index}>", f"an ASCII key of 1..{MAX_TXT_VALUE} characters")
        text = None if value is None else _text(value)
        if (value is not None and text is None) or len(text or "") > MAX_TXT_VALUE:
            raise SchemaError(f"$[{name!r}]", f"an ASCII value of at most {MAX_TXT_VALUE} characters")
        fields.setdefault(name, text)  # the first of duplicate keys, as zeroconf reads them
    return fields


def parse_advert(txt: object) -> tuple[bytes, bytes]:
    """The nonce and the encrypted hint of a meshd advert's TXT record. Raises SchemaError."""
    fields = txt_fields(txt)
    ADVERT_TXT.check(fields)
    nonce, hint = _unb64(fields["n"] or ""), _unb64(fields["h"] or "")
    if len(nonce) != XAEAD_NONCE_LEN:
        raise SchemaError("$['n']", f"{XAEAD_NONCE_LEN} bytes")
    if len(hint) != HINT_CIPHERTEXT_LEN:
        raise SchemaError("$['h']", f"{HINT_CIPHERTEXT_LEN} bytes")
    return nonce, hint


def make_advert(discovery_key: bytes, window: int, device_hint: bytes, rng: RandomSource) -> Advert:
    """A fresh advert for this window: new names, new nonce, the hint encrypted."""
    if len(device_hint) != DEVICE_HINT_LEN:
        raise LocalProtocolError(f"device hint must be {DEVICE_HINT_LEN} bytes")
    nonce = rng(XAEAD_NONCE_LEN)
    hint = xaead_encrypt(window_key(discovery_key, window), nonce, HINT_AD, device_hint)
    return Advert(
        instance=random_label(rng),
        host=f"{random_label(rng)}.local.",
        txt={"v": ADVERT_VERSION, "n": _b64(nonce), "h": _b64(hint)},
    )


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) and value.isascii() else None


def recognise(txt: object, keys: Iterable[bytes], window: int) -> bytes | None:
    """The device hint in an advert made by a circle we hold a discovery key of, or None.

    txt is untrusted (any shape); anything malformed or foreign gives None, never an error.
    """
    try:
        nonce, hint = parse_advert(txt)
    except SchemaError:
        return None
    for key in keys:
        for offset in ACCEPTED_WINDOW_OFFSETS:
            if window + offset < 0:
                continue
            try:
                return xaead_decrypt(window_key(key, window + offset), nonce, HINT_AD, hint)
            except RemoteProtocolError:
                continue
    return None


# ---- Invitations -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvitationAdvert:
    instance: str
    host: str
    txt: Mapping[str, str]


MAX_NAMEPLATE = 9999


def make_invitation_advert(nameplate: int, rng: RandomSource) -> InvitationAdvert:
    """An inviter's advert: only the nameplate, which the joiner types anyway."""
    if not 0 < nameplate <= MAX_NAMEPLATE:
        raise LocalProtocolError("nameplate out of range")
    return InvitationAdvert(
        instance=random_label(rng),
        host=f"{random_label(rng)}.local.",
        txt={"v": ADVERT_VERSION, "p": str(nameplate)},
    )


def invitation_nameplate(txt: object) -> int | None:
    """The nameplate an invitation advert offers, or None for anything else (never raises)."""
    try:
        fields = txt_fields(txt)
        INVITATION_TXT.check(fields)
    except SchemaError:
        return None
    text = fields["p"] or ""
    if not text.isdigit():
        return None
    nameplate = int(text)
    return nameplate if 0 < nameplate <= MAX_NAMEPLATE else None
