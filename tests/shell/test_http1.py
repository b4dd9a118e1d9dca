"""The API's fast path (meshd/api/http1.py): it accepts only plain requests, reads them as h11
does, and writes responses byte for byte as h11 would."""

from __future__ import annotations

import h11
import pytest

from meshd.api.http1 import parse_head, response_head

LIMIT = 16 * 1024
PLAIN = (b"POST /v1/streams/chat/records HTTP/1.1\r\nHost: meshd\r\n"
         b"Content-Type: application/json\r\nContent-Length: 11\r\n\r\n")


def h11_reads(data: bytes) -> tuple[str, str, int]:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMIT)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    length = next((int(v) for n, v in event.headers if n == b"content-length"), 0)
    return event.method.decode(), event.target.decode(), length


@pytest.mark.parametrize("data", [
    PLAIN,
    PLAIN + b'{"body":""}',  # the body follows in the same buffer
    b"DELETE /v1/streams/chat/records/m1 HTTP/1.1\r\nhost: x\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n",
    b"PUT /v1/x?a=1&b=%20 HTTP/1.1\r\nHOST:x\r\ncontent-length:0\r\nX-Odd:  a  b \r\n\r\n",
])
def test_a_plain_request_is_read_as_h11_reads_it(data: bytes) -> None:
    head = parse_head(data, LIMIT)
    assert head is not None
    assert (head.method, head.target, head.content_length) == h11_reads(data)
    assert data[head.size - 4:head.size] == b"\r\n\r\n"


@pytest.mark.parametrize("data", [
    b"HEAD /v1/status HTTP/1.1\r\nhost: x\r\n\r\n",  # a HEAD's answer has no body: h11's
    b"POST /v1/x HTTP/1.0\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\nupgrade: h2c\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\ncontent-length: 0\r\n\r\n",  # no Host: h11 refuses it
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\ncontent-length: 1, 1\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\nx-a: b\r\n c\r\n\r\n",  # a folded header
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\nx a: b\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\nx-a: \xc3\xa9\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\nx-a: b",  # still arriving
    b"POST /v1/x HTTP/1.1\nhost: x\n\n",
    b"POST v1/x HTTP/1.1\r\nhost: x\r\n\r\n",
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * LIMIT + b"\r\n\r\n",  # 431 is h11's
    b"POST /v1/x HTTP/1.1\r\nhost: x\r\n" + b"a:\r\n" * (LIMIT // 5) + b"\r\n",  # counted as serve_one
])
def test_anything_else_is_left_to_h11(data: bytes) -> None:
    assert parse_head(data, LIMIT) is None


@pytest.mark.parametrize("status, headers", [
    (201, [("content-type", "application/json"), ("content-length", "2")]),
    (405, [("content-type", "application/json"), ("content-length", "10"), ("allow", "GET, POST")]),
    (503, [("content-type", "application/json"), ("content-length", "0"), ("retry-after", "5"),
           ("connection", "close")]),
])
def test_responses_are_the_bytes_h11_writes(status: int, headers: list[tuple[str, str]]) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
    conn.next_event()
    conn.next_event()
    expected = conn.send(h11.Response(status_code=status, headers=headers,
                                      reason=h11_reason(status)))
    assert response_head(status, headers) == expected


def h11_reason(status: int) -> bytes:
    from http import HTTPStatus
    return HTTPStatus(status).phrase.encode()


def test_a_header_that_would_split_the_response_is_refused() -> None:
    with pytest.raises(ValueError):
        response_head(200, [("content-length", "0"), ("x", "a\r\nset-cookie: b")])
