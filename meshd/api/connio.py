"""One API connection's socket I/O, with its deadlines, at no timer's cost when the socket is ready.

Theory of operation. Every request on a keep-alive API connection is one receive and one
send, each bounded (a client that trickles its request or stops reading its answer must not
pin a task). The obvious way, a trio.move_on_after around trio's SocketStream methods, costs
a cancel scope per call plus the stream's and the trio socket's layers (a conflict detector,
an error-translating generator, a generic non-blocking helper; meshd/net/streamio.py has the
count): about a fifth of the trio thread's time per write under 16 writers (issue 16). A
call the socket can complete at once needs no deadline, because it cannot wait. So:

- send_all() first hands the whole answer to the standard-library socket under the stream.
  Answers are small and the socket's buffer is nearly always free: done, with no timer and
  no schedule point (the connection's next receive is one, so a busy connection still gives
  other tasks their turn). Whatever the socket did not take is sent by the stream's own
  send_all under the deadline, as before.
- receive_some() first tries the socket at once: data (or b"" for a closed peer) is returned
  after a schedule point, as trio's own receive does. Only a socket with nothing to read is
  waited on (wait_readable, a cancel and schedule point), under the deadline.
  Two reads skip that schedule point: a new connection's first (its task was only just
  scheduled; accept.py) and one that finds the client gone (b"": the connection ends and
  its task with it, which is a turn for the others anyway). A new-connection request then
  costs its task one step, plus one for the client's close (issue 20).
- Both are cancel points first (trio.lowlevel.checkpoint_if_cancelled). Socket errors become
  the stream's errors (streamio.stream_error), which the server already treats as a client
  gone. A stream that is neither a plain socket stream nor accept.py's UnixStream is used
  through its own methods.

Neither returns early for a timeout by raising: the caller gets False or None and answers it
(408 for a request, a dropped connection for a send), as it did with move_on_after.
"""

from __future__ import annotations

import trio
from trio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled, wait_readable

from ..net.streamio import raw_socket, stream_error
from .accept import UnixStream


class ConnectionIO:
    """send_all and receive_some of one connection's stream, each with a deadline."""

    __slots__ = ("stream", "_raw", "_receive_bytes", "_fresh")

    def __init__(self, stream: trio.SocketStream | UnixStream, receive_bytes: int) -> None:
        self.stream = stream
        self._raw = stream.socket if isinstance(stream, UnixStream) else raw_socket(stream)
        self._receive_bytes = receive_bytes
        self._fresh = True  # no read yet: the first needs no schedule point after it

    async def send_all(self, data: bytes, within_seconds: float) -> bool:
        """Send all of data; False if the client did not take it within within_seconds."""
        raw = self._raw
        if raw is not None:
            await checkpoint_if_cancelled()
            try:
                sent = raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as err:
                raise stream_error(err) from err
            if sent == len(data):
                return True
            data = data[sent:]
        with trio.move_on_after(within_seconds):
            await self.stream.send_all(data)
            return True
        return False

    async def receive_some(self, within_seconds: float) -> bytes | None:
        """The next bytes from the client (b"": it closed its end); None if none came within
        within_seconds."""
        raw = self._raw
        if raw is None:
            with trio.move_on_after(within_seconds):
                return bytes(await self.stream.receive_some(self._receive_bytes))
            return None
        await checkpoint_if_cancelled()
        try:
            data = raw.recv(self._receive_bytes)
        except BlockingIOError:
            pass
        except OSError as err:
            raise stream_error(err) from err
        else:
            if data and not self._fresh:  # (module docstring: which reads skip it)
                await cancel_shielded_checkpoint()
            self._fresh = False
            return data
        self._fresh = False
        with trio.move_on_after(within_seconds):
            while True:
                await wait_readable(raw)
                try:
                    return raw.recv(self._receive_bytes)
                except BlockingIOError:
                    continue
                except OSError as err:
                    raise stream_error(err) from err
        return None
