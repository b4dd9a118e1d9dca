"""One encrypted connection as a sans-IO state machine: framing, handshake, transport.

Theory of operation. Bytes from the network go into receive_data(); next_event() turns them
into events until it returns NEED_DATA; anything the machine wants to send (handshake
messages, application messages, keepalives, rekeys) accumulates in an outbox that
data_to_send() drains. Two rules keep a shell correct:

  Rule 1: after every call into a Channel, drain data_to_send().
  Rule 2: after receive_data(), call next_event() until it returns NEED_DATA.

Every frame on the wire is a 2-byte big-endian length and that many bytes of one Noise
message. The connection starts in HANDSHAKE, driven by a HandshakePhase (handshake.py:
meshd's XX; pairing and the device port supply their own). Then every transport message's
plaintext is one kind byte and a body (see protocol/channel.md for the table): an application
message (a msgpack map with a string "t"), a fragment of a larger one, a keepalive, a rekey
marker or a close; messages.py decodes and checks application messages. Time enters only
through the constructor and handle_timeout(now); the timers (handshake deadline, keepalive, dead peer, rekey by time) tick every KEEPALIVE_S.

Any exception while processing received bytes leaves the channel in ERROR (terminal) and
surfaces as RemoteProtocolError: bad input is the peer's fault by definition.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from .channelevents import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    HandshakeCompleted,
    Kind,
    MessageReceived,
    NeedData,
    State,
)
from .constants import (  # the framing limits too (wire bounds, named there)
    DEAD_AFTER_S,
    HANDSHAKE_TIMEOUT_S,
    KEEPALIVE_S,
    LENGTH_PREFIX_BYTES,
    MAX_CLOSE_REASON_BYTES,
    MAX_FRAGMENT_BYTES,
    MAX_HANDSHAKE_FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_NOISE_MESSAGE_BYTES,
    MIN_TRANSPORT_FRAME_BYTES,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_S,
    REKEY_SLACK_MESSAGES,
    TAG_BYTES,
)
from .crypto import SODIUM_MAX_BYTES, PublicKey
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .handshake import (
    HandshakePhase,
    HandshakeResult,
    UnauthorizedPeer,
    XXHandshake,
    handshake_result,
)
from .messages import KEEP_PACKER_BYTES, decode_message, encode_message, new_packer
from .noise import CipherState

# Names from channelevents.py, handshake.py and messages.py, importable from here too.
__all__ = [
    "NEED_DATA", "Channel", "ConnectionClosed", "Event", "HandshakeCompleted", "HandshakePhase",
    "HandshakeResult", "Kind", "MessageReceived", "NeedData", "State", "UnauthorizedPeer",
    "XXHandshake", "decode_message", "encode_message", "handshake_result", "new_packer",
    "MAX_CLOSE_REASON_BYTES", "MAX_FRAGMENT_BYTES", "MAX_HANDSHAKE_FRAME_BYTES",
    "MIN_TRANSPORT_FRAME_BYTES", "REKEY_SLACK_MESSAGES",
]

_Result = TypeVar("_Result")

# Hot-path globals: each kind byte prebuilt; states and a kind (an Enum member costs ~4x this);
# frames up to _SMALL_FRAME bytes are encrypted to bytes and copied (issue 16: 1.7 against 2.2 us);
# received ones up to _COPY_FRAME are copied out (libsodium opens bytes in 1.07 us, a view in 2.0).
_KIND_PREFIX, _SMALL_FRAME = [bytes((value,)) for value in range(256)], 4096
_COPY_FRAME = SODIUM_MAX_BYTES + TAG_BYTES
_HANDSHAKE, _OPEN, _CLOSED, _MESSAGE = State.HANDSHAKE, State.OPEN, State.CLOSED, Kind.MESSAGE


class Channel:
    """One connection: framing, a handshake phase, then encrypted messages with timers.

    Raises RemoteProtocolError (from receive_data/next_event/handle_timeout) when the peer
    misbehaved or timed out, LocalProtocolError when called wrongly; anything else is a bug.
    """

    def __init__(
        self,
        handshake: HandshakePhase,
        *,
        now: float,
        rekey_after_messages: int = REKEY_AFTER_MESSAGES,
        rekey_after_s: float = REKEY_AFTER_S,
    ) -> None:
        self.state = State.HANDSHAKE
        self._rekey_after_messages = rekey_after_messages
        self._rekey_after_s = rekey_after_s
        self._handshake = handshake
        # Unconsumed bytes start at _buffer[_offset:]. Frames are read in place (views; small ones
        # copied: _COPY_FRAME), the consumed prefix dropped once per receive_data(); a chunk is
        # adopted uncopied if it can.
        self._buffer: bytes | bytearray = b""
        self._offset = 0
        self._outbox: list[bytes | bytearray] = []
        self._eof = False
        self._completed_event: HandshakeCompleted | None = None
        self._send_cipher: CipherState | None = None
        self._receive_cipher: CipherState | None = None
        self.remote_static: PublicKey | None = None
        self.handshake_hash = b""
        self._fragments, self._fragmenting = bytearray(), False
        self._packer: msgpack.Packer | None = None  # made on the first send()
        # Timers: one tick every KEEPALIVE_S once open; the handshake has its own deadline.
        self._created_at = now
        self._handshake_deadline = now + HANDSHAKE_TIMEOUT_S
        self._next_tick = math.inf
        self._sent_since_tick = False
        self._silent_ticks = 0
        self._last_send_rekey_at = now
        self._sent_since_rekey = self._received_since_rekey = 0
        self.messages_sent = self.messages_received = 0
        self._guard(lambda: self._queue_handshake(handshake.initial_frames(), now))

    # -- public API --

    @property
    def deadline(self) -> float:
        """When handle_timeout() should next be called (math.inf when nothing is due)."""
        if self.state is State.HANDSHAKE:
            return self._handshake_deadline
        if self.state is State.OPEN:
            return self._next_tick
        return math.inf

    def receive_data(self, data: bytes | bytearray) -> None:
        """Buffer bytes from the peer; b"" means the peer closed its side (EOF)."""
        if self.state is State.ERROR:
            raise LocalProtocolError("channel is in ERROR")
        if not data:
            self._eof = True
            return
        buffer = self._buffer
        if self._offset == len(buffer) and type(data) is bytes:
            self._buffer = data  # immutable: safe to keep without a copy
        elif type(buffer) is bytearray:
            del buffer[: self._offset]  # O(1) for a prefix: CPython moves the start pointer
            buffer += data
        else:
            pending = bytearray(memoryview(buffer)[self._offset :])
            pending += data
            self._buffer = pending
        self._offset = 0

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Raises RemoteProtocolError for bad input."""
        event = self._guard(self._next_event)
        return MessageReceived(event) if isinstance(event, dict) else event

    def drain_messages(self, out: deque[dict[str, Any]]) -> Event | NeedData:
        """next_event() until NEED_DATA or an event other than MessageReceived, each message on
        the way appended to out (no event object per message; one call per receive_data())."""
        return self._guard(self._drain, out.append)  # no closure: once per read

    def send(self, message: dict[str, Any]) -> None:
        """Queue one application message (fragmented if larger than one Noise message)."""
        if self.state is not _OPEN:
            raise LocalProtocolError(f"cannot send in state {self.state.name}")
        packer, self._packer = self._packer or new_packer(), None  # see KEEP_PACKER_BYTES
        packed = encode_message(message, packer)
        if len(packed) <= KEEP_PACKER_BYTES:
            self._packer = packer
        if len(packed) <= MAX_FRAGMENT_BYTES:
            self._send_frame(_MESSAGE, packed)  # _send_packed's common case, one call less
        else:
            self._send_packed(packed)

    def send_packed(self, packed: bytes) -> None:
        """Queue an already-encoded message (callers that pack once and send to many)."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send in state {self.state.name}")
        self._send_packed(packed)

    def close(self, reason: str = "") -> None:
        """Queue a CLOSE with a reason for the peer's log and stop accepting messages."""
        if self.state is State.OPEN:
            self._send_frame(Kind.CLOSE, reason.encode()[:MAX_CLOSE_REASON_BYTES])
        if self.state is not State.ERROR:
            self.state = State.CLOSED

    def handle_timeout(self, now: float) -> None:
        """Run due timers. Raises RemoteProtocolError when the peer stalled or went silent."""
        self._guard(lambda: self._handle_timeout(now))

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._outbox)

    def data_to_send(self) -> bytes:
        return bytes(self.take_data_to_send())  # bytes(b) is b itself: a copy only of a bytearray

    def take_data_to_send(self) -> bytes | bytearray:
        """data_to_send() without the copy into bytes: for shells that only write it out."""
        outbox = self._outbox
        if not outbox:
            return b""
        out = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        outbox.clear()
        return out

    # -- internals --

    def _guard(self, action: Callable[..., _Result], *args: Any) -> _Result:
        if self.state is State.ERROR:
            raise LocalProtocolError("channel is in ERROR")
        try:
            return action(*args)
        except LocalProtocolError as err:
            self.state = State.ERROR
            raise err._reraise_as_remote_protocol_error() from err
        except ProtocolError:
            self.state = State.ERROR
            raise

    def _queue_handshake(self, messages: list[bytes], now: float) -> None:
        for message in messages:
            self._outbox.append(len(message).to_bytes(LENGTH_PREFIX_BYTES, "big") + message)
        if self._handshake.done and self.state is State.HANDSHAKE:
            result = self._handshake.result()
            self._send_cipher = result.send_cipher
            self._receive_cipher = result.receive_cipher
            self.remote_static = result.remote_static
            self.handshake_hash = result.handshake_hash
            self.state = State.OPEN
            self._next_tick = now + KEEPALIVE_S
            self._last_send_rekey_at = now
            self._completed_event = HandshakeCompleted(result.remote_static, result.handshake_hash)

    def _drain(self, append: Callable[[dict[str, Any]], None]) -> Event | NeedData:
        while type(event := self._next_event()) is dict:
            append(event)
            if self._offset == len(self._buffer) and not self._eof:
                return NEED_DATA  # all read (the common case): no pass to find that out
        return event  # type: ignore[return-value]  # not a dict: an Event or NEED_DATA

    def _next_frame(self) -> bytes | bytearray | memoryview | None:
        """The next whole frame's body, a copy when small, else a view into the receive buffer
        (use it before the next receive_data()), or None when more bytes are needed."""
        buffer, start = self._buffer, self._offset
        available = len(buffer) - start
        if available < LENGTH_PREFIX_BYTES:
            if self._eof and available:
                raise RemoteProtocolError("connection closed in the middle of a length prefix")
            return None
        length = (buffer[start] << 8) | buffer[start + 1]
        state = self.state
        if state is _OPEN:
            if length < MIN_TRANSPORT_FRAME_BYTES:
                raise RemoteProtocolError(f"transport frame of {length} bytes is too short")
        elif state is _HANDSHAKE:
            if length > MAX_HANDSHAKE_FRAME_BYTES:
                raise RemoteProtocolError(
                    f"handshake frame of {length} bytes exceeds {MAX_HANDSHAKE_FRAME_BYTES}"
                )
            if length == 0:
                raise RemoteProtocolError("empty handshake frame")
        end = start + LENGTH_PREFIX_BYTES + length
        if len(buffer) < end:
            if self._eof:
                raise RemoteProtocolError("connection closed in the middle of a frame")
            return None
        self._offset, body = end, start + LENGTH_PREFIX_BYTES
        return buffer[body:end] if length <= _COPY_FRAME else memoryview(buffer)[body:end]

    def _next_event(self) -> dict[str, Any] | Event | NeedData:
        """The next event, with a message as its bare dict (next_event wraps it)."""
        while True:
            if self._completed_event is not None:
                event, self._completed_event = self._completed_event, None
                return event
            if self.state is _CLOSED:
                return NEED_DATA
            frame = self._next_frame()
            if frame is None:
                if self._eof:
                    if self.state is State.HANDSHAKE:
                        raise RemoteProtocolError("connection closed during the handshake")
                    self.state = State.CLOSED
                    return ConnectionClosed(None)
                return NEED_DATA
            self._silent_ticks = 0
            if self.state is _HANDSHAKE:
                # The responder completes here with no clock at hand: its first tick is
                # counted from the connection's start, which is early, never late.
                self._queue_handshake(self._handshake.on_frame(bytes(frame)), self._created_at)
                continue
            received = self._on_transport_frame(frame)
            if received is not None:
                return received

    def _on_transport_frame(
            self, frame: bytes | bytearray | memoryview) -> dict[str, Any] | Event | None:
        assert self._receive_cipher is not None
        plaintext = self._receive_cipher.decrypt_with_ad(b"", frame)
        self.messages_received += 1
        self._received_since_rekey += 1
        if self._received_since_rekey > self._rekey_after_messages + REKEY_SLACK_MESSAGES:
            raise RemoteProtocolError("peer did not rekey within the bound")
        kind, body = plaintext[0], memoryview(plaintext)[1:]
        if kind == _MESSAGE:
            if self._fragmenting:
                self._append_fragment(body)
                whole, self._fragments, self._fragmenting = self._fragments, bytearray(), False
                return decode_message(whole)
            return decode_message(body)
        if kind == Kind.MESSAGE_PART:
            self._fragmenting = True
            self._append_fragment(body)
            return None
        if kind == Kind.KEEPALIVE:
            return None
        if kind == Kind.REKEY:
            self._receive_cipher.rekey()
            self._received_since_rekey = 0
            return None
        if kind == Kind.CLOSE:
            self.state = State.CLOSED
            return ConnectionClosed(bytes(body).decode("utf-8", "replace"))
        raise RemoteProtocolError(f"unknown transport message kind {kind}")

    def _append_fragment(self, body: memoryview) -> None:
        if len(self._fragments) + len(body) > MAX_MESSAGE_BYTES:
            raise RemoteProtocolError(f"reassembled message exceeds {MAX_MESSAGE_BYTES} bytes")
        self._fragments += body

    def _send_packed(self, packed: bytes) -> None:
        if len(packed) <= MAX_FRAGMENT_BYTES:
            self._send_frame(Kind.MESSAGE, packed)
            return
        view = memoryview(packed)
        last = len(packed) - MAX_FRAGMENT_BYTES
        for start in range(0, len(packed), MAX_FRAGMENT_BYTES):
            kind = Kind.MESSAGE if start >= last else Kind.MESSAGE_PART
            self._send_frame(kind, view[start : start + MAX_FRAGMENT_BYTES])

    def _send_frame(self, kind: Kind, body: bytes | memoryview) -> None:
        cipher = self._send_cipher
        assert cipher is not None
        if self._sent_since_rekey >= self._rekey_after_messages:
            self._rekey_send()
        plaintext = _KIND_PREFIX[kind] + body
        ciphertext_len = len(plaintext) + TAG_BYTES
        if ciphertext_len > MAX_NOISE_MESSAGE_BYTES:
            raise LocalProtocolError("transport message would exceed 65535 bytes")
        if ciphertext_len <= _SMALL_FRAME:  # copying is cheaper than a buffer and a view
            prefix = ciphertext_len.to_bytes(LENGTH_PREFIX_BYTES, "big")
            self._outbox.append(prefix + cipher.encrypt_with_ad(b"", plaintext))
        else:  # built in place: length prefix, then the ciphertext encrypted into it
            frame = bytearray(LENGTH_PREFIX_BYTES + ciphertext_len)
            frame[0], frame[1] = ciphertext_len >> 8, ciphertext_len & 0xFF
            cipher.encrypt_into(b"", plaintext, memoryview(frame)[LENGTH_PREFIX_BYTES:])
            self._outbox.append(frame)
        self._sent_since_tick = True
        self._sent_since_rekey += 1
        self.messages_sent += 1

    def _rekey_send(self) -> None:
        # The REKEY marker itself goes under the old key; everything after under Rekey(k).
        self._sent_since_rekey = 0
        self._send_frame(Kind.REKEY, b"")
        assert self._send_cipher is not None
        self._send_cipher.rekey()
        self._sent_since_rekey = 0

    def _handle_timeout(self, now: float) -> None:
        if self.state is State.HANDSHAKE:
            if now >= self._handshake_deadline:
                raise RemoteProtocolError(f"handshake not finished within {HANDSHAKE_TIMEOUT_S:g} s")
            return
        if self.state is not State.OPEN or now < self._next_tick:
            return
        self._next_tick = now + KEEPALIVE_S
        self._silent_ticks += 1
        # The peer sends at least every 2 ticks, so this leaves a full tick of slack.
        if self._silent_ticks * KEEPALIVE_S > DEAD_AFTER_S:
            raise RemoteProtocolError(f"peer silent for {DEAD_AFTER_S:g} s")
        if now - self._last_send_rekey_at >= self._rekey_after_s:
            self._last_send_rekey_at = now
            self._rekey_send()
        if not self._sent_since_tick:
            self._send_frame(Kind.KEEPALIVE, b"")
        self._sent_since_tick = False
