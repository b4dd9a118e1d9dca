"""Client.import_lines (`meshctl import`): NDJSON lines in batch requests of up to ~1 MiB,
pipelined on one connection (pipelined.py), with an account of every line.

Theory of operation. The lines are cut into requests as they are read; each request's answer
says, line by line, what was written (durable) and what was refused. A request refused as a
whole (507 storage-full, 409 not-a-member, 413...) or a connection that ends mid-import
leaves the lines of the requests answered before it written, and possibly those of the one
request already on its way after it (two are in flight): that request is still answered
and counted, and nothing more is sent once a request was refused (post_pipelined stops).
ImportInterrupted then carries the account (`result`): what was written and refused line by
line, the requests refused as a whole (their first and last line: none of their lines was
written), the requests sent that got no answer because the connection ended (their lines
may or may not be written), and the first line of which nothing was sent. Raising only the
error, as this did before, hid the records already written: importing the same input again
wrote them twice (fresh ids), and the lines past the refusal were not known to be missing.
"""

from __future__ import annotations

import json
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .clienterror import ClientError, answer_error
from .pipelined import PipelineBroken, post_pipelined


class ImportInterrupted(ClientError):
    """An import that did not get through every line: the first refusal's (or the
    connection's) code and message, and `result`, the account of the lines (module comment):
    written, failed, errors (per line), refused and unanswered ({"first_line", "last_line"}
    of whole requests; refused ones also "status" and "error"), not_sent_from (a line number,
    or None when every line was sent)."""

    def __init__(self, code: str, message: str, status: int, result: dict[str, Any]) -> None:
        super().__init__(code, message, status)
        self.result = result


def import_lines(sock: socket.socket, target: str, lines: Iterable[bytes], request_bytes: int,
                 progress: Callable[[int, int], None] | None, *, describe_socket: str,
                 timeout: float | None) -> dict[str, Any]:
    """Client.import_lines over sock (the caller closes it): {"written", "failed", "errors"};
    raises ImportInterrupted (with the account of every line) if a request was refused as a
    whole or the connection ended first."""
    written = failed = 0
    errors: list[dict[str, Any]] = []
    too_large: list[dict[str, Any]] = []  # lines never sent (appended by the sending thread)
    made: deque[tuple[int, int]] = deque()  # each request made (first, last line), unanswered
    refused: list[dict[str, Any]] = []
    pending = [1]  # the first line in no request made yet (0: every line is in one)

    def chunks() -> Iterator[bytes]:
        chunk: list[bytes] = []
        size = first = last = 0
        for number, line in enumerate(lines, 1):
            line = line.rstrip(b"\r\n") + b"\n"
            if chunk and size + len(line) > request_bytes:
                made.append((first, last))
                pending[0] = number
                yield b"".join(chunk)
                chunk, size = [], 0
            if len(line) > request_bytes:  # the server would refuse the whole request
                too_large.append({"line": number, "error": {
                    "code": "too-large", "message": f"the line exceeds {request_bytes} bytes"}})
                continue
            if not chunk:
                first = number  # the server numbers this request's lines from 1
            chunk.append(line)
            size += len(line)
            last = number
        if chunk:
            made.append((first, last))
            pending[0] = 0
            yield b"".join(chunk)
        pending[0] = 0

    interrupted: ClientError | None = None  # the first refusal, or how the connection ended
    ended = False  # the connection ended before every request sent was answered
    try:
        for status, data in post_pipelined(sock, target, "application/x-ndjson", chunks()):
            first, last = made.popleft()
            if status >= 400:  # none of its lines is written; post_pipelined sends no more
                code, message = answer_error(status, data)
                refused.append({"first_line": first, "last_line": last, "status": status,
                                "error": {"code": code, "message": message}})
                interrupted = interrupted or ClientError(code, message, status)
                continue
            result = json.loads(data)
            written += result["written"]
            failed += result["failed"]
            errors += [{**answer, "line": answer["line"] + first - 1} for answer in result["results"]]
            if progress is not None:
                progress(written, failed + len(too_large))
    except PipelineBroken as err:
        ended = True
        interrupted = interrupted or ClientError(
            "disconnected", f"meshd closed the connection mid-import: {err}")
    except TimeoutError:
        ended = True
        interrupted = interrupted or ClientError("timeout", f"meshd did not answer within {timeout:.0f} s")
    except OSError as err:
        ended = True
        interrupted = interrupted or ClientError(
            "connection-failed", f"cannot talk to meshd at {describe_socket}: {err}")
    errors = sorted(errors + too_large, key=lambda answer: answer["line"])
    account: dict[str, Any] = {"written": written, "failed": failed + len(too_large), "errors": errors}
    if interrupted is None:
        return account
    # The requests made and not answered: when post_pipelined returned, none of them was sent
    # (it answers every request it sent); when the connection ended, the first of them may
    # have been, and its lines written or not: all are reported as unanswered then.
    unanswered = [{"first_line": first, "last_line": last} for first, last in made] if ended else []
    not_sent = (made[0][0] if made and not ended else pending[0]) or None
    raise ImportInterrupted(interrupted.code, interrupted.message, interrupted.status, {
        **account, "refused": refused, "unanswered": unanswered, "not_sent_from": not_sent})

