"""One device connection at the relay: its state, its send queue and the task that sends it.

The task reading a connection's requests never sends: answers, pushes and pipe frames go
into the connection's bounded queue, and one sending task per connection writes them, then
what its subscriptions have new (read back from storage, so nothing committed is skipped).
A device that reads nothing while it keeps sending requests fills its queue: the relay then
closes it, rather than wait on it (protocol/relay.md "Connections"). The queue is bounded in
bytes too: while a connection's queued answers hold MAX_QUEUED_BYTES or more, the relay reads
none of its next requests until some are sent (backpressure: no answer is dropped).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from ..net.transport import SecureConnection
from ..protocol.relay import MAX_FETCH_BYTES, MAX_FETCH_ITEMS, envelopes_frame
from ..protocol.relaysession import Connection

# A device that does not read what we send for this long is dropped (it holds our memory).
SEND_TIMEOUT_S = 30.0
# Frames queued for one connection and not yet sent (answers, pushes, pipe frames): past
# this the relay closes the connection. A device waits for its answers (the relay client
# has a request or two in flight per task), so only one that stopped reading gets here.
MAX_QUEUED_FRAMES = 256
# Bytes of answers and pushes queued for one connection: at or past this the relay reads no
# more of its requests until some are sent. 256 frames alone let a device that pipelines
# large reads (4 MiB segments and fetch pages) and reads slowly make the relay hold up to
# 1 GiB for it (issue 20). Two 4 MiB pages keep a pipelining device's link busy; one
# connection holds at most this plus the answer to the request it was reading then.
MAX_QUEUED_BYTES = 8 * 1024 * 1024
# relay.pipe frames queued for one connection; past this the relay stops reading from the
# other end of the pipe until some are sent (at most 16 x 64 KiB per direction in memory).
MAX_PIPE_FRAMES_QUEUED = 16
QUEUE_FULL = "send queue full"

# (circle id, mailbox, after, limit, max_bytes) -> (items, more): a storage read
ReadAfter = Callable[[bytes, bytes, int, int, int], Awaitable[tuple[list[tuple[int, bytes]], bool]]]


@dataclass(eq=False, kw_only=True)
class RelayConnection(Connection):
    """One connection and what the relay knows about it."""

    connection: SecureConnection
    scope: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None
    # What the sender task has to do: frames to send, and whether to read subscriptions.
    answers: list[dict[str, Any]] = field(default_factory=list)
    # frame_bytes() of the answers and pushes in `answers` and the one being sent (pipe
    # frames are bounded apart); reading waits on queue_room at MAX_QUEUED_BYTES or more.
    queued_bytes: int = 0
    queue_room: trio.Event = field(default_factory=trio.Event)
    push_due: bool = False
    wakeup: trio.Event = field(default_factory=trio.Event)
    # Deposits queued for a commit; past MAX_DEPOSITS_IN_FLIGHT, reading this connection
    # waits for commits (the storage's pace, not the device's).
    deposits_in_flight: int = 0
    room: trio.Event = field(default_factory=trio.Event)
    # relay.pipe frames in `answers` not yet sent; the other end waits on pipe_room past
    # MAX_PIPE_FRAMES_QUEUED.
    pipe_queued: int = 0
    pipe_room: trio.Event = field(default_factory=trio.Event)
    finish: bool = False  # close the connection once the queued frames are sent
    overflowed: bool = False  # its queue filled up: closed without a goodbye
    # The reason the relay's CLOSE carries when the relay ends the connection (channel.md:
    # CLOSE tells the peer why): the relay.error code that ended it, or what ended it.
    close_reason: str = ""
    # A join passed on to the relay process holding the offer (relay/proxy.py).
    upstream: SecureConnection | None = None

    def answer_nowait(self, frame: dict[str, Any]) -> None:
        """Queue a frame; never waits. A full queue ends the connection."""
        if self.overflowed:
            return
        if len(self.answers) - self.pipe_queued >= MAX_QUEUED_FRAMES:
            self.overflowed = True
            self.close_reason = QUEUE_FULL
            self.queued_bytes -= sum(frame_bytes(f) for f in self.answers if f["t"] != "relay.pipe")
            self.answers.clear()
            self.stop()
            return
        if frame["t"] != "relay.pipe":
            self.queued_bytes += frame_bytes(frame)
        self.answers.append(frame)
        self.wakeup.set()

    async def wait_for_room(self) -> None:
        """Return once the queued answers hold less than MAX_QUEUED_BYTES."""
        while self.queued_bytes >= MAX_QUEUED_BYTES:
            self.queue_room = trio.Event()
            await self.queue_room.wait()

    def push_nowait(self) -> None:
        self.push_due = True
        self.wakeup.set()

    def stop(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    def finish_within(self, seconds: float) -> None:
        """Close once the queue is sent, and at the latest after seconds."""
        self.finish = True
        self.wakeup.set()
        if self.scope is not None:
            self.scope.deadline = min(self.scope.deadline, trio.current_time() + seconds)

    async def send(self, frame: dict[str, Any]) -> None:
        try:
            with trio.fail_after(SEND_TIMEOUT_S):
                await self.connection.send(frame)
        except trio.TooSlowError:
            # A frame may be half written: nothing more can be said on this stream.
            await trio.aclose_forcefully(self.connection.stream)
            # Said in the error (a bare TooSlowError reads "dropped: " in the log, and its
            # quiet-log key would be shared with every other timeout's).
            raise trio.TooSlowError(f"it read nothing for {SEND_TIMEOUT_S:g} s") from None

    async def send_loop(self, read_after: ReadAfter) -> NoReturn:
        """Send queued frames, then subscribed mailboxes' new envelopes."""
        while True:
            await self.wakeup.wait()
            self.wakeup = trio.Event()
            while self.answers:
                await self._send_queued()
            if self.finish:
                self.stop()  # everything queued was sent, pipe_close included
                await trio.sleep_forever()
            if self.push_due:
                self.push_due = False
                await self._push(read_after)

    async def _send_queued(self) -> None:
        # A method of its own so that nothing sent stays referenced once it returns: the
        # sender waiting for more kept its last batch (a segment, a 4 MiB page; issue 20).
        answers, self.answers = self.answers, []
        answers.reverse()  # popped in order: each frame is let go once sent
        while answers:
            frame = answers.pop()
            await self.send(frame)
            if frame["t"] == "relay.pipe":
                self.pipe_queued -= 1
                self.pipe_room.set()
            else:
                self.queued_bytes -= frame_bytes(frame)
                if self.queued_bytes < MAX_QUEUED_BYTES:
                    self.queue_room.set()

    async def _push(self, read_after: ReadAfter) -> None:
        assert self.circle_id is not None
        for mailbox in list(self.subscriptions):
            if self.finish:
                return  # closing: what is queued goes first, then the connection ends
            if mailbox in self.notify_only:
                # A hint (relay.envelopes, no items, more) when an envelope is stored after
                # the last one hinted at: the device fetches what it can take.
                items, _ = await read_after(self.circle_id, mailbox, self.subscriptions[mailbox], 1, 1)
                if items and mailbox in self.subscriptions:
                    self.subscriptions[mailbox] = items[0][0]
                    await self.send(envelopes_frame(None, mailbox, [], True))
                continue
            more = True
            while more and mailbox in self.subscriptions and not self.finish:
                items, more = await read_after(self.circle_id, mailbox, self.subscriptions[mailbox],
                                               MAX_FETCH_ITEMS, MAX_FETCH_BYTES)
                if not items:
                    break
                self.subscriptions[mailbox] = items[-1][0]
                await self.send(envelopes_frame(None, mailbox, items, more))
                del items  # not held while the next page is read


def frame_bytes(value: Any) -> int:
    """About the bytes a frame holds in memory: its byte and text strings, 8 per other value."""
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, dict):
        return sum(frame_bytes(k) + frame_bytes(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(frame_bytes(item) for item in value) + 8
    return 8
