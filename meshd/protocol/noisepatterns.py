"""Noise handshake patterns as data (Noise rev 34, sections 7.4, 7.5 and 18): a table of token
tuples, with the psk modifiers (section 9) applied by parse_pattern()."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import LocalProtocolError

SUITE_SUFFIX = b"_25519_ChaChaPoly_BLAKE2b"

Tokens = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HandshakePattern:
    """Pre-messages and message token lists; messages alternate, initiator first."""

    name: str
    initiator_pre: Tokens
    responder_pre: Tokens
    messages: tuple[Tokens, ...]

    @property
    def one_way(self) -> bool:
        return len(self.messages) == 1

    @property
    def has_psk(self) -> bool:
        return any("psk" in tokens for tokens in self.messages)


def _p(initiator_pre: str, responder_pre: str, *messages: str) -> tuple[Tokens, Tokens, tuple[Tokens, ...]]:
    def tokens(text: str) -> Tokens:
        return tuple(t.strip() for t in text.split(",") if t.strip())

    return tokens(initiator_pre), tokens(responder_pre), tuple(tokens(m) for m in messages)


# name: (initiator pre-message, responder pre-message, messages...)
BASE_PATTERNS: dict[str, tuple[Tokens, Tokens, tuple[Tokens, ...]]] = {
    # 7.4 one-way
    "N": _p("", "s", "e, es"),
    "K": _p("s", "s", "e, es, ss"),
    "X": _p("", "s", "e, es, s, ss"),
    # 7.5 interactive, fundamental
    "NN": _p("", "", "e", "e, ee"),
    "NK": _p("", "s", "e, es", "e, ee"),
    "NX": _p("", "", "e", "e, ee, s, es"),
    "KN": _p("s", "", "e", "e, ee, se"),
    "KK": _p("s", "s", "e, es, ss", "e, ee, se"),
    "KX": _p("s", "", "e", "e, ee, se, s, es"),
    "XN": _p("", "", "e", "e, ee", "s, se"),
    "XK": _p("", "s", "e, es", "e, ee", "s, se"),
    "XX": _p("", "", "e", "e, ee, s, es", "s, se"),
    "IN": _p("", "", "e, s", "e, ee, se"),
    "IK": _p("", "s", "e, es, s, ss", "e, ee, se"),
    "IX": _p("", "", "e, s", "e, ee, se, s, es"),
    # 18 deferred
    "NK1": _p("", "s", "e", "e, ee, es"),
    "NX1": _p("", "", "e", "e, ee, s", "es"),
    "X1N": _p("", "", "e", "e, ee", "s", "se"),
    "X1K": _p("", "s", "e, es", "e, ee", "s", "se"),
    "XK1": _p("", "s", "e", "e, ee, es", "s, se"),
    "X1K1": _p("", "s", "e", "e, ee, es", "s", "se"),
    "X1X": _p("", "", "e", "e, ee, s, es", "s", "se"),
    "XX1": _p("", "", "e", "e, ee, s", "es, s, se"),
    "X1X1": _p("", "", "e", "e, ee, s", "es, s", "se"),
    "K1N": _p("s", "", "e", "e, ee", "se"),
    "K1K": _p("s", "s", "e, es", "e, ee", "se"),
    "KK1": _p("s", "s", "e", "e, ee, se, es"),
    "K1K1": _p("s", "s", "e", "e, ee, es", "se"),
    "K1X": _p("s", "", "e", "e, ee, s, es", "se"),
    "KX1": _p("s", "", "e", "e, ee, se, s", "es"),
    "K1X1": _p("s", "", "e", "e, ee, s", "se, es"),
    "I1N": _p("", "", "e, s", "e, ee", "se"),
    "I1K": _p("", "s", "e, es, s", "e, ee", "se"),
    "IK1": _p("", "s", "e, s", "e, ee, se, es"),
    "I1K1": _p("", "s", "e, s", "e, ee, es", "se"),
    "I1X": _p("", "", "e, s", "e, ee, s, es", "se"),
    "IX1": _p("", "", "e, s", "e, ee, se, s", "es"),
    "I1X1": _p("", "", "e, s", "e, ee, s", "se, es"),
}

_PATTERN_NAME = re.compile(r"^([NKXI1]+?)((?:psk\d+)(?:\+psk\d+)*)?$")


@functools.lru_cache(maxsize=128)
def parse_pattern(name: str) -> HandshakePattern:
    """A pattern by name, with psk modifiers (section 9.2): 'XX', 'XXpsk3', 'NNpsk0+psk2'."""
    match = _PATTERN_NAME.match(name)
    if match is None or match.group(1) not in BASE_PATTERNS:
        raise LocalProtocolError(f"unknown handshake pattern {name!r}")
    initiator_pre, responder_pre, base_messages = BASE_PATTERNS[match.group(1)]
    messages = [list(tokens) for tokens in base_messages]
    for modifier in (match.group(2) or "").split("+"):
        if not modifier:
            continue
        position = int(modifier[3:])
        if position == 0:
            messages[0].insert(0, "psk")
        elif position <= len(messages):
            messages[position - 1].append("psk")
        else:
            raise LocalProtocolError(f"{modifier} is past the last message of {name}")
    return HandshakePattern(name, initiator_pre, responder_pre, tuple(tuple(m) for m in messages))


def protocol_name_for(pattern: HandshakePattern) -> bytes:
    return b"Noise_" + pattern.name.encode() + SUITE_SUFFIX
