"""meshd/api/values.py: plain_json_response answers exactly what json_response would, and
jsonable what it answered when it walked every value."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.api import values
from meshd.api.values import json_response, jsonable, plain_json_response

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


# --- jsonable: leaves are copied, not walked (a status answer's cost; issue 16 probes) ------

def jsonable_before(value: Any, key: str = "") -> Any:
    """jsonable as it was, one call per value: the reference for what it must answer."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == "body" and isinstance(v, bytes | bytearray):
                try:
                    out["body"] = bytes(v).decode("utf-8")
                except UnicodeDecodeError:
                    out["body_b64"] = base64.b64encode(v).decode("ascii")
            else:
                out[str(k)] = jsonable_before(v, str(k))
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable_before(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return value


LEAVES = (st.text(max_size=5) | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False)
          | st.binary(max_size=4) | st.sampled_from([b"\xff", b"text", bytearray(b"ba")]))
KEYS = st.sampled_from(["body", "id", "seq"]) | st.text(max_size=3) | st.integers(-2, 2) | st.booleans()
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                      | st.frozensets(st.text(max_size=3) | st.integers(), max_size=3)
                      | st.dictionaries(KEYS, inner, max_size=4), max_leaves=20)


@given(VALUES)
def test_jsonable_answers_what_it_answered_before(value: Any) -> None:
    assert jsonable(value) == jsonable_before(value)
    assert json.dumps(jsonable(value)) == json.dumps(jsonable_before(value))


def test_a_status_answer_s_leaves_are_not_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    status = {"device": "ab" * 32, "fingerprint": "abcd-efgh", "name": "pi", "circle": "cd" * 16,
              "member": True, "devices": 2, "epoch": 3, "listen": ["0.0.0.0:7743", "[::]:7743"],
              "peers_connected": 1, "relays": [{"address": "r:1", "connected": False}],
              "relay_outbox": {}, "uptime_s": 12.5, "entries": 10, "relay_backlog": 0}
    calls: list[Any] = []
    original = values.jsonable

    def counted(value: Any, key: str = "") -> Any:
        calls.append(value)
        return original(value, key)
    monkeypatch.setattr(values, "jsonable", counted)
    assert values.jsonable(status) == jsonable_before(status)
    # The status, its list of addresses, its list of relays, the relay, the outbox (main
    # walked all 20 values: 20 calls).
    assert len(calls) == 5
