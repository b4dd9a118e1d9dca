"""The batch write route's request format: NDJSON records in, one answer per line out.

Theory of operation. `POST /v1/batch` carries one JSON object per line (protocol/api.md).
parse_batch() checks each line on its own: a line that is not JSON, not an object, or has a
missing or mistyped field gets its own error answer and is left out; every other line
becomes a BatchRecord for DaemonControl.write_batch, which commits them together. Blank
lines are skipped (they have no answer), so a trailing newline is harmless. Nothing here
touches the daemon: it only turns untrusted bytes into typed records or typed errors.

parse_puts() is the one-call path for the usual body, `meshctl import` of text lines into
?stream=NAME: every line exactly one {"body": TEXT} object. It decodes the whole body with
one json.loads (no Python per line) and answers None for anything else (then parse_batch
decodes it line by line, with an answer per line). It returns bodies only where parse_batch
would return the same records with no error (tests/shell/test_apibatch.py pins that).
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
    if len(value) == 1 and default_stream:  # the usual line, {"body": TEXT}: the same record
        text = value.get("body")  # as below, without the general path's lookups
        if type(text) is str:
            try:
                return BatchRecord("put", default_stream, None, text.encode("utf-8"))
            except UnicodeEncodeError:
                pass  # the general path says what is wrong
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
    """(records to write, [(line number, error answer or None for a record)]) in line order.

    A UTF-8 body (the usual case) is decoded once and each line is scanned by the C JSON
    scanner with no per-line decoding; it accepts and refuses exactly what parse_record
    (json.loads of the line) does for UTF-8 lines: JSON whitespace only around the value."""
    try:
        texts = body.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return _parse_lines(body.split(b"\n"), default_stream)
    records: list[BatchRecord] = []
    answers: list[tuple[int, dict[str, Any] | None]] = []
    decode = _DECODER.raw_decode
    for number, text in enumerate(texts, 1):
        if not text.strip(_BLANK):
            continue
        try:
            value, end = decode(text, len(text) - len(text.lstrip(_JSON_SPACE)))
            if end != len(text) and text[end:].strip(_JSON_SPACE):
                raise ValueError("extra data")
        except ValueError:
            answers.append((number, _error("bad-json", "the line is not valid JSON")))
            continue
        try:
            records.append(record_of(value, default_stream))
        except ApiError as err:
            answers.append((number, _error(err.code, err.message)))
            continue
        answers.append((number, None))
    return records, answers


def parse_puts(body: bytes, default_stream: str | None) -> list[bytes] | None:
    """The bodies of a batch whose every line is one {"body": TEXT} object (a put to
    default_stream with a fresh id), in line order; None for any other body.

    Two ways, each one json.loads of the whole body, exact for the reasons given:
    - Every line is `{"body":` M `}` (json.dumps writes that): the Ms, joined by ",\n",
      decoded as an array that must hold only strings. A JSON string cannot hold a raw
      newline, and an array of strings has no comma but between its items, so each M holds
      at least one item (else ",," or "[," does not decode): as many items as lines means
      each M is one string with JSON whitespace around it.
    - Else every line must start with "{" and every value be a one-key object {"body":
      string}, decoding the lines joined by commas. A comma put at a line break can then
      only separate two values of the array: inside such an object it would come right
      after "{", or before a key, which is a string and not "{", and a string cannot hold
      a raw newline. So each line holds at least one value, and as many values as lines
      means exactly one each, with only JSON whitespace (" \t\r") around it.
    Either way a line is exactly what parse_batch accepts per line as that record."""
    if not default_stream:
        return None
    raw = _raw_strings(body)
    if raw is not None:
        return raw
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.endswith("\n"):
        text = text[:-1]
    breaks = text.count("\n")
    if text.startswith(_PUT) and text.endswith("}") and text.count(_PUT_BREAK) == breaks:
        try:
            texts = _DECODER.decode("[" + text[len(_PUT):-1].replace(_PUT_BREAK, ",\n") + "]")
        except (ValueError, RecursionError):
            texts = None
        if texts is not None and (len(texts) != breaks + 1
                                  or not all(type(text) is str for text in texts)):
            texts = None
    else:
        texts = None
    if texts is None:
        texts = _one_key_objects(text, breaks + 1)
        if texts is None:
            return None
    try:
        return list(map(str.encode, texts))
    except UnicodeEncodeError:  # a lone surrogate: parse_batch answers that line
        return None


def _raw_strings(body: bytes) -> list[bytes] | None:
    """parse_puts's answer without decoding any JSON, for the body json.dumps lines make
    (`{"body": "` or `{"body":"`, the text, `"}`, every line alike) when no text needs
    decoding; None otherwise (then the ways above decide). A JSON string with no backslash
    (no escape), no quote (it would end there) and no control character (JSON refuses them
    raw) stands for its own UTF-8 bytes. Cut at every `"}` newline prefix, the body gives n
    pieces, and then holds 4 quotes per line (the key's two, the string's two) and n - 1
    newlines at the cuts: 5n - 1 of those special characters in all means there is none
    anywhere else, so each piece is one line's text, and it is valid UTF-8 if the whole body
    is. Two scans in C and a split: ~1.2 ms for a 1 MiB request against ~4.5 ms decoding it
    as JSON, time parse_puts holds the GIL that the composing thread needs (issue 16)."""
    end = b'"}\n' if body.endswith(b"\n") else b'"}'
    prefix = _RAW_PUT if body.startswith(_RAW_PUT) else _RAW_PUT_COMPACT
    if not body.startswith(prefix) or not body.endswith(end):
        return None
    # (the whole body cut, then its first and last pieces trimmed: no copy of the body)
    pieces = body.split(b'"}\n' + prefix)
    if len(body) - len(body.translate(None, _RAW_SPECIAL)) != 5 * len(pieces) - 3 + len(end):
        return None
    if len(pieces[0]) < len(prefix) or len(pieces[-1]) < len(end):
        return None  # (the prefix and the end overlap: `{"body": "}`)
    pieces[0] = pieces[0][len(prefix):]
    pieces[-1] = pieces[-1][:-len(end)]
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return pieces


def _one_key_objects(text: str, lines: int) -> list[str] | None:
    """parse_puts's second way (see there): the body strings, or None."""
    if not text.startswith("{") or text.count("\n{") != lines - 1:
        return None
    try:
        values = _DECODER.decode("[" + text.replace("\n", ",") + "]")
    except (ValueError, RecursionError):
        return None
    if len(values) != lines:
        return None
    texts = [value.get("body") if type(value) is dict and len(value) == 1 else None
             for value in values]
    if not all(type(text) is str for text in texts):
        return None
    return texts


def _parse_lines(lines: list[bytes], default_stream: str | None
                 ) -> tuple[list[BatchRecord], list[tuple[int, dict[str, Any] | None]]]:
    """parse_batch of a body that is not UTF-8: line by line, each with json.loads."""
    records: list[BatchRecord] = []
    answers: list[tuple[int, dict[str, Any] | None]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(parse_record(line, default_stream))
        except ApiError as err:
            answers.append((number, _error(err.code, err.message)))
            continue
        answers.append((number, None))
    return records, answers


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


_DECODER = json.JSONDecoder()
_PUT = '{"body":'  # a line of parse_puts's first way starts with this and ends with "}"
_PUT_BREAK = '}\n{"body":'

_JSON_SPACE = " \t\r"  # JSON's whitespace that a line can hold (it has no "\n")
_BLANK = " \t\r\x0b\x0c"  # what bytes.strip() removes: a line of only these is blank
_RAW_PUT = b'{"body": "'  # a line of json.dumps({"body": TEXT}), or compact: _raw_strings
_RAW_PUT_COMPACT = b'{"body":"'
# What a JSON string cannot hold raw (quote, backslash, control characters; "\n" among them).
_RAW_SPECIAL = bytes(range(32)) + b'"\\'
