"""The sans-IO channel: handshake, messages, fragments, rekey, timers, and bad input."""

from __future__ import annotations

import msgpack
import pytest

from meshd.protocol import channel as ch
from meshd.protocol.channel import (
    Channel,
    ConnectionClosed,
    HandshakeCompleted,
    Kind,
    MessageReceived,
    State,
    UnauthorizedPeer,
    XXHandshake,
)
from meshd.protocol.constants import (
    DEAD_AFTER_S,
    HANDSHAKE_TIMEOUT_S,
    KEEPALIVE_S,
    MAX_MESSAGE_BYTES,
    MAX_NONCE,
)
from meshd.protocol.crypto import DHKeyPair
from meshd.protocol.errors import LocalProtocolError, RemoteProtocolError

from .harness import ChannelPair, drain, seeded_rng


def test_handshake_authenticates_both_sides_and_agrees_on_the_hash() -> None:
    pair = ChannelPair()
    assert pair.deliver("alice", "bob") == []
    (alice_done,) = pair.deliver("bob", "alice")
    (bob_done,) = pair.deliver("alice", "bob")
    assert isinstance(alice_done, HandshakeCompleted) and isinstance(bob_done, HandshakeCompleted)
    assert alice_done.remote_static == pair.bob_static.public
    assert bob_done.remote_static == pair.alice_static.public
    assert alice_done.handshake_hash == bob_done.handshake_hash
    assert len(alice_done.handshake_hash) == 64
    assert pair.alice.state is State.OPEN and pair.bob.state is State.OPEN


def test_messages_flow_both_ways_in_order() -> None:
    pair = ChannelPair.handshaken()
    for i in range(5):
        pair.alice.send({"t": "test.ping", "i": i})
    pair.bob.send({"t": "test.pong", "b": b"\x00\xff"})
    got = pair.deliver("alice", "bob")
    assert [e.message["i"] for e in got if isinstance(e, MessageReceived)] == list(range(5))
    (pong,) = pair.deliver("bob", "alice")
    assert isinstance(pong, MessageReceived)
    assert pong.message == {"t": "test.pong", "b": b"\x00\xff"}


@pytest.mark.parametrize(
    "size", [0, ch.MAX_FRAGMENT_BYTES - 40, ch.MAX_FRAGMENT_BYTES, 3 * ch.MAX_FRAGMENT_BYTES + 7]
)
def test_large_messages_are_fragmented_and_reassembled(size: int) -> None:
    pair = ChannelPair.handshaken()
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pair.alice.send({"t": "test.blob", "body": body})
    wire = pair.alice.data_to_send()
    frames = _split_frames(wire)
    assert all(len(frame) <= 65535 for frame in frames)
    pair.bob.receive_data(wire)
    (event,) = drain(pair.bob)
    assert isinstance(event, MessageReceived) and event.message["body"] == body
    packed_len = len(msgpack.packb({"t": "test.blob", "body": body}))
    assert len(frames) == -(-packed_len // ch.MAX_FRAGMENT_BYTES)


def test_a_message_over_the_total_limit_is_refused_locally() -> None:
    pair = ChannelPair.handshaken()
    with pytest.raises(LocalProtocolError, match="larger than"):
        pair.alice.send({"t": "test.blob", "body": bytes(MAX_MESSAGE_BYTES)})
    assert pair.alice.state is State.OPEN  # the refused send changed nothing


def test_reassembly_is_bounded() -> None:
    pair = ChannelPair.handshaken()
    piece = bytes(ch.MAX_FRAGMENT_BYTES)
    for _ in range(MAX_MESSAGE_BYTES // len(piece) + 1):
        pair.alice._send_frame(Kind.MESSAGE_PART, piece)  # a peer that never ends a message
    with pytest.raises(RemoteProtocolError, match="reassembled message exceeds"):
        pair.deliver("alice", "bob")
    assert pair.bob.state is State.ERROR


def test_send_before_the_handshake_is_a_local_error() -> None:
    pair = ChannelPair()
    with pytest.raises(LocalProtocolError):
        pair.alice.send({"t": "test.too-early"})


def test_messages_must_be_maps_with_a_string_type() -> None:
    pair = ChannelPair.handshaken()
    for bad in ({"no": "type"}, {"t": 5}, ["t", "x"]):
        with pytest.raises(LocalProtocolError):
            pair.alice.send(bad)  # type: ignore[arg-type]


# ---- rekey and nonces ------------------------------------------------------------------


def test_rekey_after_a_bounded_number_of_messages() -> None:
    pair = ChannelPair.handshaken(rekey_after_messages=4)
    for i in range(10):
        pair.alice.send({"t": "test.n", "i": i})
    # 10 messages, and a REKEY marker before messages 5 and 9.
    assert pair.alice.messages_sent == 12
    got = pair.deliver("alice", "bob")
    assert [e.message["i"] for e in got if isinstance(e, MessageReceived)] == list(range(10))


def test_rekey_after_a_bounded_time_changes_the_key() -> None:
    pair = ChannelPair.handshaken(rekey_after_s=100.0)
    stale_receiver_cipher = _copy_cipher(pair.bob._receive_cipher)
    pair.alice.handle_timeout(KEEPALIVE_S)  # no rekey yet: only a keepalive
    pair.deliver("alice", "bob")
    now = KEEPALIVE_S
    while now < 100.0:
        now += KEEPALIVE_S
        pair.alice.handle_timeout(now)
        pair.bob.handle_timeout(now)
        pair.deliver("alice", "bob")
        pair.deliver("bob", "alice")
    pair.alice.send({"t": "test.after-rekey"})
    wire = pair.alice.data_to_send()
    (event,) = [e for e in _deliver_raw(pair.bob, wire) if isinstance(e, MessageReceived)]
    assert event.message == {"t": "test.after-rekey"}
    # The same frame does not open under the pre-rekey key at the right nonce.
    stale_receiver_cipher.set_nonce(pair.bob._receive_cipher.n - 1)
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        stale_receiver_cipher.decrypt_with_ad(b"", _split_frames(wire)[0])


def test_a_peer_that_never_rekeys_is_dropped() -> None:
    pair = ChannelPair.handshaken(rekey_after_messages=2)
    pair.alice._rekey_after_messages = 10**9  # a sender ignoring the bound
    for i in range(2 + ch.REKEY_SLACK_MESSAGES + 1):
        pair.alice.send({"t": "test.n", "i": i})
    with pytest.raises(RemoteProtocolError, match="did not rekey"):
        pair.deliver("alice", "bob")


def test_nonce_two_to_the_64_minus_one_is_never_used() -> None:
    pair = ChannelPair.handshaken()
    assert pair.alice._send_cipher is not None and pair.bob._receive_cipher is not None
    pair.alice._send_cipher.set_nonce(MAX_NONCE - 1)
    pair.bob._receive_cipher.set_nonce(MAX_NONCE - 1)
    pair.alice.send({"t": "test.last"})
    (event,) = pair.deliver("alice", "bob")
    assert isinstance(event, MessageReceived)
    with pytest.raises(LocalProtocolError, match="nonce space exhausted"):
        pair.alice.send({"t": "test.one-too-many"})
    with pytest.raises(RemoteProtocolError, match="nonce space"):
        pair.bob._receive_cipher.decrypt_with_ad(b"", bytes(32))


def test_a_failed_decryption_does_not_advance_the_nonce_and_ends_the_channel() -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.x"})
    wire = bytearray(pair.alice.data_to_send())
    wire[-1] ^= 1
    assert pair.bob._receive_cipher is not None
    nonce_before = pair.bob._receive_cipher.n
    pair.bob.receive_data(bytes(wire))
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        pair.bob.next_event()
    assert pair.bob._receive_cipher.n == nonce_before
    assert pair.bob.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        pair.bob.next_event()


# ---- timers ----------------------------------------------------------------------------


def test_keepalive_is_sent_when_idle_and_keeps_the_peer_alive() -> None:
    pair = ChannelPair.handshaken()
    now = 0.0
    for _ in range(20):  # 300 s of idleness, well past DEAD_AFTER_S
        now += KEEPALIVE_S
        for name in ("alice", "bob"):
            pair.side(name).handle_timeout(now)
        pair.deliver("alice", "bob")
        pair.deliver("bob", "alice")
    assert pair.alice.state is State.OPEN and pair.bob.state is State.OPEN
    assert pair.alice.messages_sent >= 10


def test_a_silent_peer_is_declared_dead() -> None:
    pair = ChannelPair.handshaken()
    now = 0.0
    with pytest.raises(RemoteProtocolError, match="silent"):
        while now < 10 * DEAD_AFTER_S:
            now += KEEPALIVE_S
            pair.alice.handle_timeout(now)  # bob never answers
    assert DEAD_AFTER_S < now <= DEAD_AFTER_S + 2 * KEEPALIVE_S


def test_a_stalled_handshake_times_out() -> None:
    pair = ChannelPair(now=1000.0)
    pair.deliver("alice", "bob")
    assert pair.bob.deadline == 1000.0 + HANDSHAKE_TIMEOUT_S
    pair.bob.handle_timeout(1000.0 + HANDSHAKE_TIMEOUT_S - 0.1)
    with pytest.raises(RemoteProtocolError, match="handshake not finished"):
        pair.bob.handle_timeout(1000.0 + HANDSHAKE_TIMEOUT_S)


# ---- close -----------------------------------------------------------------------------


def test_close_carries_a_reason_and_eof_closes_without_one() -> None:
    pair = ChannelPair.handshaken()
    pair.alice.close("removed from the circle")
    (event,) = pair.deliver("alice", "bob")
    assert event == ConnectionClosed("removed from the circle")
    other = ChannelPair.handshaken()
    other.bob.receive_data(b"")
    assert drain(other.bob) == [ConnectionClosed(None)]


# ---- bad input, each ending in a typed error -------------------------------------------


def test_eof_inside_a_frame_is_a_truncated_frame() -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.x"})
    wire = pair.alice.data_to_send()
    pair.bob.receive_data(wire[:-3])
    assert drain(pair.bob) == []
    pair.bob.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        pair.bob.next_event()


def test_eof_during_the_handshake() -> None:
    pair = ChannelPair()
    pair.bob.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="during the handshake"):
        pair.bob.next_event()


def test_a_length_prefix_past_the_handshake_limit_is_refused_before_buffering() -> None:
    pair = ChannelPair()
    pair.bob.receive_data(b"\xff\xff")  # only the prefix: nothing else has arrived
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        pair.bob.next_event()


def test_a_transport_frame_shorter_than_a_tag_is_refused() -> None:
    pair = ChannelPair.handshaken()
    pair.bob.receive_data(b"\x00\x05hello")
    with pytest.raises(RemoteProtocolError, match="too short"):
        pair.bob.next_event()


def test_a_replayed_handshake_message_cannot_complete_a_handshake() -> None:
    first = ChannelPair(seeded_rng(1))
    msg1 = first.alice.data_to_send()
    first.bob.receive_data(msg1)
    drain(first.bob)
    first.deliver("bob", "alice")
    msg3 = first.alice.data_to_send()
    # An attacker replays alice's messages 1 and 3 to a fresh responder with bob's key.
    replayed = Channel(
        XXHandshake(initiator=False, static=first.bob_static, rng=seeded_rng(2),
                    authorize=lambda key: True),
        now=0.0,
    )
    replayed.receive_data(msg1)
    assert drain(replayed) == []
    replayed.receive_data(msg3)
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        replayed.next_event()
    # And message 1 replayed inside a running handshake is garbage where msg3 is expected.
    second = ChannelPair(seeded_rng(3))
    second.deliver("alice", "bob")
    second.bob.receive_data(msg1)
    with pytest.raises(RemoteProtocolError):
        second.bob.next_event()


def test_a_replayed_transport_message_is_refused() -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.once"})
    wire = pair.alice.data_to_send()
    assert len(_deliver_raw(pair.bob, wire)) == 1
    pair.bob.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        pair.bob.next_event()


def test_reordered_transport_messages_are_refused() -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.first"})
    first = pair.alice.data_to_send()
    pair.alice.send({"t": "test.second"})
    second = pair.alice.data_to_send()
    pair.bob.receive_data(second + first)
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        pair.bob.next_event()


@pytest.mark.parametrize("offset", [2, 3, 20, -17, -1])
def test_a_tampered_ciphertext_is_refused(offset: int) -> None:
    pair = ChannelPair.handshaken()
    pair.alice.send({"t": "test.x", "body": b"payload"})
    wire = bytearray(pair.alice.data_to_send())
    wire[offset] ^= 0x40  # offsets past the 2-byte length prefix: first, tag, last
    pair.bob.receive_data(bytes(wire))
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        pair.bob.next_event()


def test_a_wrong_prologue_fails_the_handshake() -> None:
    rng = seeded_rng(4)
    alice_static, bob_static = DHKeyPair.generate(rng), DHKeyPair.generate(rng)
    alice = Channel(XXHandshake(initiator=True, static=alice_static, rng=rng,
                                authorize=lambda k: True, prologue=b"meshd/2"), now=0.0)
    bob = Channel(XXHandshake(initiator=False, static=bob_static, rng=rng,
                              authorize=lambda k: True), now=0.0)
    bob.receive_data(alice.data_to_send())
    drain(bob)
    alice.receive_data(bob.data_to_send())
    with pytest.raises(RemoteProtocolError, match="bad MAC"):
        alice.next_event()


def test_an_unknown_responder_is_refused_before_the_initiator_reveals_itself() -> None:
    pair = ChannelPair(alice_accepts=lambda key: False)
    pair.deliver("alice", "bob")
    with pytest.raises(UnauthorizedPeer, match="not authorised"):
        pair.deliver("bob", "alice")
    assert pair.alice.data_to_send() == b""  # message 3, with alice's static key, never left


def test_an_unknown_initiator_is_refused_before_any_message() -> None:
    pair = ChannelPair(bob_accepts=lambda key: False)
    pair.deliver("alice", "bob")
    pair.deliver("bob", "alice")
    pair.alice.send({"t": "test.sneaky"})
    with pytest.raises(UnauthorizedPeer):
        pair.deliver("alice", "bob")
    assert pair.bob.state is State.ERROR


def test_an_unknown_kind_byte_is_refused() -> None:
    pair = ChannelPair.handshaken()
    pair.alice._send_frame(9, b"")  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError, match="unknown transport message kind"):
        pair.deliver("alice", "bob")


@pytest.mark.parametrize(
    "body",
    [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"x": 1}), msgpack.packb({"t": 7}),
     msgpack.packb({1: "int key"})],
    ids=["invalid-msgpack", "array", "no-type", "int-type", "int-key"],
)
def test_malformed_application_messages_are_refused(body: bytes) -> None:
    pair = ChannelPair.handshaken()
    pair.alice._send_frame(Kind.MESSAGE, body)
    with pytest.raises(RemoteProtocolError):
        pair.deliver("alice", "bob")


def test_the_noise_message_limit_is_enforced_by_us() -> None:
    pair = ChannelPair.handshaken()
    with pytest.raises(LocalProtocolError, match="65535"):
        pair.alice._send_frame(Kind.MESSAGE, bytes(65519))  # 1 + 65519 + 16 > 65535
    fresh = ChannelPair()
    with pytest.raises(RemoteProtocolError, match="65535"):
        fresh.bob._handshake._state.read_message(bytes(65536))  # type: ignore[attr-defined]


# ---- helpers ---------------------------------------------------------------------------


def _split_frames(wire: bytes) -> list[bytes]:
    frames, offset = [], 0
    while offset < len(wire):
        length = int.from_bytes(wire[offset : offset + 2], "big")
        frames.append(wire[offset + 2 : offset + 2 + length])
        offset += 2 + length
    return frames


def _deliver_raw(receiver: Channel, wire: bytes) -> list[object]:
    receiver.receive_data(wire)
    return list(drain(receiver))


def _copy_cipher(cipher: object) -> object:
    import copy

    return copy.copy(cipher)
