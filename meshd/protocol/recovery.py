"""Recovery words: a 256-bit seed written down as 24 BIP39 English words, and the recovery
member whose keys that seed derives.

The words are the only copy of the recovery member's keys: meshd shows them once and never
stores them. BIP39 appends the first entropy_bits/32 bits of SHA-256(entropy) as a checksum,
so a mistyped or swapped word is caught (with probability 1 - 2**-8 for 24 words) before any
key is derived. Only the BIP39 English word list comes from the `mnemonic` package, checked
against the standard's SHA-256 when first used; the encoding is BIP39's, written here, and
no BIP39 seed (PBKDF2 of the words) is involved: the 32 bytes of entropy are the seed.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

from mnemonic import Mnemonic

from .crypto import DHKeyPair, RandomSource, SigningKeyPair, derive_key
from .errors import LocalProtocolError
from .records import DeviceInfo

WORD_COUNT = 24
SEED_BYTES = 32
# sha256 of bitcoin/bips bip-0039/english.txt (one word per line, newline-terminated).
ENGLISH_WORDLIST_SHA256 = "2f5eed53a4727b4bf8880d8f3f199efc90e58503646d9ff8eff3a2ed3b24dbda"
RECOVERY_NAME = "recovery key"
# Key derivation from the seed (protocol/circle.md, "Recovery member").
RECOVERY_CONTEXT = b"meshd/recovery/1"
SIGN_LABEL = b"recovery-sign"
DH_LABEL = b"recovery-dh"
_BITS_PER_WORD = 11


class RecoveryWordsError(LocalProtocolError):
    """The recovery words are not valid. The message never repeats the words."""


@functools.cache
def english_wordlist() -> tuple[str, ...]:
    words = tuple(Mnemonic("english").wordlist)
    digest = hashlib.sha256(("\n".join(words) + "\n").encode()).hexdigest()
    if len(words) != 2048 or digest != ENGLISH_WORDLIST_SHA256:
        raise LocalProtocolError("the installed BIP39 English word list is not the standard one")
    return words


@functools.cache
def _word_indices() -> dict[str, int]:
    return {word: index for index, word in enumerate(english_wordlist())}


def entropy_to_words(entropy: bytes) -> list[str]:
    """BIP39: 16, 20, 24, 28 or 32 bytes of entropy to 12..24 words."""
    if len(entropy) not in (16, 20, 24, 28, 32):
        raise RecoveryWordsError("BIP39 entropy is 16, 20, 24, 28 or 32 bytes")
    checksum_bits = len(entropy) * 8 // 32
    checksum = hashlib.sha256(entropy).digest()[0] >> (8 - checksum_bits)
    value = int.from_bytes(entropy, "big") << checksum_bits | checksum
    count = (len(entropy) * 8 + checksum_bits) // _BITS_PER_WORD
    words = english_wordlist()
    return [
        words[value >> (_BITS_PER_WORD * (count - 1 - i)) & 0x7FF] for i in range(count)
    ]


def words_to_entropy(words: Sequence[str]) -> bytes:
    """BIP39 words back to entropy; raises RecoveryWordsError on an unknown word or checksum."""
    if len(words) not in (12, 15, 18, 21, 24):
        raise RecoveryWordsError(f"expected 12 to 24 words in steps of 3, got {len(words)}")
    indices = _word_indices()
    value = 0
    for position, word in enumerate(words, start=1):
        index = indices.get(word.strip().lower())
        if index is None:
            raise RecoveryWordsError(f"word {position} is not in the BIP39 English list")
        value = value << _BITS_PER_WORD | index
    checksum_bits = len(words) * _BITS_PER_WORD // 33
    entropy = (value >> checksum_bits).to_bytes(checksum_bits * 4, "big")
    expected = hashlib.sha256(entropy).digest()[0] >> (8 - checksum_bits)
    if value & ((1 << checksum_bits) - 1) != expected:
        raise RecoveryWordsError("the words do not check out: a word is mistyped or out of order")
    return entropy


def generate_words(rng: RandomSource) -> list[str]:
    """24 fresh recovery words (256 bits of entropy from rng)."""
    return entropy_to_words(rng(SEED_BYTES))


def words_to_seed(words: Sequence[str]) -> bytes:
    """The 32-byte seed the 24 words encode, checksum checked."""
    if len(words) != WORD_COUNT:
        raise RecoveryWordsError(f"a recovery key is {WORD_COUNT} words, got {len(words)}")
    return words_to_entropy(words)


def recovery_member(seed: bytes) -> tuple[SigningKeyPair, DHKeyPair, DeviceInfo]:
    """The recovery member's Ed25519 and X25519 keys, and its DeviceInfo (with its claim)."""
    if len(seed) != SEED_BYTES:
        raise RecoveryWordsError(f"a recovery seed is {SEED_BYTES} bytes")
    signer = SigningKeyPair(derive_key(seed, SIGN_LABEL, RECOVERY_CONTEXT))
    dh = DHKeyPair.from_private_bytes(derive_key(seed, DH_LABEL, RECOVERY_CONTEXT))
    info = DeviceInfo(signer.public, dh.public, RECOVERY_NAME, recovery=True).claimed(signer)
    return signer, dh, info
