"""Channel.drain_messages: next_event() for shells that only queue messages."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from meshd.protocol.channel import NEED_DATA, ConnectionClosed, State
from meshd.protocol.errors import LocalProtocolError, RemoteProtocolError

from .harness import ChannelPair


def test_drain_gives_the_messages_next_event_gives_in_order_then_need_data() -> None:
    pair = ChannelPair.handshaken()
    for i in range(5):
        pair.alice.send({"t": "test.ping", "i": i, "b": bytes([i]) * 70_000})  # fragments too
    pair.bob.receive_data(pair.alice.data_to_send())
    out: deque[dict[str, Any]] = deque()
    assert pair.bob.drain_messages(out) is NEED_DATA
    assert [(m["t"], m["i"], len(m["b"])) for m in out] == [("test.ping", i, 70_000) for i in range(5)]
    assert pair.bob.messages_received == 10  # two frames per message


def test_drain_stops_at_an_event_that_is_not_a_message_and_resumes_after_it() -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.before"})
    pair.alice.close("bye")
    pair.bob.receive_data(pair.alice.data_to_send())
    out: deque[dict[str, Any]] = deque()
    assert pair.bob.drain_messages(out) == ConnectionClosed("bye")
    assert list(out) == [{"t": "test.before"}]
    assert pair.bob.drain_messages(out) is NEED_DATA
    assert pair.bob.state is State.CLOSED


def test_drain_raises_for_bad_input_and_leaves_the_channel_in_error() -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.ok"})
    pair.alice.send({"t": "test.tampered"})
    wire = bytearray(pair.alice.data_to_send())
    wire[-1] ^= 0x40
    pair.bob.receive_data(bytes(wire))
    out: deque[dict[str, Any]] = deque()
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        pair.bob.drain_messages(out)
    assert list(out) == [{"t": "test.ok"}]  # what came before the bad frame was delivered
    assert pair.bob.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        pair.bob.drain_messages(out)


def test_a_message_then_eof_gives_the_message_then_connection_closed() -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.last"})
    pair.bob.receive_data(pair.alice.data_to_send())
    pair.bob.receive_data(b"")
    out: deque[dict[str, Any]] = deque()
    assert pair.bob.drain_messages(out) == ConnectionClosed(None)
    assert list(out) == [{"t": "test.last"}]


def test_a_partial_frame_after_a_message_waits_for_the_rest() -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.one"})
    pair.alice.send({"t": "test.two"})
    wire = pair.alice.data_to_send()
    out: deque[dict[str, Any]] = deque()
    pair.bob.receive_data(wire[:-5])
    assert pair.bob.drain_messages(out) is NEED_DATA
    assert list(out) == [{"t": "test.one"}]
    pair.bob.receive_data(wire[-5:])
    assert pair.bob.drain_messages(out) is NEED_DATA
    assert list(out) == [{"t": "test.one"}, {"t": "test.two"}]
