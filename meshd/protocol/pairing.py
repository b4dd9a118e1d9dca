"""Pairing a new device by short code: the code, the invitation, the handshake, the messages.

Theory of operation (protocol/pairing.md has the wire details and a diagram). An inviting
member shows a code "N-word-word": N, the nameplate, says which invitation is meant and is
public (it is advertised); the two BIP39 words are 22 bits of password. The joiner dials
the inviter and runs Noise_XXpsk3 with the prologue b"meshd/1/pair":

  joiner (initiator)                             inviter (responder)
    -> e            payload [nameplate, Ya]      the invitation is used up here
    <- e, ee, s, es payload [Yb]                 inviter knows ISK, sets the PSK
    -> s, se, psk   payload empty                a wrong code fails to decrypt here

Ya and Yb are CPace messages (cpace.py) for the password "N-word-word", so both sides get
the same ISK only if they typed the same code; the Noise PSK is derived from the ISK, so
message 3 decrypts only then. Nothing on the wire depends on the password in a way that
can be tested offline: a guesser gets one guess per invitation, and the invitation is
spent by any attempt that reaches message 1, right or wrong.

Inside the channel the joiner sends {"t": "pair.device", "claim": bytes}, and the inviter
answers {"t": "pair.welcome", ...} or {"t": "pair.refused", "reason": str}. Both sides can
show sas_words(handshake_hash), four words that match when no one sat in the middle.

Everything here is sans-IO: time is `now`, randomness is `rng`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .channel import HandshakeResult, handshake_result
from .constants import PROLOGUE
from .cpace import CPaceInitiator, CPaceResponder, lv_cat
from .crypto import DHKeyPair, RandomSource, derive_key
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .noise import HandshakeState, parse_pattern

PAIRING_PROLOGUE = PROLOGUE + b"/pair"
PAIRING_PATTERN = "XXpsk3"
MIN_NAMEPLATE = 1
MAX_NAMEPLATE = 999
CODE_WORDS = 2
SAS_WORD_COUNT = 4
INVITATION_TTL_S = 600.0
PSK_LABEL = b"meshd-pair-psk"
SAS_LABEL = b"meshd-pair-sas"
# A device claim is one small signed record; anything larger is not one.
MAX_CLAIM_BYTES = 16 * 1024
MAX_REFUSAL_REASON_CHARS = 200

_BIP39_ENGLISH_SHA256 = "2f5eed53a4727b4bf8880d8f3f199efc90e58503646d9ff8eff3a2ed3b24dbda"
_CODE_SEPARATORS = re.compile(r"[\s\-]+")


# ---- Errors --------------------------------------------------------------------------


class PairingError(ProtocolError):
    """Abstract: every pairing failure. Each subclass has a stable `reason` code."""

    reason = "pairing"


class InvalidCode(PairingError, LocalProtocolError):
    """The typed code is not of the form N-word-word (a user error, never a peer's)."""

    reason = "invalid-code"


class WrongCode(PairingError, RemoteProtocolError):
    """Message 3 did not authenticate: the joiner's code differs from the invitation's."""

    reason = "wrong-code"


class WrongNameplate(PairingError, RemoteProtocolError):
    """The joiner asked for a different invitation than the one on offer here."""

    reason = "wrong-nameplate"


class MalformedPairingMessage(PairingError, RemoteProtocolError):
    reason = "malformed"


class InvitationExpired(PairingError, RemoteProtocolError):
    """The invitation's 10 minutes are over: make a new one."""

    reason = "expired"


class InvitationUsed(PairingError, RemoteProtocolError):
    """The invitation already had its one attempt: make a new one."""

    reason = "used"


class PairingRefused(PairingError, RemoteProtocolError):
    """The inviter answered pair.refused; `detail` is its reason."""

    reason = "refused"

    def __init__(self, detail: str) -> None:
        super().__init__(f"the inviting device refused this device: {detail}")
        self.detail = detail


class PairingAborted(PairingError, RemoteProtocolError):
    """The inviter closed the connection without a welcome (for the joiner, a wrong code,
    an expired or used invitation look the same: the inviter tells an unauthenticated
    party nothing)."""

    reason = "aborted"


# ---- Words and codes -----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def wordlist() -> tuple[str, ...]:
    """The BIP39 English list, checked against the standard's hash."""
    import mnemonic  # deferred: only pairing and recovery need the list

    words = tuple(mnemonic.Mnemonic("english").wordlist)
    digest = hashlib.sha256(("\n".join(words) + "\n").encode()).hexdigest()
    if len(words) != 2048 or digest != _BIP39_ENGLISH_SHA256:
        raise LocalProtocolError("the installed BIP39 English word list is not the standard one")
    return words


@functools.lru_cache(maxsize=1)
def _word_index() -> dict[str, int]:
    return {word: index for index, word in enumerate(wordlist())}


def _uniform(rng: RandomSource, bound: int) -> int:
    """A uniform integer in [0, bound) by rejection sampling (bound <= 2**16)."""
    mask = (1 << (bound - 1).bit_length()) - 1
    while True:
        value = int.from_bytes(rng(2), "big") & mask
        if value < bound:
            return value


def make_code(rng: RandomSource) -> str:
    """A fresh code 'N-word-word': a nameplate in 1..999 and 2 x 11 bits of password."""
    nameplate = MIN_NAMEPLATE + _uniform(rng, MAX_NAMEPLATE - MIN_NAMEPLATE + 1)
    words = [wordlist()[_uniform(rng, 2048)] for _ in range(CODE_WORDS)]
    return "-".join([str(nameplate), *words])


def _resolve_word(typed: str, position: int) -> str:
    if typed in _word_index():
        return typed
    # BIP39 words are unique in their first four letters, so a 4+ letter prefix is enough.
    if len(typed) >= 4:
        matches = [word for word in wordlist() if word.startswith(typed)]
        if len(matches) == 1:
            return matches[0]
    raise InvalidCode(f"word {position} of the code is not in the word list; check its spelling")


def parse_code(text: str) -> tuple[int, str]:
    """(nameplate, canonical code) from what a person typed.

    Case, surrounding space and the separators (dashes or spaces) are forgiven; a unique
    prefix of 4+ letters stands for its word. Raises InvalidCode with a message that never
    repeats the words.
    """
    if not isinstance(text, str):
        raise InvalidCode("a code is text like '7-zebra-garden'")
    parts = [part for part in _CODE_SEPARATORS.split(text.strip().lower()) if part]
    if not parts:
        raise InvalidCode("the code is empty; it looks like '7-zebra-garden'")
    if len(parts) != 1 + CODE_WORDS:
        raise InvalidCode(
            f"a code is a number and {CODE_WORDS} words, like '7-zebra-garden';"
            f" this one has {len(parts)} parts"
        )
    number = parts[0]
    if not (number.isascii() and number.isdigit()) or len(number) > 3:
        raise InvalidCode("a code starts with a number from 1 to 999")
    nameplate = int(number)
    if not MIN_NAMEPLATE <= nameplate <= MAX_NAMEPLATE:
        raise InvalidCode("a code starts with a number from 1 to 999")
    words = [_resolve_word(part, i) for i, part in enumerate(parts[1:], start=1)]
    return nameplate, "-".join([str(nameplate), *words])


def sas_words(handshake_hash: bytes) -> list[str]:
    """Four words from the channel's handshake hash: equal on both sides unless someone
    relayed two separate handshakes (44 bits, for an optional look at both screens)."""
    digest = derive_key(handshake_hash, SAS_LABEL, b"", 8)
    value = int.from_bytes(digest, "big")
    return [wordlist()[(value >> (11 * i)) & 0x7FF] for i in range(SAS_WORD_COUNT)]


# ---- The invitation ------------------------------------------------------------------


@dataclass
class Invitation:
    """One open invitation: valid until expires_at (the shell's clock) and for one attempt."""

    code: str = field(repr=False)
    nameplate: int
    expires_at: float
    used: bool = False

    def check(self, now: float) -> None:
        """Raises InvitationUsed or InvitationExpired when no attempt may start."""
        if self.used:
            raise InvitationUsed(f"invitation {self.nameplate} was already used")
        if now >= self.expires_at:
            raise InvitationExpired(f"invitation {self.nameplate} has expired")

    def claim_attempt(self, now: float) -> None:
        """Spend the invitation's one attempt (or raise, as check() does)."""
        self.check(now)
        self.used = True


def make_invitation(rng: RandomSource, now: float, ttl: float = INVITATION_TTL_S) -> Invitation:
    code = make_code(rng)
    nameplate, _ = parse_code(code)
    return Invitation(code=code, nameplate=nameplate, expires_at=now + ttl)


# ---- The handshake -------------------------------------------------------------------


def channel_identifier(nameplate: int) -> bytes:
    """CPace's CI: the pairing protocol and the invitation asked for."""
    return lv_cat(PAIRING_PROLOGUE, str(nameplate).encode())


def psk_from_isk(isk: bytes) -> bytes:
    return derive_key(isk, PSK_LABEL, b"", 32)


def encode_first_payload(nameplate: int, ya: bytes) -> bytes:
    return bytes(msgpack.packb([nameplate, ya], use_bin_type=True))


def encode_second_payload(yb: bytes) -> bytes:
    return bytes(msgpack.packb([yb], use_bin_type=True))


def _unpack_array(payload: bytes, length: int, which: str) -> list[Any]:
    try:
        value = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as err:
        raise MalformedPairingMessage(f"pairing message {which} is not msgpack") from err
    if not isinstance(value, list) or len(value) != length:
        raise MalformedPairingMessage(f"pairing message {which} is not a {length}-element array")
    return value


def _point(value: Any, which: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise MalformedPairingMessage(f"pairing message {which} lacks a 32-byte CPace point")
    return value


def decode_first_payload(payload: bytes) -> tuple[int, bytes]:
    nameplate, ya = _unpack_array(payload, 2, "1")
    if not isinstance(nameplate, int) or isinstance(nameplate, bool):
        raise MalformedPairingMessage("pairing message 1 lacks a nameplate number")
    return nameplate, _point(ya, "1")


def decode_second_payload(payload: bytes) -> bytes:
    (yb,) = _unpack_array(payload, 1, "2")
    return _point(yb, "2")


class PairingHandshake:
    """A HandshakePhase for channel.Channel: Noise_XXpsk3 keyed by CPace on the code.

    Build one with joiner() or inviter(). Any static key is accepted: knowing the code is
    the authorisation. Raises (from on_frame, through the Channel) WrongCode,
    WrongNameplate, MalformedPairingMessage, CPaceAbort, or whatever `on_attempt` raises
    (the shell's InvitationUsed / InvitationExpired); other RemoteProtocolErrors for
    broken Noise messages.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static: DHKeyPair,
        rng: RandomSource,
        nameplate: int,
        password: bytes,
        on_attempt: Callable[[], None] | None = None,
    ) -> None:
        self._state = HandshakeState(
            parse_pattern(PAIRING_PATTERN),
            initiator=initiator,
            prologue=PAIRING_PROLOGUE,
            rng=rng,
            s=static,
        )
        self._rng = rng
        self._nameplate = nameplate
        self._password = password
        self._on_attempt = on_attempt
        self._cpace: CPaceInitiator | None = None
        self.received_second_message = False

    @classmethod
    def joiner(cls, code: str, *, static: DHKeyPair, rng: RandomSource) -> PairingHandshake:
        """The new device's side. Raises InvalidCode for a code that does not parse."""
        nameplate, password = parse_code(code)
        return cls(
            initiator=True, static=static, rng=rng, nameplate=nameplate,
            password=password.encode(),
        )

    @classmethod
    def inviter(
        cls,
        invitation: Invitation,
        *,
        static: DHKeyPair,
        rng: RandomSource,
        on_attempt: Callable[[], None],
    ) -> PairingHandshake:
        """The member's side. on_attempt() runs when message 1 arrives, before anything is
        read from it; it spends the invitation, or raises to refuse the attempt."""
        return cls(
            initiator=False, static=static, rng=rng, nameplate=invitation.nameplate,
            password=invitation.code.encode(), on_attempt=on_attempt,
        )

    # -- HandshakePhase --

    def initial_frames(self) -> list[bytes]:
        if not self._state.initiator:
            return []
        # The ephemeral key is drawn before message 1 is written, because it is CPace's sid.
        ephemeral = DHKeyPair.generate(self._rng)
        self._state.e = ephemeral
        self._cpace = CPaceInitiator(
            prs=self._password,
            ci=channel_identifier(self._nameplate),
            sid=bytes(ephemeral.public),
            rng=self._rng,
        )
        return [self._state.write_message(encode_first_payload(self._nameplate, self._cpace.message))]

    def on_frame(self, frame: bytes) -> list[bytes]:
        if self._state.initiator:
            return self._joiner_reads_second(frame)
        if self._state.re is None:
            return self._inviter_reads_first(frame)
        return self._inviter_reads_third(frame)

    @property
    def done(self) -> bool:
        return self._state.complete

    def result(self) -> HandshakeResult:
        return handshake_result(self._state)

    # -- the steps --

    def _inviter_reads_first(self, frame: bytes) -> list[bytes]:
        if self._on_attempt is not None:
            self._on_attempt()
        nameplate, ya = decode_first_payload(self._state.read_message(frame))
        if nameplate != self._nameplate:
            raise WrongNameplate(f"joiner asked for invitation {nameplate}, not this one")
        assert self._state.re is not None
        cpace = CPaceResponder(
            prs=self._password,
            ci=channel_identifier(self._nameplate),
            sid=bytes(self._state.re),
            rng=self._rng,
            ya=ya,
        )
        self._state.set_psk(psk_from_isk(cpace.isk))
        return [self._state.write_message(encode_second_payload(cpace.message))]

    def _joiner_reads_second(self, frame: bytes) -> list[bytes]:
        yb = decode_second_payload(self._state.read_message(frame))
        self.received_second_message = True
        assert self._cpace is not None
        self._state.set_psk(psk_from_isk(self._cpace.finish(yb)))
        return [self._state.write_message(b"")]

    def _inviter_reads_third(self, frame: bytes) -> list[bytes]:
        try:
            self._state.read_message(frame)
        except RemoteProtocolError as err:
            # Before the psk token only a tampered static key fails; after it, a wrong code.
            raise WrongCode("the joining device's code was wrong (message 3 did not decrypt)") from err
        return []


# ---- Messages inside the channel -----------------------------------------------------


def device_message(claim: bytes) -> dict[str, Any]:
    return {"t": "pair.device", "claim": bytes(claim)}


def parse_device_message(message: dict[str, Any]) -> bytes:
    """The claim from a pair.device message. Raises MalformedPairingMessage."""
    if message.get("t") != "pair.device":
        raise MalformedPairingMessage(f"expected pair.device, got {str(message.get('t'))[:40]!r}")
    claim = message.get("claim")
    if not isinstance(claim, bytes) or not 0 < len(claim) <= MAX_CLAIM_BYTES:
        raise MalformedPairingMessage("pair.device needs a claim of 1 to 16384 bytes")
    return claim


def refused_message(reason: str) -> dict[str, Any]:
    return {"t": "pair.refused", "reason": reason[:MAX_REFUSAL_REASON_CHARS]}


def check_reply_to_send(reply: Any) -> dict[str, Any]:
    """What the inviter's welcome() returned must be a pair.welcome or pair.refused."""
    if not isinstance(reply, dict) or reply.get("t") not in ("pair.welcome", "pair.refused"):
        raise LocalProtocolError("welcome() must return a pair.welcome or pair.refused message")
    return reply


def parse_reply(message: dict[str, Any]) -> dict[str, Any]:
    """The welcome, for the joiner. Raises PairingRefused or MalformedPairingMessage."""
    kind = message.get("t")
    if kind == "pair.welcome":
        return message
    if kind == "pair.refused":
        reason = message.get("reason")
        detail = reason[:MAX_REFUSAL_REASON_CHARS] if isinstance(reason, str) else "no reason given"
        raise PairingRefused(detail)
    raise MalformedPairingMessage(f"expected pair.welcome or pair.refused, got {str(kind)[:40]!r}")
