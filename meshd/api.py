"""The local API: HTTP/1.1 with JSON over a unix socket, on h11 and trio.

Theory of operation. One task per connection drives an h11.Connection: read until a
complete Request, check it (caller's uid, size, route), read the body (bounded), call the
handler from ROUTES, send the response, and loop for keep-alive. Handlers are thin: they
validate arguments and call a DaemonControl method; the daemon raises ApiError(status, code,
message) for anything the caller should see. Every other exception is a bug: logged once,
answered with 500 "internal" and never propagated, so a bad request cannot take the daemon
down. Limits (header bytes, body bytes, header and body timeouts, concurrent connections) are
enforced here, before any daemon code runs. The reference for clients is protocol/api.md.

Who may connect: the socket file's mode and group are the first gate; the second is the
caller's uid read with SO_PEERCRED, checked against allowed_uids (plus root and the daemon's
own uid) and allowed_gids (a primary group, or a group listing the caller's user name).
"""

from __future__ import annotations

import base64
import binascii
import errno
import grp
import json
import logging
import math
import os
import pwd
import socket
import stat
import struct
import traceback
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from .events import EventBus, Subscription
from .metrics import Registry
from .quietlog import QuietLogger
from .sdnotify import listeners_from_systemd

__all__ = ["ApiError", "ApiSocketError", "DaemonControl", "ROUTES", "listeners_from_systemd",
           "open_unix_listener", "serve_api"]

log = logging.getLogger(__name__)
_quiet = QuietLogger(log)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
HEADER_TIMEOUT = 10.0  # a client that trickles its headers (slow loris) is cut off
BODY_TIMEOUT = 30.0
SEND_TIMEOUT = 30.0  # a client that stops reading is dropped instead of pinning a task
MAX_CONNECTIONS = 128
HEARTBEAT_SECONDS = 15.0
RECEIVE_BYTES = 64 * 1024
DEFAULT_READ_LIMIT = 100
MAX_READ_LIMIT = 1000


class ApiError(Exception):
    """An error the caller should see: HTTP status, a stable code, a message saying what to do."""

    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


class ApiSocketError(Exception):
    """The API socket cannot be opened (in use by a live daemon, not a socket, bad group...)."""


class DaemonControl(Protocol):
    """What the API needs from the daemon (meshd/daemon.py implements it)."""

    events: EventBus
    metrics: Registry

    def status(self) -> dict[str, Any]: ...
    def peers(self) -> list[dict[str, Any]]: ...
    def devices(self) -> list[dict[str, Any]]: ...
    async def invite(self) -> dict[str, Any]: ...
    async def join(self, code: str, address: str | None = None,
                   relay: str | None = None) -> dict[str, Any]: ...
    async def remove(self, device: str) -> dict[str, Any]: ...
    async def recovery_key(self) -> dict[str, Any]: ...
    async def recover(self, words: list[str], relay: str) -> dict[str, Any]: ...
    def relays(self) -> list[dict[str, Any]]: ...
    async def add_relay(self, address: str) -> dict[str, Any]: ...
    async def write(self, stream: str, record_id: str | None, body: bytes) -> dict[str, Any]: ...
    def read(self, stream: str, after: str | None, limit: int) -> dict[str, Any]: ...
    async def delete(self, stream: str, record_id: str) -> dict[str, Any]: ...
    def streams(self) -> list[dict[str, Any]]: ...


# --- requests, responses and the route table ---------------------------------------------

@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    params: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad-json", "the request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise ApiError(400, "bad-json", "the request body must be a JSON object")
        return value


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class EventStream:
    """Not a response yet: the connection turns it into a chunked NDJSON stream."""

    types: frozenset[str] | None


Handler = Callable[[DaemonControl, Request], Awaitable["Response | EventStream"]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: tuple[str, ...]  # path segments; "{name}" captures one segment
    handler: Handler

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.pattern):
            return None
        params = {}
        for want, got in zip(self.pattern, segments, strict=True):
            if want.startswith("{"):
                if not got:
                    return None
                params[want[1:-1]] = unquote(got, errors="strict")
            elif want != got:
                return None
        return params


ROUTES: list[Route] = []


def route(method: str, path: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        ROUTES.append(Route(method, tuple(path.strip("/").split("/")), handler))
        return handler
    return register


def _jsonable(value: Any, key: str = "") -> Any:
    """JSON for daemon results: a bytes "body" becomes text or body_b64, other bytes hex."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == "body" and isinstance(v, bytes | bytearray):
                try:
                    out["body"] = bytes(v).decode("utf-8")
                except UnicodeDecodeError:
                    out["body_b64"] = base64.b64encode(v).decode("ascii")
            else:
                out[str(k)] = _jsonable(v, str(k))
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return value


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(_jsonable(value), separators=(",", ":")).encode() + b"\n")


def error_response(status: int, code: str, message: str,
                   headers: list[tuple[str, str]] | None = None) -> Response:
    response = json_response({"error": {"code": code, "message": message}}, status)
    response.headers = headers or []
    return response


def _string_field(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, "invalid-argument", f'"{name}" must be a non-empty string')
    return value


# --- handlers: argument checks, then one DaemonControl call ------------------------------

@route("GET", "/v1/status")
async def _status(control: DaemonControl, request: Request) -> Response:
    return json_response(control.status())


@route("GET", "/v1/peers")
async def _peers(control: DaemonControl, request: Request) -> Response:
    return json_response({"peers": control.peers()})


@route("GET", "/v1/devices")
async def _devices(control: DaemonControl, request: Request) -> Response:
    return json_response({"devices": control.devices()})


@route("POST", "/v1/invite")
async def _invite(control: DaemonControl, request: Request) -> Response:
    return json_response(await control.invite())


@route("POST", "/v1/join")
async def _join(control: DaemonControl, request: Request) -> Response:
    body = request.json()
    code = _string_field(body, "code")
    assert code is not None
    # "address" (HOST:PORT of the inviter's pairing port) is for networks without mDNS.
    address = _string_field(body, "address", required=False)
    relay = _string_field(body, "relay", required=False)
    if address or relay:  # (the fake daemon of the API tests takes only the code)
        return json_response(await control.join(code.strip(), address and address.strip(),
                                                relay and relay.strip()))
    return json_response(await control.join(code.strip()))


@route("POST", "/v1/devices/{device}/remove")
@route("DELETE", "/v1/devices/{device}")
async def _remove(control: DaemonControl, request: Request) -> Response:
    return json_response(await control.remove(request.params["device"]))


@route("POST", "/v1/recovery-key")
async def _recovery_key(control: DaemonControl, request: Request) -> Response:
    return json_response(await control.recovery_key())


@route("POST", "/v1/recover")
async def _recover(control: DaemonControl, request: Request) -> Response:
    body = request.json()
    words = body.get("words")
    if isinstance(words, str):
        words = words.split()
    if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
        # Never echo the words: they are the circle's last-resort secret.
        raise ApiError(400, "invalid-argument", '"words" must be a list of words (or one string)')
    relay = _string_field(body, "relay", required=False) or ""
    return json_response(await control.recover([w.strip().lower() for w in words], relay))


@route("GET", "/v1/relays")
async def _relays(control: DaemonControl, request: Request) -> Response:
    return json_response({"relays": control.relays()})


@route("POST", "/v1/relays")
async def _add_relay(control: DaemonControl, request: Request) -> Response:
    address = _string_field(request.json(), "address")
    assert address is not None
    return json_response(await control.add_relay(address.strip()))


@route("GET", "/v1/streams")
async def _streams(control: DaemonControl, request: Request) -> Response:
    return json_response({"streams": control.streams()})


@route("POST", "/v1/streams/{stream}/records")
async def _write(control: DaemonControl, request: Request) -> Response:
    body = request.json()
    record_id = _string_field(body, "id", required=False)
    if ("body" in body) == ("body_b64" in body):
        raise ApiError(400, "invalid-argument", 'give exactly one of "body" (text) or "body_b64"')
    if "body" in body:
        if not isinstance(body["body"], str):
            raise ApiError(400, "invalid-argument", '"body" must be a string (use "body_b64" for bytes)')
        data = body["body"].encode("utf-8")
    else:
        try:
            data = base64.b64decode(body["body_b64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ApiError(400, "invalid-argument", '"body_b64" is not valid base64') from None
    return json_response(await control.write(request.params["stream"], record_id, data), 201)


@route("GET", "/v1/streams/{stream}/records")
async def _read(control: DaemonControl, request: Request) -> Response:
    limit_text = request.arg("limit")
    limit = DEFAULT_READ_LIMIT
    if limit_text is not None:
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_READ_LIMIT:
            raise ApiError(400, "invalid-argument", f"limit must be an integer from 1 to {MAX_READ_LIMIT}")
        limit = int(limit_text)
    return json_response(control.read(request.params["stream"], request.arg("after") or None, limit))


@route("DELETE", "/v1/streams/{stream}/records/{id}")
async def _delete(control: DaemonControl, request: Request) -> Response:
    return json_response(await control.delete(request.params["stream"], request.params["id"]))


@route("GET", "/v1/events")
async def _events(control: DaemonControl, request: Request) -> EventStream:
    text = request.arg("types") or ""
    types = frozenset(t.strip() for t in text.split(",") if t.strip())
    return EventStream(types or None)


@route("GET", "/metrics")
async def _metrics(control: DaemonControl, request: Request) -> Response:
    return Response(200, control.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")


def resolve(method: str, target: str) -> tuple[Handler, Request]:
    """The handler and parsed request for a request line; raises ApiError 400/404/405."""
    try:
        parts = urlsplit(target)
        segments = parts.path.strip("/").split("/")
        query = parse_qs(parts.query, keep_blank_values=True, errors="strict")
        allowed = []
        for candidate in ROUTES:
            params = candidate.match(segments)
            if params is None:
                continue
            if candidate.method == method:
                return candidate.handler, Request(method, parts.path, query, params)
            allowed.append(candidate.method)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad-request", "the request target is not a valid URL") from None
    if allowed:
        methods = ", ".join(sorted(set(allowed)))
        raise ApiError(405, "method-not-allowed", f"{parts.path} accepts {methods}",
                       [("allow", methods)])
    raise ApiError(404, "not-found", f"no such endpoint: {parts.path} (see protocol/api.md)")


# --- who is calling -----------------------------------------------------------------------

def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    size = struct.calcsize("3i")
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))
    return pid, uid, gid


def caller_is_allowed(uid: int, gid: int, allowed_uids: Collection[int],
                      allowed_gids: Collection[int]) -> bool:
    if uid == 0 or uid == os.geteuid() or uid in allowed_uids or gid in allowed_gids:
        return True
    if not allowed_gids:
        return False
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    for group in allowed_gids:
        try:
            if name in grp.getgrgid(group).gr_mem:
                return True
        except KeyError:
            continue
    return False


# --- one connection ----------------------------------------------------------------------

class _Closed(Exception):
    """The connection is over (client gone, timed out, or must close): stop quietly."""


class _Connection:
    def __init__(self, stream: trio.SocketStream, control: DaemonControl, allowed: bool) -> None:
        self.stream = stream
        self.control = control
        self.allowed = allowed
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            with trio.move_on_after(SEND_TIMEOUT) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                raise _Closed

    async def next_event(self, within_seconds: float) -> Any:
        with trio.move_on_after(within_seconds):
            while True:
                event = self.conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                self.conn.receive_data(await self.stream.receive_some(RECEIVE_BYTES))
        raise ApiError(408, "timeout", "the request took too long to arrive")

    async def respond(self, response: Response) -> None:
        headers = [("content-type", response.content_type),
                   ("content-length", str(len(response.body))), *response.headers]
        if self.conn.their_state is not h11.DONE:
            headers.append(("connection", "close"))  # an unread body: the connection can't be reused
        await self.send(h11.Response(status_code=response.status, headers=headers,
                                     reason=HTTPStatus(response.status).phrase.encode()))
        await self.send(h11.Data(data=response.body))
        await self.send(h11.EndOfMessage())

    async def run(self) -> None:
        while True:
            try:
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
            handler, request = resolve(request_event.method.decode("ascii"),
                                       request_event.target.decode("ascii"))
        except UnicodeDecodeError:
            raise ApiError(400, "bad-request", "the request line is not ASCII") from None
        request.body = await self.read_body(request_event)
        try:
            result = await handler(self.control, request)
        except ApiError:
            raise
        except Exception as err:  # a bug in the daemon: never let it reach the nursery
            _quiet.warning(("internal", request.path, type(err).__name__),
                           "API %s %s failed (a bug in meshd):\n%s", request.method, request.path,
                           "".join(traceback.format_exception(err)).rstrip())
            raise ApiError(500, "internal", "internal error in meshd; its log has the details") from None
        if isinstance(result, EventStream):
            await self.stream_events(result)
        else:
            await self.respond(result)

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

    async def stream_events(self, wanted: EventStream) -> None:
        """Chunked NDJSON until the client hangs up; subscribed before the headers go out."""
        async with self.control.events.subscribe(wanted.types) as subscription:
            await self.send(h11.Response(status_code=200, headers=[
                ("content-type", "application/x-ndjson"), ("cache-control", "no-store"),
                ("connection", "close")]))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cancel_on_hangup, nursery.cancel_scope)
                nursery.start_soon(self._pump_events, subscription, nursery.cancel_scope)

    async def _pump_events(self, subscription: Subscription, scope: trio.CancelScope) -> None:
        # Heartbeats make a vanished client fail a send within HEARTBEAT_SECONDS, and tell a
        # client that a quiet stream is still alive.
        try:
            while True:
                line: dict[str, Any] = {"type": "heartbeat"}
                with trio.move_on_after(HEARTBEAT_SECONDS):
                    event = await subscription.next()
                    line = {"id": event.id, "type": event.type, "data": event.data}
                payload = json.dumps(_jsonable(line), separators=(",", ":")).encode() + b"\n"
                await self.send(h11.Data(data=payload))
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _cancel_on_hangup(self, scope: trio.CancelScope) -> None:
        try:
            while await self.stream.receive_some(RECEIVE_BYTES):
                pass  # nothing more is expected from an events client; discard it
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def _handle(stream: trio.SocketStream, control: DaemonControl, allowed_uids: Collection[int],
                  allowed_gids: Collection[int], active: list[int]) -> None:
    async with stream:
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
                await _Connection(stream, control, allowed).run()
        except Exception as err:
            _quiet.warning(("connection-bug", type(err).__name__), "API connection failed (a bug):\n%s",
                           "".join(traceback.format_exception(err)).rstrip())
        finally:
            active[0] -= 1


class _suppress_disconnect:
    """Clients vanish mid-request all the time; that is not an error worth a log line."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, _Closed | trio.BrokenResourceError | trio.ClosedResourceError):
            return True
        return isinstance(exc, h11.LocalProtocolError | h11.RemoteProtocolError)


async def serve_api(control: DaemonControl, listener: trio.SocketListener, *,
                    allowed_uids: Collection[int], allowed_gids: Collection[int] = (),
                    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API on listener until cancelled. Never raises for anything a client does."""
    active = [0]

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, control, frozenset(allowed_uids), frozenset(allowed_gids), active)

    await trio.serve_listeners(handler, [listener], task_status=task_status)


# --- the socket file ----------------------------------------------------------------------

UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


async def _socket_answers(path: Path) -> bool:
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        with trio.move_on_after(2):
            try:
                await probe.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                return False
            return True
        return True  # a live daemon with a full backlog: still not ours to delete


async def open_unix_listener(path: Path | str, mode: int = 0o600, group: str | None = None,
                             backlog: int = 128) -> trio.SocketListener:
    """Bind the API socket at path with the given mode (and group), atomically.

    A leftover socket file is replaced only after a connect to it is refused; if a daemon
    answers there, raises ApiSocketError rather than stealing its socket. The socket is bound
    under a temporary name, given its mode and group, then renamed into place, so it is never
    reachable with looser permissions.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(temporary)) > UNIX_PATH_MAX:
        raise ApiSocketError(f"{path}: path too long for a unix socket (keep it under ~90 bytes)")
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ApiSocketError(f"socket group {group!r} does not exist (create it, or unset socket_group)") from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750 if group else 0o700)
    try:
        existing = path.lstat()
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ApiSocketError(f"{path} exists and is not a socket; move it away")
        if await _socket_answers(path):
            raise ApiSocketError(f"another meshd is already serving on {path}; stop it first")
        path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        temporary.unlink(missing_ok=True)
        await sock.bind(str(temporary))
        os.chmod(temporary, mode)
        if gid != -1:
            os.chown(temporary, -1, gid)
        os.rename(temporary, path)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        temporary.unlink(missing_ok=True)
        if err.errno in (errno.EACCES, errno.EPERM):
            raise ApiSocketError(f"cannot create {path}: {err.strerror}") from None
        raise
    return trio.SocketListener(sock)
