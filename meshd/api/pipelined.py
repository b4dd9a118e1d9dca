"""Client side of HTTP/1.1 pipelining: many POSTs on one connection, the next one sent before
the answer to the last (Client.import_lines uses it for `meshctl import`).

Theory of operation. A batch import is a row of ~1 MiB requests. Sent one at a time, the
daemon idles while the client waits for an answer, sends the next body and the daemon reads
it; pipelined, request n+1 is already on its way while request n commits, and the server
decodes it meanwhile (pipeline.py). post_pipelined() keeps at most `depth` requests
unanswered: a sender thread writes requests (waiting for a free slot), the calling thread
reads the answers in order, each one freeing a slot. The two directions never wait on each
other, so a large answer (every line's result) cannot deadlock against a large request.

Answers are parsed with h11, one response at a time; bytes after one answer are the start of
the next. The server answers in order and may close after an error answer (4xx with
"connection: close"): the requests sent after it are then unanswered, and so is any request
the sender could not send (a request the server refused before reading it all still gets
its answer read); post_pipelined() yields what was answered and then raises PipelineBroken,
saying how many requests had an answer. After an error answer (status 400 or more) it sends
no further request: the ones already sent are answered, then it returns (a refused batch
of an import means the next ones would be refused too, or leave a hole in what was written).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Iterable, Iterator

import h11

RECEIVE_BYTES = 256 * 1024


class PipelineBroken(Exception):
    """The connection ended before every request had its answer."""

    def __init__(self, answered: int, reason: str) -> None:
        super().__init__(f"the connection ended after {answered} answers: {reason}")
        self.answered = answered


def request_bytes(target: str, content_type: str, body: bytes) -> bytes:
    return (f"POST {target} HTTP/1.1\r\nhost: meshd\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode("ascii") + body


def post_pipelined(sock: socket.socket, target: str, content_type: str, bodies: Iterable[bytes], *,
                   depth: int = 2) -> Iterator[tuple[int, bytes]]:
    """POST each body to target on sock, at most depth unanswered, none after an error answer;
    yields (status, answer body) in order. Raises PipelineBroken if the connection ends
    first, OSError (a timeout included) from the socket. The caller owns sock (and closes it)."""
    slots = threading.Semaphore(depth)
    sent: queue.SimpleQueue[bool | BaseException] = queue.SimpleQueue()  # True: one more request
    stop = threading.Event()

    def send_all() -> None:
        try:
            for body in bodies:
                slots.acquire()
                if stop.is_set():
                    break
                sock.sendall(request_bytes(target, content_type, body))
                sent.put(True)
        except BaseException as err:  # handed to the reading thread, which raises or explains it
            sent.put(err)
            return
        sent.put(False)

    sender = threading.Thread(target=send_all, name="meshd-import-send", daemon=True)
    sender.start()
    leftover = b""
    answered = 0
    finished = False
    try:
        while True:
            item = sent.get()
            if item is False:
                finished = True
                return
            if isinstance(item, BrokenPipeError | ConnectionResetError):
                # The server answered before reading it all (413, 403) and closed: the answer
                # is waiting to be read and says why, which a broken pipe does not.
                status, body, leftover = _read_answer(sock, target, leftover, answered)
                yield status, body
                raise PipelineBroken(answered + 1, "meshd closed the connection") from item
            if isinstance(item, BaseException):
                raise item
            status, body, leftover = _read_answer(sock, target, leftover, answered)
            answered += 1
            if status >= 400:  # (before the slot is freed: the sender sees it when it gets one)
                stop.set()
            slots.release()
            yield status, body
    finally:
        stop.set()
        slots.release()  # a sender waiting for a slot sees stop and ends
        if not finished:  # given up on: a sender blocked in sendall fails at once
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout=sock.gettimeout())


def _read_answer(sock: socket.socket, target: str, data: bytes, answered: int) -> tuple[int, bytes, bytes]:
    """(status, body, the bytes after it) of the next answer, starting with data."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target=target, headers=[("host", "meshd"), ("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    if data:  # (b"" would tell h11 the connection ended)
        conn.receive_data(data)
    status, chunks = 0, []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as err:
            raise PipelineBroken(answered, f"malformed answer: {err}") from None
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(RECEIVE_BYTES))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return status, b"".join(chunks), conn.trailing_data[0]
        elif isinstance(event, h11.ConnectionClosed):
            raise PipelineBroken(answered, "meshd closed the connection")
