"""Pairing codes and their words: making and parsing "N-word-word", and the check words.

A code is a nameplate N in 1..999 (public: it says which invitation is meant) and two
BIP39 English words (22 bits of password); parse_code() forgives what people get wrong
when typing one. sas_words() turns a channel's handshake hash into four words that both
screens show. pairing.py uses these for the invitation and the handshake and re-exports
them.

PairingError, the root of every pairing failure, is defined here rather than in pairing.py
because this is the lowest pairing module: InvalidCode must be one, and codes.py must not
import pairing.py, which imports it.

Everything here is sans-IO: randomness is `rng`.
"""

from __future__ import annotations

import functools
import hashlib
import re

from .crypto import RandomSource, derive_key
from .errors import LocalProtocolError, ProtocolError

MIN_NAMEPLATE = 1
MAX_NAMEPLATE = 999
CODE_WORDS = 2
SAS_WORD_COUNT = 4
SAS_LABEL = b"meshd-pair-sas"

_BIP39_ENGLISH_SHA256 = "2f5eed53a4727b4bf8880d8f3f199efc90e58503646d9ff8eff3a2ed3b24dbda"
_CODE_SEPARATORS = re.compile(r"[\s\-]+")


class PairingError(ProtocolError):
    """Abstract: every pairing failure. Each subclass has a stable `reason` code."""

    reason = "pairing"


class InvalidCode(PairingError, LocalProtocolError):
    """The typed code is not of the form N-word-word (a user error, never a peer's)."""

    reason = "invalid-code"


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
