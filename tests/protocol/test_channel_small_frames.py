"""Received transport frames reach the cipher as bytes when small (libsodium opens bytes in
about half the time it opens a view of them: issue 16) and as views of the receive buffer when
large (no copy of a 64 KiB frame), from a bytes or a bytearray buffer, with the same messages."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from meshd.protocol.channel import NEED_DATA
from meshd.protocol.crypto import SODIUM_MAX_BYTES
from meshd.protocol.noise import CipherState

from .harness import ChannelPair


class _Spy:
    """Wraps the receive cipher, recording the type of each ciphertext it is given."""

    def __init__(self, inner: CipherState) -> None:
        self.inner, self.seen = inner, list[type]()

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
        self.seen.append(type(ciphertext))
        return self.inner.decrypt_with_ad(ad, ciphertext)


def _spy_on(pair: ChannelPair) -> _Spy:
    assert pair.bob._receive_cipher is not None
    spy = _Spy(pair.bob._receive_cipher)
    pair.bob._receive_cipher = spy  # type: ignore[assignment]  # only decrypt_with_ad is called
    return spy


@pytest.mark.parametrize("split", [False, True])  # True: the buffer becomes a bytearray
def test_small_frames_are_copied_out_and_large_ones_viewed(split: bool) -> None:
    pair = ChannelPair.handshaken()
    spy = _spy_on(pair)
    sizes = [10, SODIUM_MAX_BYTES - 40, SODIUM_MAX_BYTES + 100, 60_000]
    for index, size in enumerate(sizes):
        pair.alice.send({"t": "test.size", "i": index, "b": b"x" * size})
    wire = pair.alice.data_to_send()
    out: deque[dict[str, Any]] = deque()
    if split:
        pair.bob.receive_data(wire[:1])
        assert pair.bob.drain_messages(out) is NEED_DATA
        wire = wire[1:]
    pair.bob.receive_data(wire)
    assert pair.bob.drain_messages(out) is NEED_DATA
    assert [(m["i"], len(m["b"])) for m in out] == list(enumerate(sizes))
    small = bytearray if split else bytes
    assert spy.seen == [small, small, memoryview, memoryview]
