"""meshd/api/values.py: plain_json_response answers exactly what json_response would."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.api.values import json_response, plain_json_response

WRITE_ANSWER = {"stream": "chat", "id": "0193a-xyz", "author": "ab" * 32, "seq": 7,
                "hlc": 1_733_000_000_000 << 16}


@pytest.mark.parametrize("value", [
    WRITE_ANSWER,
    {"stream": "é ☃ \u2028", "id": "\"quoted\"\n", "seq": 0},  # escapes as json_response does
    {"stream": "chat", "body": b"bytes: jsonable turns these into text"},  # not plain: fallback
    {"author": b"\x01\x02", "seq": 1},  # bytes become hex, as json_response does
    {1: "a non-string key", "seq": 2},
    {"ok": True, "none": None},  # not str or int: fallback
    {},
])
def test_plain_json_response_is_json_response_byte_for_byte(value: dict[Any, Any]) -> None:
    plain, reference = plain_json_response(value, 201), json_response(value, 201)
    assert (plain.status, plain.body, plain.content_type, plain.headers) == \
        (reference.status, reference.body, reference.content_type, reference.headers)
