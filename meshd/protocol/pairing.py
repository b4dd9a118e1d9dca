"""Pairing a new device by short code: the invitation, the handshake, the messages.

Theory of operation (protocol/pairing.md has the wire details and a diagram). An inviting
member shows a code "N-word-word": N, the nameplate, says which invitation is meant and is
public (it is advertised); the two BIP39 words are 22 bits of password. The joiner dials
the inviter and runs Noise_XXpsk3 with the prologue b"meshd/1/pair":

  joiner (initiator)                             inviter (responder)
    -> e            payload [nameplate, Ya]      the invitation must be open
    <- e, ee, s, es payload [Yb]                 inviter knows ISK, sets the PSK
    -> s, se, psk   payload empty                used up here; a wrong code fails here

Ya and Yb are CPace messages (cpace.py) for the password "N-word-word", so both sides get
the same ISK only if they typed the same code; the Noise PSK is derived from the ISK, so
message 3 decrypts only then. Nothing on the wire depends on the password in a way that
can be tested offline: a guesser gets one guess per invitation, and the invitation is
spent by any attempt that reaches message 3, right or wrong (before that nothing tests the
code, so a stranger who connects and leaves spoils nothing).

Inside the channel the joiner sends {"t": "pair.device", "claim": bytes}, and the inviter
answers {"t": "pair.welcome", ...} or {"t": "pair.refused", "reason": str}. Both sides can
show sas_words(handshake_hash), four words that match when no one sat in the middle.

Making, parsing and wording the code itself is codes.py's job; its names are re-exported here.

Everything here is sans-IO: time is `now`, randomness is `rng`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

# The code and its words live in codes.py; they are re-exported so that every caller keeps
# importing pairing's vocabulary from pairing.
from .codes import (
    CODE_WORDS,
    MAX_NAMEPLATE,
    MIN_NAMEPLATE,
    SAS_LABEL,
    SAS_WORD_COUNT,
    InvalidCode,
    PairingError,
    make_code,
    parse_code,
    sas_words,
    wordlist,
)
from .constants import PROLOGUE
from .cpace import CPaceInitiator, CPaceResponder, lv_cat
from .crypto import DHKeyPair, RandomSource, derive_key
from .errors import LocalProtocolError, RemoteProtocolError
from .handshake import HandshakeResult, handshake_result
from .noise import HandshakeState
from .noisepatterns import parse_pattern
from .pairingerrors import (
    InvitationExpired,
    InvitationUsed,
    MalformedPairingMessage,
    PairingAborted,
    PairingRefused,
    WrongCode,
    WrongNameplate,
)
from .records import MAX_CIRCLE_RECORDS, MAX_RECORD_BYTES
from .schema import (
    Array,
    Bin,
    Either,
    Int,
    Map,
    Nil,
    OneOf,
    Schema,
    SchemaError,
    Text,
    Tuple,
    unpack,
)

__all__ = [
    "CODE_WORDS", "INVITATION_TTL_S", "MAX_CLAIM_BYTES", "MAX_NAMEPLATE",
    "MAX_REFUSAL_REASON_CHARS", "MIN_NAMEPLATE", "PAIRING_PATTERN", "PAIRING_PROLOGUE",
    "PSK_LABEL", "SAS_LABEL", "SAS_WORD_COUNT", "InvalidCode", "Invitation", "InvitationExpired",
    "InvitationUsed", "MalformedPairingMessage", "PairingAborted", "PairingError",
    "PairingHandshake", "PairingRefused", "WrongCode", "WrongNameplate", "channel_identifier",
    "check_reply_to_send", "decode_first_payload", "decode_second_payload", "device_message",
    "encode_first_payload", "encode_second_payload", "make_code", "make_invitation",
    "parse_code", "parse_device_message", "parse_reply", "psk_from_isk", "refused_message",
    "sas_words", "wordlist",
]

PAIRING_PROLOGUE = PROLOGUE + b"/pair"
PAIRING_PATTERN = "XXpsk3"
INVITATION_TTL_S = 600.0
PSK_LABEL = b"meshd-pair-psk"
# A device claim is one small signed record; anything larger is not one.
MAX_CLAIM_BYTES = 16 * 1024
MAX_REFUSAL_REASON_CHARS = 200
# The handshake payloads are a nameplate and a 32-byte point: a few dozen bytes.
MAX_HANDSHAKE_PAYLOAD_BYTES = 256
MAX_WELCOME_RELAYS = 64
MAX_RELAY_ADDRESS_BYTES = 1024

# The schemas of everything a pairing peer sends (protocol/pairing.md). Unknown fields of
# the messages are ignored; the handshake payloads are exact.
FIRST_PAYLOAD = Tuple(Int(MIN_NAMEPLATE, MAX_NAMEPLATE), Bin(exact=32))  # [nameplate, Ya]
SECOND_PAYLOAD = Tuple(Bin(exact=32))  # [Yb]
DEVICE_MESSAGE = Map({"t": OneOf("pair.device"), "claim": Bin(1, MAX_CLAIM_BYTES)}, open_=True)
REASON = Text(0, 4 * MAX_REFUSAL_REASON_CHARS)  # of pair.refused
WELCOME = Map(
    {"t": OneOf("pair.welcome"),
     "records": Array(Bin(1, MAX_RECORD_BYTES), max_len=MAX_CIRCLE_RECORDS)},
    {"relays": Array(Text(1, MAX_RELAY_ADDRESS_BYTES), max_len=MAX_WELCOME_RELAYS),
     "inviter": Bin(exact=32), "port": Either(Int(0, 65535), Nil())},
    open_=True)


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


def _check(schema: Schema, value: object, what: str) -> Any:
    try:
        schema.check(value)
    except SchemaError as err:
        raise MalformedPairingMessage(f"{what}: {err}") from err
    return value


def _unpack(payload: bytes, schema: Schema, which: str) -> Any:
    try:
        return unpack(payload, schema, max_bytes=MAX_HANDSHAKE_PAYLOAD_BYTES)
    except SchemaError as err:
        raise MalformedPairingMessage(f"pairing message {which}: {err}") from err


def decode_first_payload(payload: bytes) -> tuple[int, bytes]:
    nameplate, ya = _unpack(payload, FIRST_PAYLOAD, "1")
    return nameplate, ya


def decode_second_payload(payload: bytes) -> bytes:
    (yb,) = _unpack(payload, SECOND_PAYLOAD, "2")
    return bytes(yb)


class PairingHandshake:
    """A HandshakePhase for channel.Channel: Noise_XXpsk3 keyed by CPace on the code.

    Build one with joiner() or inviter(). Any static key is accepted: knowing the code is
    the authorisation. Raises (from on_frame, through the Channel) WrongCode,
    WrongNameplate, MalformedPairingMessage, CPaceAbort, or whatever `check_open` (message
    1) or `on_attempt` (message 3) raise (the shell's InvitationUsed / InvitationExpired);
    other RemoteProtocolErrors for broken Noise messages.
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
        check_open: Callable[[], None] | None = None,
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
        self._check_open = check_open
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
        check_open: Callable[[], None] | None = None,
    ) -> PairingHandshake:
        """The member's side. check_open() runs when message 1 arrives and raises to refuse
        it (a used or expired invitation); on_attempt() runs when message 3 arrives, before
        anything is read from it: it spends the invitation, or raises to refuse the attempt."""
        return cls(
            initiator=False, static=static, rng=rng, nameplate=invitation.nameplate,
            password=invitation.code.encode(), on_attempt=on_attempt, check_open=check_open,
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
        if self._check_open is not None:
            self._check_open()
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
        if self._on_attempt is not None:
            self._on_attempt()  # the one test of the code: spent, right or wrong
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
    claim: bytes = _check(DEVICE_MESSAGE, message, "pair.device")["claim"]
    return claim


def refused_message(reason: str) -> dict[str, Any]:
    return {"t": "pair.refused", "reason": reason[:MAX_REFUSAL_REASON_CHARS]}


def check_reply_to_send(reply: Any) -> dict[str, Any]:
    """What the inviter's welcome() returned must be a pair.welcome or pair.refused."""
    if not isinstance(reply, dict) or reply.get("t") not in ("pair.welcome", "pair.refused"):
        raise LocalProtocolError("welcome() must return a pair.welcome or pair.refused message")
    return reply


def parse_reply(message: dict[str, Any]) -> dict[str, Any]:
    """The welcome, for the joiner, checked against WELCOME. Raises PairingRefused or
    MalformedPairingMessage (naming the bad field)."""
    kind = message.get("t")
    if kind == "pair.welcome":
        welcome: dict[str, Any] = _check(WELCOME, message, "pair.welcome")
        return welcome
    if kind == "pair.refused":
        # A refusal is one whatever its reason's shape: an unusable reason is just not shown.
        reason = message.get("reason")
        raise PairingRefused(reason[:MAX_REFUSAL_REASON_CHARS] if REASON.accepts(reason) and reason
                             else "no reason given")
    raise MalformedPairingMessage(f"expected pair.welcome or pair.refused, got {str(kind)[:40]!r}")
