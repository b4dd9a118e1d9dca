"""The local API's vocabulary: its routes, their handlers, and what they ask of the daemon.

Theory of operation. ROUTES, built from one table at the end of this file, maps a method and
path to a handler and to its access, which the routes enforce (endpoint()):

- R, a read: the handler is handed a ReadOnlyView of the daemon, which has only ReadControl's
  methods, so a read route cannot change anything even by mistake;
- W, a write: refused with 409 not-a-member while this device is not a member of its
  circle (removed: protocol/circle.md, "Removal notice"), before the handler runs;
- WX, a write that is a way back into a circle (join, recover, remove with the recovery
  words): open to a removed device; the daemon checks the rest.

resolve() finds the route and parses the request for httpserver.py, which owns the HTTP/1.1
side (limits, timeouts, who may connect, the event stream). Handlers are thin: they
validate arguments and call a DaemonControl method; the daemon raises a kind of Refusal
(meshd/errors.py), which errors.py maps to its status. serve_api() ties the routes to a
DaemonControl and serves them on a listener, usually one from open_unix_listener()
(unixsocket.py). The reference for clients is protocol/api.md.

ApiError, ApiSocketError and open_unix_listener live in values.py and unixsocket.py and are
re-exported here, where the CLI and the tests have always imported them."""

from __future__ import annotations

import functools
from collections.abc import Collection
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from ..protocol.admission import parse_token
from ..sdnotify import listeners_from_systemd
from .batch import BatchRecord, parse_batch, parse_puts, record_body
from .control import DaemonControl, ReadControl, ReadOnlyView
from .events import Subscription
from .httpserver import serve_http
from .pipeline import Endpoint
from .routing import Access, Handler, Route, routes_of_length, split_target
from .unixsocket import ApiSocketError, open_unix_listener
from .values import (
    ApiError,
    EventStream,
    Request,
    Response,
    compact_json,
    json_response,
    plain_json_response,
)

__all__ = ["ROUTES", "Access", "ApiError", "ApiSocketError", "DaemonControl", "ReadControl",
           "ReadOnlyView", "listeners_from_systemd", "open_unix_listener", "serve_api"]

DEFAULT_READ_LIMIT = 100
MAX_READ_LIMIT = 1000
SEEN_LINES = 256  # request lines whose resolution serve_api keeps
# A batch body this large is decoded in a worker thread (its lines cost ~1-3 us each).
THREAD_PARSE_BYTES = 64 * 1024


def _string_field(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, "invalid-argument", f'"{name}" must be a non-empty string')
    return value


# --- handlers: argument checks, then one DaemonControl call ------------------------------

async def _status(control: ReadControl, request: Request) -> Response:
    return json_response(control.status())


async def _peers(control: ReadControl, request: Request) -> Response:
    return json_response({"peers": control.peers()})


async def _devices(control: ReadControl, request: Request) -> Response:
    return json_response({"devices": control.devices()})


async def _invite(control: DaemonControl, request: Request) -> Response:
    return json_response(await control.invite())


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


async def _remove(control: DaemonControl, request: Request) -> Response:
    force = request.arg("force")
    if force not in (None, "", "0", "1"):
        raise ApiError(400, "invalid-argument", "force is 0 or 1")
    words = request.json().get("recovery_words") if request.body else None
    if isinstance(words, str):
        words = words.split()
    if words is not None and not (isinstance(words, list) and words and all(isinstance(w, str) for w in words)):
        # Never echo the words: they are the circle's last-resort secret.
        raise ApiError(400, "invalid-argument", '"recovery_words" must be a list of words (or one string)')
    since = request.arg("distrust_since")  # unix ms: the removal point's bound
    if since is not None and not (since.isascii() and since.isdigit() and int(since) < 1 << 48):
        raise ApiError(400, "invalid-argument", "distrust_since is a time in unix milliseconds")
    extra = {"distrust_since_ms": int(since)} if since is not None else {}
    return json_response(await control.remove(
        request.params["device"], force=force == "1",
        recovery_words=[w.strip().lower() for w in words] if words is not None else None, **extra))


async def _recovery_key(control: DaemonControl, request: Request) -> Response:
    return json_response(await control.recovery_key())


async def _recover(control: DaemonControl, request: Request) -> Response:
    body = request.json()
    words = body.get("words")
    if isinstance(words, str):
        words = words.split()
    if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
        # Never echo the words: they are the circle's last-resort secret.
        raise ApiError(400, "invalid-argument", '"words" must be a list of words (or one string)')
    relay = _string_field(body, "relay", required=False) or ""
    preview = body.get("preview", False)
    readmit = body.get("readmit")
    if not isinstance(preview, bool):
        raise ApiError(400, "invalid-argument", '"preview" is true or false')
    if readmit is not None and not (isinstance(readmit, list) and all(
            isinstance(k, str) and len(k) == 64 and all(c in "0123456789abcdef" for c in k) for k in readmit)):
        raise ApiError(400, "invalid-argument", '"readmit" is a list of device keys (64 hex digits)')
    return json_response(await control.recover([w.strip().lower() for w in words], relay,
                                               preview=preview, readmit=readmit))


async def _relays(control: ReadControl, request: Request) -> Response:
    return json_response({"relays": control.relays()})


async def _add_relay(control: DaemonControl, request: Request) -> Response:
    body = request.json()
    address = _string_field(body, "address")
    assert address is not None
    # "token": the relay's enrolment token (base64url, as `meshd relay` printed it). A
    # secret: kept on this device, never echoed, even when it is malformed.
    text = _string_field(body, "token", required=False)
    token = None
    if text is not None:
        try:
            token = parse_token(text)
        except ValueError as err:
            raise ApiError(400, "bad-token", str(err)) from None
    return json_response(await control.add_relay(address.strip(), token=token))


async def _remove_relay(control: DaemonControl, request: Request) -> Response:
    return json_response(await control.remove_relay(request.params["address"]))


async def _rename(control: DaemonControl, request: Request) -> Response:
    name = _string_field(request.json(), "name")
    assert name is not None
    return json_response(await control.rename(name))


async def _streams(control: ReadControl, request: Request) -> Response:
    return json_response({"streams": await control.streams()})


async def _write(control: DaemonControl, request: Request) -> Response:
    body = request.json()
    record_id = _string_field(body, "id", required=False)
    data = record_body(body)
    return plain_json_response(await control.write(request.params["stream"], record_id, data), 201)


async def _write_batch(control: DaemonControl, request: Request) -> Response:
    stream = request.arg("stream")
    every = request.arg("results") != "errors"  # else only the failed lines are listed
    body = request.body
    if request.prepared is not None:  # decoded while the request before it committed
        bodies, parsed = request.prepared
    elif len(body) >= THREAD_PARSE_BYTES:  # per-line work off the trio thread
        bodies, parsed = await trio.to_thread.run_sync(_parse_batch, body, stream)
    else:
        bodies, parsed = _parse_batch(body, stream)
    if bodies is not None:  # the usual body: {"body": TEXT} lines (batch.parse_puts)
        assert stream is not None  # (parse_puts answers only with a stream)
        written = await control.write_puts(stream, bodies)
        if written is not None:
            answered = ([{"line": n, "id": record_id, "seq": seq}
                         for n, (record_id, seq) in enumerate(written, 1)] if every else [])
            return _batch_answer({"written": len(written), "failed": 0, "results": answered})
        parsed = ([BatchRecord("put", stream, None, body) for body in bodies],
                  [(n, None) for n in range(1, len(bodies) + 1)])
    assert parsed is not None
    records, answers = parsed
    results = iter(await control.write_batch(records) if records else [])
    lines: list[dict[str, Any]] = []
    failed = 0
    for line, answer in answers:
        result = answer or next(results)
        if "error" in result:
            failed += 1
            lines.append({"line": line, **result})
        elif every:
            lines.append({"line": line, **result})
    return _batch_answer({"written": len(answers) - failed, "failed": failed, "results": lines})


def _parse_batch(body: bytes, stream: str | None) -> tuple[
        list[bytes] | None, tuple[list[BatchRecord], list[tuple[int, dict[str, Any] | None]]] | None]:
    """(bodies, None) for a body parse_puts takes, else (None, parse_batch's answer)."""
    bodies = parse_puts(body, stream)
    return (bodies, None) if bodies is not None else (None, parse_batch(body, stream))


def _prepare_batch(request: Request) -> Any:
    """The batch route's prepare (pipeline.py): its body decoded, as _write_batch would."""
    return _parse_batch(request.body, request.arg("stream"))


def _batch_answer(summary: dict[str, Any]) -> Response:
    # Results are plain JSON already: skip json_response's walk over thousands of them.
    return Response(200, compact_json(summary))


async def _write_raw(control: DaemonControl, request: Request) -> Response:
    """The request body is the record's body, as is (no JSON, no base64): `meshctl send -`."""
    return plain_json_response(await control.write(request.params["stream"], request.arg("id") or None,
                                                   request.body), 201)


async def _read(control: ReadControl, request: Request) -> Response:
    limit_text = request.arg("limit")
    limit = DEFAULT_READ_LIMIT
    if limit_text is not None:
        if not (limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 6
                and 1 <= int(limit_text) <= MAX_READ_LIMIT):
            raise ApiError(400, "invalid-argument", f"limit must be an integer from 1 to {MAX_READ_LIMIT}")
        limit = int(limit_text)
    return json_response(control.read(request.params["stream"], request.arg("after") or None, limit))


async def _delete(control: DaemonControl, request: Request) -> Response:
    return json_response(await control.delete(request.params["stream"], request.params["id"]))


async def _clear(control: DaemonControl, request: Request) -> Response:
    return json_response(await control.clear(request.params["stream"]))


async def _events(control: ReadControl, request: Request) -> EventStream:
    text = request.arg("types") or ""
    types = frozenset(t.strip() for t in text.split(",") if t.strip())
    return EventStream(types or None)


async def _metrics(control: ReadControl, request: Request) -> Response:
    return Response(200, control.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")


# --- the route table: every route in one place, read (R) or write (W) ------------------------

R, W, WX = Access.READ, Access.WRITE, Access.REJOIN
_TABLE: list[tuple[str, str, Handler, Access]] = [
    ("GET", "/v1/status", _status, R),
    ("GET", "/v1/peers", _peers, R),
    ("GET", "/v1/devices", _devices, R),
    ("POST", "/v1/invite", _invite, W),
    ("POST", "/v1/join", _join, WX),
    ("POST", "/v1/devices/{device}/remove", _remove, WX),  # with the recovery words
    ("DELETE", "/v1/devices/{device}", _remove, WX),
    ("POST", "/v1/recovery-key", _recovery_key, W),
    ("POST", "/v1/recover", _recover, WX),
    ("GET", "/v1/relays", _relays, R),
    ("POST", "/v1/relays", _add_relay, W),
    ("DELETE", "/v1/relays/{address}", _remove_relay, W),
    ("POST", "/v1/rename", _rename, W),
    ("GET", "/v1/streams", _streams, R),
    ("POST", "/v1/streams/{stream}/records", _write, W),
    ("POST", "/v1/batch", _write_batch, W),
    ("POST", "/v1/streams/{stream}/raw", _write_raw, W),
    ("GET", "/v1/streams/{stream}/records", _read, R),
    ("DELETE", "/v1/streams/{stream}/records/{id}", _delete, W),
    ("POST", "/v1/streams/{stream}/clear", _clear, W),
    ("GET", "/v1/events", _events, R),
    ("GET", "/metrics", _metrics, R),
]
ROUTES = [Route(method, tuple(path.strip("/").split("/")), handler, access)
          for method, path, handler, access in _TABLE]

def resolve(method: str, target: str) -> tuple[Route, Request]:
    """The route and parsed request for a request line; raises ApiError 400/404/405."""
    try:
        path, query = split_target(target)
        segments = path.strip("/").split("/")
        allowed = []
        for candidate in routes_of_length(ROUTES, len(segments)):
            params = candidate.match(segments)
            if params is None:
                continue
            if candidate.method == method:
                return candidate, Request(method, path, query, params)
            allowed.append(candidate.method)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad-request", "the request target is not a valid URL") from None
    if allowed:
        methods = ", ".join(sorted(set(allowed)))
        raise ApiError(405, "method-not-allowed", f"{path} accepts {methods}",
                       [("allow", methods)])
    raise ApiError(404, "not-found", f"no such endpoint: {path} (see protocol/api.md)")


def endpoint(route: Route, control: DaemonControl) -> Endpoint:
    """The route's handler bound to the daemon, with its access enforced (module docstring)."""
    if route.access is Access.READ:
        return functools.partial(route.handler, ReadOnlyView(control))

    async def write(request: Request) -> Response | EventStream:
        if route.access is Access.WRITE:
            control.require_member()
        return await route.handler(control, request)
    if route.handler is _write_batch:  # its body can be decoded ahead of its turn (pipeline.py)
        write.prepare = _prepare_batch  # type: ignore[attr-defined]
    return write


async def serve_api(control: DaemonControl, listener: trio.SocketListener, *,
                    allowed_uids: Collection[int], allowed_gids: Collection[int] = (),
                    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API on listener until cancelled. Never raises for anything a client does."""

    bound: dict[int, tuple[Route, Endpoint]] = {}  # each route's endpoint, bound once, by id
    # Request lines seen, resolved: writers send the same line request after request, so
    # the usual one costs a dict lookup, not a parse and a match (issue 16). Only lines
    # that resolved (errors are raised again each time); each call gets its own Request.
    seen: dict[tuple[str, str], tuple[Endpoint, Request]] = {}
    seen_table = [ROUTES]  # the route table they were resolved in (tests replace it)

    def dispatch(method: str, target: str) -> tuple[Endpoint, Request]:
        if seen_table[0] is not ROUTES:
            seen.clear()
            seen_table[0] = ROUTES
        known_line = seen.get((method, target))
        if known_line is not None:
            call, request = known_line
            return call, Request(method, request.path, {k: list(v) for k, v in request.query.items()},
                                 dict(request.params))
        route, request = resolve(method, target)
        known = bound.get(id(route))
        if known is None or known[0] is not route:
            known = bound[id(route)] = (route, endpoint(route, control))
        if len(seen) >= SEEN_LINES:  # (targets carry ids: a bound, and a fresh start)
            seen.clear()
        seen[(method, target)] = (known[1], Request(method, request.path, request.query,
                                                    dict(request.params)))
        return known[1], request

    def subscribe(types: frozenset[str] | None) -> AbstractAsyncContextManager[Subscription]:
        # Looked up as each stream starts rather than once here: the server never keeps a bus.
        return control.events.subscribe(types)

    await serve_http(listener, dispatch, subscribe, allowed_uids=allowed_uids,
                     allowed_gids=allowed_gids, task_status=task_status)
