"""The values passed between the API's routes (routes.py) and its HTTP server (httpserver.py).

A Request comes in, a Response or an EventStream goes out, and an ApiError stands for any
answer the caller should see as an error; responses are JSON, built by json_response. These
live apart from both modules so that api.py can depend on httpserver.py without the server
depending back on the routes.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

# A request body nests at most this deep (the deepest route reads depth 2).
MAX_JSON_DEPTH = 32


class ApiError(Exception):
    """An error the caller should see: HTTP status, a stable code, a message saying what to do."""

    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    params: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    prepared: Any = None  # what the endpoint's prepare(request) gave, if it ran early (pipeline.py)

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "bad-json", "the request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise ApiError(400, "bad-json", "the request body must be a JSON object")
        if not _plainly_fine(self.body):
            _check_json(value)
        return value


def _plainly_fine(body: bytes) -> bool:
    """True when body's JSON cannot hold what _check_json refuses, seen from its bytes.
    ASCII without NUL is read as UTF-8 (json.detect_encoding), where a lone surrogate can
    only be written as a \\u escape; and nesting N deep needs N opening brackets (brackets
    inside strings only count more). A write's usual body passes; any other is walked (UTF-8
    text may encode a surrogate, which json.loads lets through, and UTF-16 hides escapes)."""
    return (body.isascii() and b"\\u" not in body and b"\x00" not in body
            and body.count(b"{") + body.count(b"[") <= MAX_JSON_DEPTH)


def _check_json(value: Any) -> None:
    """Refuse what JSON parses but no route may see: nesting deeper than MAX_JSON_DEPTH and
    strings with lone surrogates ("\\ud800", or surrogates encoded in UTF-8), which cannot be
    encoded back to UTF-8 anywhere later."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                raise ApiError(400, "bad-json", "the request body has a string that is not valid "
                               "Unicode (a lone surrogate)")
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, "bad-json", f"the request body nests deeper than {MAX_JSON_DEPTH}")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


# Values jsonable returns as they are: a container's leaves of these exact types are copied
# without a call each (a status answer is ~16 values, most of them leaves: issue 16 probes).
_LEAVES = frozenset({str, int, float, bool, type(None)})


def jsonable(value: Any, key: str = "") -> Any:
    """JSON for daemon results: a bytes "body" becomes text or body_b64, other bytes hex."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if type(v) in _LEAVES:
                out[str(k)] = v
            elif k == "body" and isinstance(v, bytes | bytearray):
                try:
                    out["body"] = bytes(v).decode("utf-8")
                except UnicodeDecodeError:
                    out["body_b64"] = base64.b64encode(v).decode("ascii")
            else:
                out[str(k)] = jsonable(v, str(k))
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [v if type(v) in _LEAVES else jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return value


# json.dumps(value, separators=(",", ":")) builds this encoder on every call; one will do.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def compact_json(value: Any) -> bytes:
    """json.dumps(value, separators=(",", ":")) as bytes, and a newline: every JSON answer."""
    return _COMPACT.encode(value).encode() + b"\n"


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, compact_json(jsonable(value)))


def plain_json_response(value: dict[str, str | int], status: int = 200) -> Response:
    """json_response for a flat object of strings and integers (a write's answer): the same
    bytes without jsonable's walk, which has nothing to convert there. Anything else takes
    json_response's path."""
    if all(type(k) is str and type(v) in (str, int) for k, v in value.items()):
        return Response(status, compact_json(value))
    return json_response(value, status)


def error_response(status: int, code: str, message: str,
                   headers: list[tuple[str, str]] | None = None) -> Response:
    response = json_response({"error": {"code": code, "message": message}}, status)
    response.headers = headers or []
    return response
