"""The local API's HTTP/1.1 server: one h11 connection per client, bounded, on trio.

Theory of operation. One task per connection drives an h11.Connection: read until a
complete Request, check it (caller's uid, size), ask `dispatch` for the endpoint and parsed
request (which raises ApiError 400/404/405 for a bad target), read the body (bounded), call
the endpoint, send the response, and loop for keep-alive. An ApiError becomes its JSON error
answer. Every other exception from an endpoint is a bug: logged once, answered with 500
"internal" and never propagated, so a bad request cannot take the daemon down. Limits
(header bytes, body bytes, header and body timeouts, concurrent connections) are enforced
here, before any daemon code runs. An EventStream result becomes a chunked NDJSON stream of
the daemon's events (eventstream.py). What the endpoints are is api.py's business, not this module's.

Plain requests (a GET/POST/PUT/DELETE with ordinary headers and a Content-Length body or none:
what apps writing records, and monitors polling GET /v1/status, send) skip h11: http1.py
reads their head, serve_fast() makes the same checks in the same order and answers with the
bytes h11 would write. The first request that is not plain, or whose endpoint streams (GET
/v1/events), hands the connection to h11 for good. While a batch request is in the
daemon, the next request on its connection is read and its body decoded (pipeline.py); the
socket I/O costs no timer when the socket is ready (connio.py). On a unix listener the
server accepts connections itself (accept.py): a request on a new connection, as curl or a
simple client sends it, costs little more than one on a kept-alive connection.

Who may connect: the socket file's mode and group are the first gate (apisocket.py); the
second is the caller's uid read with SO_PEERCRED, checked against allowed_uids (plus root
and the daemon's own uid) and allowed_gids (a primary group, or a group listing the
caller's user name).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from functools import partial
from http import HTTPStatus
from typing import Any

import h11
import trio

from ..containment import report_bug
from ..errors import Refusal
from ..excgroup import stopping_and_bugs
from ..quietlog import QuietLogger
from .accept import UnixStream, serve_unix, unix_listening_socket
from .callers import caller_is_allowed, peer_credentials
from .connio import ConnectionIO
from .errors import api_error
from .eventstream import ConnectionOver as _Closed
from .eventstream import EventStreaming, Subscribe
from .http1 import cached_head, plain_response_head, response_head
from .pipeline import Ahead, Dispatch, Endpoint, ReadAhead, preparer, read_ahead
from .values import (
    ApiError,
    EventStream,
    Request,
    Response,
    error_response,
    json_response,
)

# The name these lines were logged under before the server left api.py: journal filters
# and logging configs that match "meshd.api" keep working.
log = logging.getLogger("meshd.api")
_quiet = QuietLogger(log)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
HEADER_TIMEOUT = 10.0  # a client that trickles its headers (slow loris) is cut off
BODY_TIMEOUT = 30.0
SEND_TIMEOUT = 30.0  # a client that stops reading is dropped instead of pinning a task
MAX_CONNECTIONS = 128
RECEIVE_BYTES = 64 * 1024

# Endpoint: Request -> Response | EventStream. Dispatch: (method, target) -> the endpoint and
# its parsed request; raises ApiError for a bad target. (Both defined in pipeline.py.)
# Subscribe: the event bus's subscribe (eventstream.py).


# --- one connection ----------------------------------------------------------------------

ApiStream = trio.SocketStream | UnixStream  # accept.py's for a unix listener


class _Connection(EventStreaming):
    def __init__(self, stream: ApiStream, dispatch: Dispatch, subscribe: Subscribe,
                 allowed: bool) -> None:
        self.stream = stream
        self.io = ConnectionIO(stream, RECEIVE_BYTES)
        self.dispatch = dispatch
        self.subscribe = subscribe
        self.allowed = allowed
        self._h11: h11.Connection | None = None  # built when first needed (conn)
        # Bytes received for the fast path (http1.py), not given to h11. Once a request
        # needs h11, h11 gets them and serves the rest of the connection.
        self.buffer = bytearray()
        self.fast = True
        self.ahead: Ahead | None = None  # the next request, read and prepared (pipeline.py)

    @property
    def conn(self) -> h11.Connection:
        """The connection's h11 state, built on first use: a connection served by the fast
        path alone (a new connection per write, as curl sends it) never needs one (~6 us)."""
        if self._h11 is None:
            self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        return self._h11

    async def send(self, *events: Any) -> None:
        """One write for all of events (a whole response is one syscall, not three)."""
        await self.send_bytes(b"".join(self.conn.send(event) or b"" for event in events))

    async def send_bytes(self, data: bytes) -> None:
        if data and not await self.io.send_all(data, SEND_TIMEOUT):
            raise _Closed

    async def next_event(self, within_seconds: float) -> Any:
        deadline = math.inf
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if deadline == math.inf:
                deadline = trio.current_time() + within_seconds
            data = await self.io.receive_some(max(0.0, deadline - trio.current_time()))
            if data is None:
                raise ApiError(408, "timeout", "the request took too long to arrive")
            self.conn.receive_data(data)

    async def respond(self, response: Response) -> None:
        headers = [("content-type", response.content_type),
                   ("content-length", str(len(response.body))), *response.headers]
        if self.conn.their_state is not h11.DONE:
            headers.append(("connection", "close"))  # an unread body: the connection can't be reused
        await self.send(h11.Response(status_code=response.status, headers=headers,
                                     reason=HTTPStatus(response.status).phrase.encode()),
                        h11.Data(data=response.body), h11.EndOfMessage())

    async def run(self) -> None:
        while True:
            try:
                if self.fast and await self.serve_fast():
                    continue
                await self.serve_one()
            except ApiError as err:
                if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                    return
                await self.respond(error_response(err.status, err.code, err.message, err.headers))
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    async def serve_one(self) -> None:
        try:
            request_event = await self.next_event(HEADER_TIMEOUT)
        except h11.RemoteProtocolError as err:
            status = err.error_status_hint
            code = "headers-too-large" if status == 431 else "bad-request"
            raise ApiError(status, code, f"malformed HTTP request: {err}") from None
        if isinstance(request_event, h11.ConnectionClosed):
            raise _Closed
        if not isinstance(request_event, h11.Request):
            raise ApiError(400, "bad-request", "expected an HTTP request")
        # h11 bounds only a head that is still incomplete; one that arrived whole is checked here.
        head_bytes = len(request_event.target) + sum(len(n) + len(v) + 4 for n, v in request_event.headers)
        if head_bytes > MAX_HEADER_BYTES:
            raise ApiError(431, "headers-too-large", f"the request head exceeds {MAX_HEADER_BYTES} bytes")
        if not self.allowed:
            raise ApiError(403, "forbidden", "this user may not use the meshd API "
                           "(for the system service, join the 'meshd' group)")
        try:
            endpoint, request = self.dispatch(request_event.method.decode("ascii"),
                                              request_event.target.decode("ascii"))
        except UnicodeDecodeError:
            raise ApiError(400, "bad-request", "the request line is not ASCII") from None
        request.body = await self.read_body(request_event)
        result = await self.call(endpoint, request)
        if isinstance(result, EventStream):
            await self.stream_events(result)
        else:
            await self.respond(result)

    @staticmethod
    async def call(endpoint: Endpoint, request: Request) -> Response | EventStream:
        try:
            return await endpoint(request)
        except ApiError:
            raise
        except Refusal as err:  # the daemon's refusal: its status comes from the one table
            raise api_error(err) from None
        except Exception as err:  # a bug in the daemon: never let it reach the nursery
            report_bug("api", err)
            raise ApiError(500, "internal", "internal error in meshd; its log has the details") from None

    # -- the fast path: plain requests without h11 (http1.py), same checks, same answers --

    async def serve_fast(self) -> bool:
        """Serve one plain request (http1.parse_head) without h11; False: the request is not
        plain, and h11 gets the bytes read so far, this request and the rest of the
        connection. Checks and answers are serve_one's, in the same order."""
        if not self.buffer:  # (connio.py: no timer unless the socket has nothing yet)
            data = await self.io.receive_some(HEADER_TIMEOUT)
            if data is None:  # h11 has seen nothing: serve_one's answer for this
                raise ApiError(408, "timeout", "the request took too long to arrive")
            if not data:
                raise _Closed
            self.buffer += data
        head = cached_head(self.buffer, MAX_HEADER_BYTES)
        if head is None:
            self.fast = False
            self.conn.receive_data(bytes(self.buffer))
            self.buffer.clear()
            return False
        try:
            if not self.allowed:
                raise ApiError(403, "forbidden", "this user may not use the meshd API "
                               "(for the system service, join the 'meshd' group)")
            endpoint, request = self.dispatch(head.method, head.target)
            if head.content_length > MAX_BODY_BYTES:
                raise ApiError(413, "too-large", f"the request body exceeds {MAX_BODY_BYTES} bytes")
            end = head.size + head.content_length
            if len(self.buffer) < end:  # (most bodies came with their head: no timer for those)
                deadline = trio.current_time() + BODY_TIMEOUT  # for the whole body, as read_body
                while len(self.buffer) < end:
                    data = await self.io.receive_some(max(0.0, deadline - trio.current_time()))
                    if data is None:
                        raise ApiError(408, "timeout", "the request body took too long to arrive")
                    if not data:
                        raise _Closed
                    self.buffer += data
        except ApiError as err:  # the body is unread: answer, then close, as serve_one does
            await self.respond_fast(error_response(err.status, err.code, err.message, err.headers),
                                    close=True)
            raise _Closed from None
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead.starts(self.buffer, end):
            request.prepared = ahead.prepared  # this very request, prepared while the last committed
            request.body = ahead.body
        else:
            with memoryview(self.buffer) as view:  # (one copy: a slice, then bytes(), is two)
                request.body = bytes(view[head.size:end])
        read = bytes(self.buffer[:end]) if head.method == "GET" else b""  # (a GET may stream)
        del self.buffer[:end]
        try:
            if preparer(endpoint) is not None:
                result = await self.call_reading_ahead(endpoint, request)
            else:
                result = await self.call(endpoint, request)
            if isinstance(result, EventStream):  # GET /v1/events; it ends its connection, as in run()
                await self.stream_after_fast(read, result, head.method)
                raise _Closed
        except ApiError as err:
            result = error_response(err.status, err.code, err.message, err.headers)
        await self.respond_fast(result, close=False)
        return True

    async def stream_after_fast(self, read: bytes, wanted: EventStream, method: str) -> None:
        """stream_events() for a GET served so far by serve_fast: h11 reads its bytes (all
        here: nothing is awaited) and serves the rest of the connection."""
        if method != "GET":  # only a GET streams (protocol/api.md)
            report_bug("api", TypeError(f"an event stream answering {method}"))
            raise ApiError(500, "internal", "internal error in meshd; its log has the details")
        self.fast = False
        self.conn.receive_data(read)
        for _ in range(3):  # the Request, its body's Data if it has one, EndOfMessage
            if isinstance(self.conn.next_event(), h11.EndOfMessage):
                await self.stream_events(wanted)
                return
        raise AssertionError("h11 read a plain request otherwise")  # a bug: _handle reports it

    async def call_reading_ahead(self, endpoint: Endpoint, request: Request) -> Response | EventStream:
        """call(), while the next request is read and prepared beside it (pipeline.py)."""
        state = ReadAhead()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(read_ahead, state, self.io, self.buffer, self.dispatch,
                                       max_header_bytes=MAX_HEADER_BYTES, max_body_bytes=MAX_BODY_BYTES))
            try:
                result = await self.call(endpoint, request)
            except ApiError as err:  # (not raised out of the nursery: it would be grouped)
                result = error_response(err.status, err.code, err.message, err.headers)
            finally:
                if not state.preparing:
                    nursery.cancel_scope.cancel()
        self.ahead = state.ahead
        return result

    async def respond_fast(self, response: Response, *, close: bool) -> None:
        if not close and not response.headers:  # the usual answer: its head is cached
            head = plain_response_head(response.status, response.content_type, len(response.body))
        else:
            headers = [("content-type", response.content_type),
                       ("content-length", str(len(response.body))), *response.headers]
            if close:
                headers.append(("connection", "close"))
            head = response_head(response.status, headers)
        await self.send_bytes(head + response.body)

    async def read_body(self, request_event: h11.Request) -> bytes:
        for name, value in request_event.headers:
            if name == b"content-length" and int(value) > MAX_BODY_BYTES:
                raise ApiError(413, "too-large", f"the request body exceeds {MAX_BODY_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(BODY_TIMEOUT):  # for the whole body, so trickling does not help
            while True:
                try:
                    event = await self.next_event(math.inf)
                except h11.RemoteProtocolError as err:
                    raise ApiError(400, "bad-request", f"malformed HTTP body: {err}") from None
                if isinstance(event, h11.EndOfMessage):
                    return b"".join(chunks)
                if isinstance(event, h11.ConnectionClosed):
                    raise _Closed
                size += len(event.data)
                if size > MAX_BODY_BYTES:
                    raise ApiError(413, "too-large", f"the request body exceeds {MAX_BODY_BYTES} bytes")
                chunks.append(event.data)
        raise ApiError(408, "timeout", "the request body took too long to arrive")


async def _handle(stream: ApiStream, dispatch: Dispatch, subscribe: Subscribe,
                  allowed_uids: Collection[int], allowed_gids: Collection[int],
                  active: list[int]) -> None:
    """Serve one connection; its caller closes the stream."""
    if active[0] >= MAX_CONNECTIONS:
        body = json_response({"error": {"code": "busy", "message": "too many API connections"}}).body
        head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        with trio.move_on_after(1), _suppress_disconnect():
            await stream.send_all(head + body)
        return
    active[0] += 1
    try:
        pid, uid, gid = peer_credentials(stream.socket)
        allowed = caller_is_allowed(uid, gid, allowed_uids, allowed_gids)
        if not allowed:
            _quiet.warning(("refused", uid), "refused API caller uid %d (pid %d)", uid, pid)
        with _suppress_disconnect():
            await _Connection(stream, dispatch, subscribe, allowed).run()
    except Exception as err:
        report_bug("api", err)
    except BaseExceptionGroup as group:  # the daemon stopping as a connection's task failed
        # Cancelled alone goes on (the stream's close would replace the group with a fresh
        # Cancelled anyway, losing the bug silently); the bug is reported as ever.
        stopping, bugs = stopping_and_bugs(group, _DISCONNECTS)
        if bugs is not None:
            report_bug("api", bugs)
        assert stopping is not None  # (a group of errors only is an Exception: above)
        raise stopping from None
    finally:
        active[0] -= 1


class _suppress_disconnect:
    """Clients vanish mid-request all the time; that is not an error worth a log line."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        return isinstance(exc, _DISCONNECTS)


_DISCONNECTS = (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError,
                h11.RemoteProtocolError)


async def serve_http(listener: trio.SocketListener, dispatch: Dispatch, subscribe: Subscribe, *,
                     allowed_uids: Collection[int], allowed_gids: Collection[int],
                     task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve HTTP on listener until cancelled. Never raises for anything a client does."""
    active = [0]
    uids, gids = frozenset(allowed_uids), frozenset(allowed_gids)
    listening = unix_listening_socket(listener)
    if listening is None:  # not a unix socket: trio's own loop (it closes each stream after us)
        async def handler(stream: trio.SocketStream) -> None:
            async with stream:
                await _handle(stream, dispatch, subscribe, uids, gids, active)

        await trio.serve_listeners(handler, [listener], task_status=task_status)
        return

    async def unix_handler(stream: UnixStream) -> None:
        try:
            await _handle(stream, dispatch, subscribe, uids, gids, active)
        finally:
            stream.close()  # once, with no checkpoint: the task ends here (accept.py)

    async with trio.open_nursery() as nursery:
        task_status.started([listener])  # (what trio.serve_listeners reports)
        async with listener:  # closed when accepting ends, as trio.serve_listeners does
            await serve_unix(listening, unix_handler, nursery)
