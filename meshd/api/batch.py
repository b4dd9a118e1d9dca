"""The batch write route's request format: NDJSON records in, one answer per line out.

Theory of operation. `POST /v1/batch` carries one JSON object per line (protocol/api.md).
parse_batch() checks each line on its own: a line that is not JSON, not an object, or has a
missing or mistyped field gets its own error answer and is left out; every other line
becomes a BatchRecord for DaemonControl.write_batch, which commits them together. Blank
lines are skipped (they have no answer), so a trailing newline is harmless. Nothing here
touches the daemon: it only turns untrusted bytes into typed records or typed errors.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, NamedTuple

from .values import ApiError


class BatchRecord(NamedTuple):
    op: str  # "put" or "delete"
    stream: str
    record_id: str | None  # None: the daemon assigns one (puts only)
    body: bytes


OPS = ("put", "delete")


def record_body(body: dict[str, Any]) -> bytes:
    """The bytes of a record object's "body" (text) or "body_b64"; ApiError 400 otherwise."""
    if ("body" in body) == ("body_b64" in body):
        raise ApiError(400, "invalid-argument", 'give exactly one of "body" (text) or "body_b64"')
    if "body" in body:
        if not isinstance(body["body"], str):
            raise ApiError(400, "invalid-argument", '"body" must be a string (use "body_b64" for bytes)')
        try:
            return body["body"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\\ud800") is not text
            raise ApiError(400, "invalid-argument", '"body" is not valid Unicode text') from None
    try:
        return base64.b64decode(body["body_b64"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ApiError(400, "invalid-argument", '"body_b64" is not valid base64') from None


def parse_record(line: bytes, default_stream: str | None) -> BatchRecord:
    """One NDJSON line as a record; ApiError(400) says what is wrong with it."""
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad-json", "the line is not valid JSON") from None
    return record_of(value, default_stream)


def record_of(value: Any, default_stream: str | None) -> BatchRecord:
    """A decoded line as a record; ApiError(400) says what is wrong with it."""
    if not isinstance(value, dict):
        raise ApiError(400, "bad-json", "the line must be a JSON object")
    op = value.get("op", "put")
    if op not in OPS:
        raise ApiError(400, "invalid-argument", '"op" must be "put" or "delete"')
    stream = value.get("stream", default_stream)
    if not isinstance(stream, str) or not stream:
        raise ApiError(400, "invalid-argument", '"stream" must be a non-empty string '
                       "(or pass ?stream=NAME for lines without one)")
    record_id = value.get("id")
    if record_id is not None and (not isinstance(record_id, str) or not record_id):
        raise ApiError(400, "invalid-argument", '"id" must be a non-empty string')
    if op == "delete":
        if record_id is None:
            raise ApiError(400, "invalid-argument", 'a delete needs an "id"')
        if "body" in value or "body_b64" in value:
            raise ApiError(400, "invalid-argument", "a delete takes no body")
        return BatchRecord(op, stream, record_id, b"")
    return BatchRecord(op, stream, record_id, record_body(value))


def parse_batch(body: bytes, default_stream: str | None
                ) -> tuple[list[BatchRecord], list[tuple[int, dict[str, Any] | None]]]:
    """(records to write, [(line number, error answer or None for a record)]) in line order."""
    records: list[BatchRecord] = []
    answers: list[tuple[int, dict[str, Any] | None]] = []
    lines = body.split(b"\n")
    values = _decode_all(lines)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            if values is None or values[number - 1] is _BAD:
                records.append(parse_record(line, default_stream))
            else:
                records.append(record_of(values[number - 1], default_stream))
        except ApiError as err:
            answers.append((number, {"error": {"code": err.code, "message": err.message}}))
            continue
        answers.append((number, None))
    return records, answers


_DECODER = json.JSONDecoder()


def _decode_all(lines: list[bytes]) -> list[Any] | None:
    """Each line decoded on its own by the C scanner, without json.loads's per-call work
    (encoding detection, decoding the bytes): the same values as parse_record's, or None
    if the body is not UTF-8 and the caller decodes line by line."""
    try:
        texts = b"\n".join(lines).decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return None
    values: list[Any] = []
    for text in texts:
        try:
            value, end = _DECODER.raw_decode(text, len(text) - len(text.lstrip()))
            values.append(value if not text[end:].strip() else _BAD)
        except ValueError:
            values.append(_BAD)
    return values


_BAD = object()  # a line that is not one JSON value
