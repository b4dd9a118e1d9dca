"""crypto.seal_once/open_once (libsodium's one-shot ChaCha20-Poly1305, the handshake's) give
the same bytes as ChaChaPolyKey (the transport's: libsodium up to SODIUM_MAX_BYTES, OpenSSL
above; test_chachapoly_small.py checks it against OpenSSL directly) and refuse what does not
open."""

from __future__ import annotations

import pytest

from meshd.protocol.crypto import ChaChaPolyKey, open_once, seal_once
from meshd.protocol.errors import RemoteProtocolError

from .harness import seeded_rng


@pytest.mark.parametrize("size", [0, 1, 32, 100, 65535])
@pytest.mark.parametrize("nonce", [0, 1, 2**40 + 3])
def test_the_same_bytes_as_the_transport_cipher(size: int, nonce: int) -> None:
    rng = seeded_rng(size * 7 + nonce % 97)
    key, ad, plaintext = rng(32), rng(64), rng(size)
    sealed = ChaChaPolyKey(key).encrypt(nonce, ad, plaintext)
    assert seal_once(key, nonce, ad, plaintext) == sealed
    assert seal_once(key, nonce, ad, bytearray(plaintext)) == sealed
    assert open_once(key, nonce, ad, sealed) == plaintext
    assert open_once(key, nonce, ad, bytearray(sealed)) == plaintext


@pytest.mark.parametrize("change", ["tag", "body", "ad", "nonce", "key", "short"])
def test_what_does_not_authenticate_is_refused(change: str) -> None:
    rng = seeded_rng(5)
    key, ad = rng(32), rng(64)
    sealed = bytearray(seal_once(key, 3, ad, b"payload"))
    nonce = 3
    if change == "tag":
        sealed[-1] ^= 1
    elif change == "body":
        sealed[0] ^= 1
    elif change == "ad":
        ad = ad[:-1] + bytes([ad[-1] ^ 1])
    elif change == "nonce":
        nonce = 4
    elif change == "key":
        key = rng(32)
    else:
        sealed = sealed[:15]
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        open_once(key, nonce, ad, bytes(sealed))
