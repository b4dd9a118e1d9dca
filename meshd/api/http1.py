"""The local API's fast path: the plain HTTP/1.1 requests that make up a write load (and the
status reads beside it), parsed without h11 (sans-IO: bytes in, a parsed head or None out).

Theory of operation. h11 costs ~100 us of CPU per request here, half of what a write may
spend on the trio thread at 5,000 writes/s. Apps writing through the API send the plainest
HTTP there is: a GET/POST/PUT/DELETE request line, a few headers and a Content-Length body.
parse_head() accepts exactly that and nothing else: a complete head, at most max_bytes
long, whose request line is `METHOD /target HTTP/1.1` and whose every header line is a
token name, a colon and visible ASCII; exactly one Host; no Transfer-Encoding, Expect, Connection or Upgrade
header; at most one Content-Length, all digits. Anything else (a HEAD, HTTP/1.0, a head
still arriving, chunked bodies, folded or odd headers) returns None and the caller gives
the bytes to h11, which answers or refuses it exactly as before. So the fast path never
accepts what h11 would refuse, and never has to produce an error h11 would have produced.
response_head() writes a response as h11 would for a fixed-length body.

A client sends the same head request after request (a writer's POST, a monitor's GET
/v1/status): cached_head() keeps the heads it parsed, by their exact bytes, so a repeated
head costs a search for its end and a dict lookup instead of the regular expressions
(parse_head is a pure function of those bytes and the bound, so the answer is the same).
"""

from __future__ import annotations

import functools
import re
from http import HTTPStatus
from typing import NamedTuple

# GET too: the server hands a GET whose endpoint streams (GET /v1/events) to h11 itself.
FAST_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE"})
_REQUEST_LINE = re.compile(rb"([A-Z]+) (/[!-~]*) HTTP/1\.1")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([!-~]+(?:[ \t]+[!-~]+)*)?[ \t]*")
# Headers whose meaning the fast path does not implement: h11 handles those requests.
_DEFER = frozenset({b"transfer-encoding", b"expect", b"connection", b"upgrade"})
_DIGITS = re.compile(rb"[0-9]{1,12}")


class Head(NamedTuple):
    method: str
    target: str
    content_length: int
    size: int  # bytes of the head, including the blank line


def parse_head(buffer: bytes, max_bytes: int) -> Head | None:
    """The request head at the start of buffer if it is complete and plain (see the module
    comment), else None: the caller hands the bytes to h11."""
    end = buffer.find(b"\r\n\r\n", 0, max_bytes + 4)
    if end < 0:
        return None
    lines = buffer[:end].split(b"\r\n")
    request = _REQUEST_LINE.fullmatch(lines[0])
    if request is None or request[1] not in FAST_METHODS:
        return None
    length: int | None = None
    hosts = 0
    counted = len(request[2])  # the size httpserver bounds by MAX_HEADER_BYTES, as it counts it
    for line in lines[1:]:
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            return None
        name, value = header[1].lower(), header[2] or b""
        counted += len(name) + len(value) + 4
        if name in _DEFER:
            return None
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if length is not None or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
    if hosts != 1 or counted > max_bytes:  # h11 refuses a missing Host; 431 comes from there
        return None
    return Head(request[1].decode("ascii"), request[2].decode("ascii"), length or 0, end + 4)


SEEN_HEADS = 256  # heads cached_head keeps (then it starts afresh: a bound, not an LRU)
SEEN_HEAD_BYTES = 1024  # longer heads are parsed each time (the usual head is ~100-250 bytes)
_seen: dict[tuple[bytes, int], Head] = {}


def cached_head(buffer: bytes | bytearray, max_bytes: int) -> Head | None:
    """parse_head(buffer, max_bytes), answered from the heads parsed before when these very
    head bytes were (module docstring). Only plain heads are kept: None is worked out again."""
    end = buffer.find(b"\r\n\r\n", 0, max_bytes + 4)
    if end < 0:
        return None
    key = (bytes(buffer[:end + 4]), max_bytes)
    head = _seen.get(key)
    if head is None:
        head = parse_head(key[0], max_bytes)
        if head is not None and end < SEEN_HEAD_BYTES:
            if len(_seen) >= SEEN_HEADS:
                _seen.clear()
            _seen[key] = head
    return head


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """A response head for a body of the length in headers (content-length is required)."""
    out = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"bad response header {name!r}")  # a bug: our own headers
        out.append(f"{name}: {value}")
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


@functools.lru_cache(maxsize=64)
def _head_up_to_length(status: int, content_type: str) -> bytes:
    return response_head(status, [("content-type", content_type)])[:-2]  # without the blank line


def plain_response_head(status: int, content_type: str, length: int) -> bytes:
    """response_head(status, [("content-type", content_type), ("content-length", length)]),
    byte for byte, with all but the length built once per status and type."""
    return _head_up_to_length(status, content_type) + b"content-length: %d\r\n\r\n" % length
