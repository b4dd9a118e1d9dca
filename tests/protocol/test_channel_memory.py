"""What a channel holds once a large message is sent: nothing sized by that message (issue 20).

msgpack's Packer grows its buffer to fit the largest message it packed and never shrinks it; a
channel that kept one packer for its life held 1-2x its largest message ever sent, one mmap'd
chunk per connection (the relay's RSS rose in 4 MB steps in the 30-minute soak: fetch pages of
up to 4 MiB, manifests and segments sent to long-lived connections). Bytes held are counted
with tracemalloc, which sees the packer's buffer (PyMem_Malloc), never with a clock.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator

import pytest

from meshd.protocol.channel import MessageReceived
from meshd.protocol.messages import KEEP_PACKER_BYTES

from .harness import ChannelPair

MiB = 1 << 20
# What a channel may keep between messages whatever it sent: its reused packer's buffer for
# messages up to KEEP_PACKER_BYTES (msgpack doubles it when it grows), and change.
HELD_BOUND = 2 * KEEP_PACKER_BYTES + 64 * 1024


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def held_since(base: int) -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - base


@pytest.mark.parametrize("count", [1, 4])
def test_sending_large_messages_leaves_no_buffer_behind(traced: None, count: int) -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.small", "i": 0})  # the packer a connection keeps, made
    pair.alice.take_data_to_send()
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    for size in [MiB] * count + [4 * MiB]:
        pair.alice.send({"t": "relay.segment", "blob": b"\x01" * size})
        pair.alice.take_data_to_send()  # written out: the channel keeps no copy
    assert held_since(base) < HELD_BOUND
    pair.alice.send({"t": "test.small", "i": 1})  # and sending goes on as before
    pair.alice.take_data_to_send()
    assert held_since(base) < HELD_BOUND


def test_small_messages_keep_one_packer_and_large_ones_arrive_whole() -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.small", "i": 0})
    packer = pair.alice._packer  # noqa: SLF001 - reused for small messages (no packer per send)
    assert packer is not None
    pair.alice.send({"t": "test.small", "i": 1})
    assert pair.alice._packer is packer  # noqa: SLF001
    blob = bytes(range(256)) * (KEEP_PACKER_BYTES // 128)
    pair.alice.send({"t": "relay.segment", "blob": blob})
    pair.alice.send({"t": "test.small", "i": 2})
    got = [e.message for e in pair.deliver("alice", "bob") if isinstance(e, MessageReceived)]
    assert got == [{"t": "test.small", "i": 0}, {"t": "test.small", "i": 1},
                   {"t": "relay.segment", "blob": blob}, {"t": "test.small", "i": 2}]
