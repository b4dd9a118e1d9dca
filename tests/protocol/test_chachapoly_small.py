"""ChaChaPolyKey, the transport cipher: messages up to SODIUM_MAX_BYTES go through libsodium's
one-shot call into a buffer the key keeps (issue 16: OpenSSL's binding set up a cipher context
per message), larger ones through OpenSSL. Both give the bytes of an independent
implementation (cryptography's ChaCha20Poly1305, used directly here), from either side of the
threshold, and refuse what does not authenticate."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from meshd.protocol.crypto import SODIUM_MAX_BYTES, ChaChaPolyKey
from meshd.protocol.errors import RemoteProtocolError

from .harness import seeded_rng

SIZES = [0, 1, 100, SODIUM_MAX_BYTES - 1, SODIUM_MAX_BYTES, SODIUM_MAX_BYTES + 1, 4096, 65519]


def _nonce(counter: int) -> bytes:
    return bytes(4) + counter.to_bytes(8, "little")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("nonce", [0, 1, 2**64 - 1])
def test_the_bytes_of_an_independent_implementation_either_side_of_the_threshold(
        size: int, nonce: int) -> None:
    rng = seeded_rng(size * 3 + nonce % 89)
    key, ad, plaintext = rng(32), rng(size % 40), rng(size)
    reference = ChaCha20Poly1305(key).encrypt(_nonce(nonce), plaintext, ad)
    cipher = ChaChaPolyKey(key)
    for given in (plaintext, bytearray(plaintext), memoryview(b"xx" + plaintext)[2:]):
        sealed = cipher.encrypt(nonce, ad, given)
        assert type(sealed) is bytes and sealed == reference
    for given in (reference, bytearray(reference), memoryview(b"xx" + reference)[2:]):
        opened = cipher.decrypt(nonce, ad, given)
        assert type(opened) is bytes and opened == plaintext


def test_results_are_copies_not_views_of_the_keys_buffer() -> None:
    rng = seeded_rng(11)
    cipher = ChaChaPolyKey(rng(32))
    first_plain, second_plain = rng(100), rng(100)
    first = cipher.encrypt(1, b"", first_plain)
    kept = bytes(first)
    second = cipher.encrypt(2, b"", second_plain)
    assert first == kept != second
    opened_first = cipher.decrypt(1, b"", first)
    cipher.decrypt(2, b"", second)
    assert opened_first == first_plain


@pytest.mark.parametrize("size", [0, 100, SODIUM_MAX_BYTES, SODIUM_MAX_BYTES + 1])
@pytest.mark.parametrize("change", ["tag", "body", "ad", "nonce", "key", "short"])
def test_what_does_not_authenticate_is_refused(size: int, change: str) -> None:
    rng = seeded_rng(size + 5)
    key, ad, nonce = rng(32), rng(16), 7
    sealed = bytearray(ChaChaPolyKey(key).encrypt(nonce, ad, rng(size)))
    if change == "tag":
        sealed[-1] ^= 1
    elif change == "body" and size:
        sealed[0] ^= 1
    elif change == "body":
        sealed[-16] ^= 1  # no body: the tag's first byte
    elif change == "ad":
        ad = ad[:-1] + bytes([ad[-1] ^ 1])
    elif change == "nonce":
        nonce = 8
    elif change == "key":
        key = rng(32)
    else:
        sealed = sealed[:15]
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        ChaChaPolyKey(key).decrypt(nonce, ad, bytes(sealed))


class _CountingAead:
    """Stands in for the key's OpenSSL object and counts what reaches it."""

    def __init__(self, real: ChaCha20Poly1305) -> None:
        self.real, self.calls = real, 0

    def encrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
        self.calls += 1
        return self.real.encrypt(nonce, data, ad)

    def decrypt(self, nonce: bytes, data: bytes, ad: bytes) -> bytes:
        self.calls += 1
        return self.real.decrypt(nonce, data, ad)


def test_a_small_message_makes_no_openssl_call_and_a_large_one_does() -> None:
    # Work removed per message (issue 16): OpenSSL's binding costs 1.6 us a call for a
    # 100-byte message, libsodium's one-shot call 0.9 us. On main every message made one.
    rng = seeded_rng(3)
    key = rng(32)
    cipher = ChaChaPolyKey(key)
    counting = _CountingAead(ChaCha20Poly1305(key))
    cipher._aead = counting  # type: ignore[assignment]  # the test's stand-in
    for nonce in range(10):
        assert cipher.decrypt(nonce, b"", cipher.encrypt(nonce, b"", rng(100))) is not None
    assert counting.calls == 0
    large = rng(SODIUM_MAX_BYTES + 1)
    assert cipher.decrypt(10, b"", cipher.encrypt(10, b"", large)) == large
    assert counting.calls == 2
