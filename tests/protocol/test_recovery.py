"""Recovery words (BIP39 English) and the recovery member's keys."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from meshd.protocol.crypto import DHKeyPair, SigningKeyPair, derive_key
from meshd.protocol.records import DeviceInfo
from meshd.protocol.recovery import (
    ENGLISH_WORDLIST_SHA256,
    RecoveryWordsError,
    english_wordlist,
    entropy_to_words,
    generate_words,
    recovery_member,
    words_to_entropy,
    words_to_seed,
)

ABANDON_ART = ["abandon"] * 23 + ["art"]  # BIP39's all-zero 256-bit entropy


def test_the_word_list_is_the_standards(shared_vectors) -> None:
    data = (shared_vectors / "bip39-english.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == ENGLISH_WORDLIST_SHA256
    assert list(english_wordlist()) == data.decode().split()


def test_trezor_vectors_encode_and_decode(shared_vectors) -> None:
    vectors = json.loads((shared_vectors / "bip39-trezor-vectors.json").read_text())["english"]
    assert sum(len(entropy) == 64 for entropy, *_ in vectors) == 8
    for entropy_hex, phrase, *_ in vectors:
        entropy = bytes.fromhex(entropy_hex)
        assert entropy_to_words(entropy) == phrase.split()
        assert words_to_entropy(phrase.split()) == entropy
        if len(entropy) == 32:
            assert words_to_seed(phrase.split()) == entropy


def test_generated_words_round_trip() -> None:
    rng = random.Random(3).randbytes
    seed = random.Random(3).randbytes(32)
    words = generate_words(rng)
    assert len(words) == 24 and words_to_seed(words) == seed
    assert words_to_seed(ABANDON_ART) == bytes(32)
    assert words_to_seed([f"  {w.upper()} " for w in words]) == seed


def test_a_mistyped_word_is_caught_without_echoing_the_words() -> None:
    words = generate_words(random.Random(5).randbytes)
    wordlist = english_wordlist()
    accepted = 0
    for position in range(24):
        changed = list(words)
        changed[position] = wordlist[(wordlist.index(words[position]) + 1) % 2048]
        try:
            words_to_seed(changed)
            accepted += 1  # an 8-bit checksum misses 1 change in 256
        except RecoveryWordsError as err:
            assert not any(w in str(err) for w in changed if len(w) > 3)
    assert accepted <= 1
    swapped = list(ABANDON_ART)
    swapped[22], swapped[23] = swapped[23], swapped[22]
    with pytest.raises(RecoveryWordsError, match="mistyped or out of order"):
        words_to_seed(swapped)
    typo = list(words)
    typo[4] = "abandom"
    with pytest.raises(RecoveryWordsError) as caught:
        words_to_seed(typo)
    assert "word 5" in str(caught.value) and "abandom" not in str(caught.value)
    with pytest.raises(RecoveryWordsError):
        words_to_seed(words[:12])


def test_the_recovery_member_is_derived_from_the_seed() -> None:
    seed = bytes(range(32))
    signer, dh, info = recovery_member(seed)
    context = b"meshd/recovery/1"
    assert bytes(signer.public) == bytes(
        SigningKeyPair(derive_key(seed, b"recovery-sign", context)).public
    )
    expected_dh = DHKeyPair.from_private_bytes(derive_key(seed, b"recovery-dh", context))
    assert bytes(dh.public) == bytes(expected_dh.public)
    assert info == DeviceInfo(signer.public, dh.public, "recovery key", recovery=True)
    assert DeviceInfo.verify_claim(info.proof) == info
    again = recovery_member(seed)
    assert bytes(again[0].public) == bytes(signer.public)
    assert bytes(recovery_member(bytes(32))[0].public) != bytes(signer.public)
