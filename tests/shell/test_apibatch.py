"""parse_batch: the one-call decoding of a clean body and the line-by-line decoding of a body
with bad or blank lines must give the same records and line numbers."""

from __future__ import annotations

import json

import pytest

from meshd.api.batch import BatchRecord, parse_batch

GOOD = [json.dumps({"stream": "s", "id": f"r{i}", "body": f"b{i}"}) for i in range(5)]


@pytest.mark.parametrize("body", [
    "\n".join(GOOD),                      # no trailing newline
    "\n".join(GOOD) + "\n",               # the usual trailing newline
    "\n".join(GOOD[:2]) + "\n\n" + "\n".join(GOOD[2:]) + "\n",  # a blank line inside
    "\n".join(GOOD[:2]) + "\n[1,\n" + "\n".join(GOOD[2:]),      # a line that breaks the array
    "\n".join(GOOD) + "\n,",              # a comma line would join two values
])
def test_records_and_line_numbers_do_not_depend_on_the_decoding_path(body: str) -> None:
    records, answers = parse_batch(body.encode(), None)
    assert records == [BatchRecord("put", "s", f"r{i}", f"b{i}".encode()) for i in range(5)]
    good_lines = [number for number, answer in answers if answer is None]
    lines = body.split("\n")
    assert [lines[n - 1] for n in good_lines] == GOOD
    for number, answer in answers:
        if answer is not None:
            assert answer["error"]["code"] == "bad-json" and lines[number - 1].strip()


def test_two_values_on_one_line_are_one_bad_line_not_two_records() -> None:
    body = (GOOD[0] + "," + GOOD[1] + "\n" + GOOD[2] + "\n").encode()
    records, answers = parse_batch(body, None)
    assert records == [BatchRecord("put", "s", "r2", b"b2")]
    assert answers[0] == (1, {"error": {"code": "bad-json", "message": "the line is not valid JSON"}})


def test_an_object_split_over_two_lines_is_two_bad_lines() -> None:
    body = '{"stream": "s"\n"body": "x"}\n' + GOOD[0] + "," + GOOD[1] + "\n"
    records, answers = parse_batch(body.encode(), None)
    assert records == []
    assert [(number, answer and answer["error"]["code"]) for number, answer in answers] == [
        (1, "bad-json"), (2, "bad-json"), (3, "bad-json")]


@pytest.mark.parametrize("line", [
    "\u00a0" + GOOD[0],             # no-break space: Unicode whitespace, not JSON's
    GOOD[0] + "\u2003",             # an em space after the value
    "\x0b" + GOOD[0],               # a vertical tab (blank to bytes.strip(), not to JSON)
])
def test_a_line_json_loads_refuses_is_refused_by_the_one_pass_decoding_too(line: str) -> None:
    with pytest.raises(ValueError):
        json.loads(line.encode())
    records, answers = parse_batch((line + "\n" + GOOD[1] + "\n").encode(), None)
    assert records == [BatchRecord("put", "s", "r1", b"b1")]
    assert answers == [(1, {"error": {"code": "bad-json", "message": "the line is not valid JSON"}}),
                       (2, None)]


def test_a_body_only_line_with_a_default_stream_is_the_same_record_as_the_general_path() -> None:
    body = "\n".join([json.dumps({"body": "é x"}), json.dumps({"body": "y", "op": "put"}),
                      '{"body": "\\ud800"}', json.dumps({"body": 5}), " \t" + json.dumps({"body": ""})])
    records, answers = parse_batch(body.encode(), "d")
    assert records == [BatchRecord("put", "d", None, "é x".encode()), BatchRecord("put", "d", None, b"y"),
                       BatchRecord("put", "d", None, b"")]
    assert [(n, a and a["error"]["code"]) for n, a in answers] == [
        (1, None), (2, None), (3, "invalid-argument"), (4, "invalid-argument"), (5, None)]
    assert parse_batch(json.dumps({"body": "x"}).encode(), None)[1][0][1]["error"]["code"] == \
        "invalid-argument"  # no stream at all
