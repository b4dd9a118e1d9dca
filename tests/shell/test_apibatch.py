"""parse_batch: the one-call decoding of a clean body and the line-by-line decoding of a body
with bad or blank lines must give the same records and line numbers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.api.batch import BatchRecord, parse_batch, parse_puts

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


# parse_puts: the one-call path for bodies of {"body": TEXT} lines. Wherever it answers, it
# must answer what parse_batch answers; everywhere else it must step aside (None).

PUT_LINES = [json.dumps({"body": f"text {i}"}) for i in range(4)]


@pytest.mark.parametrize("body", [
    "\n".join(PUT_LINES),
    "\n".join(PUT_LINES) + "\n",
    "\r\n".join(PUT_LINES) + "\r\n",
    '{"body": "é \\" \\n \\u00e9"}\n{ "body" : "" }\t\n',
    '{"body": "a", "body": "b"}\n',                       # json keeps the last: one key
    '{"body":"a"}\n{"body": "b" \r}\n{"body":\t"c"}',       # compact, spaced, tabbed
])
def test_a_clean_body_of_puts_gives_the_records_parse_batch_gives(body: str) -> None:
    bodies = parse_puts(body.encode(), "d")
    records, answers = parse_batch(body.encode(), "d")
    assert bodies is not None
    assert records == [BatchRecord("put", "d", None, b) for b in bodies]
    assert answers == [(n, None) for n in range(1, len(bodies) + 1)]


@pytest.mark.parametrize("body", [
    "",
    "\n",
    "\n".join(PUT_LINES[:2]) + "\n\n" + PUT_LINES[2],       # a blank line: it has no answer
    " " + PUT_LINES[0],                                      # leading whitespace
    PUT_LINES[0] + "," + PUT_LINES[1] + "\n" + PUT_LINES[2],  # two values on one line
    '{"body": "a"\n}',                                       # an object over two lines
    '{"body": {"x": 1}\n{}}',                                # a nested value over two lines
    '{}],[{}\n{"body": "x"}',                                # brackets that would shift values
    '{"body": "x", "op": "put"}',                           # another key: the general path
    '{"body": "a", "b"}\n{"body": "c"}',                    # two strings in one line's object
    '{"body": "a"}}\n{"body": "c"}',
    '{"body": }\n{"body": "c"}',
    '{"body": ["a"\n{"body": "b"]}',                        # a list over two lines
    '{"body": "x", "stream": "s"}',
    '{"body": 5}',
    '{"body": "\\ud800"}',                                   # a lone surrogate
    "[]",
    "{not json",
])
def test_any_other_body_is_left_to_parse_batch(body: str) -> None:
    assert parse_puts(body.encode(), "d") is None


def test_a_body_that_is_not_utf8_or_has_no_stream_is_left_to_parse_batch() -> None:
    assert parse_puts(b'{"body": "\xff"}', "d") is None
    assert parse_puts(PUT_LINES[0].encode(), None) is None
    assert parse_puts(PUT_LINES[0].encode(), "") is None


def test_a_clean_body_is_decoded_without_a_python_step_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import meshd.api.batch as batch

    def per_line(*_args: object) -> None:
        raise AssertionError("a per-line decoding step ran")
    monkeypatch.setattr(batch, "record_of", per_line)
    monkeypatch.setattr(batch, "parse_record", per_line)
    body = "".join(json.dumps({"body": f"r{i}"}) + "\n" for i in range(1000)).encode()
    assert parse_puts(body, "d") == [f"r{i}".encode() for i in range(1000)]


def puts_agree_with_parse_batch(body: bytes) -> None:
    """When parse_puts answers a body at all, parse_batch reads the same puts from it."""
    bodies = parse_puts(body, "d")
    if bodies is not None:
        records, answers = parse_batch(body, "d")
        assert records == [BatchRecord("put", "d", None, b) for b in bodies]
        assert answers == [(n, None) for n in range(1, len(bodies) + 1)]


FRAGMENTS = ['{', '}', '[', ']', '"body"', '"op"', ':', ',', '"x"', '"\\u00e9"', '1', ' ', '\r', '\n',
             '{"body": "y"}', '{"body": "z"}\n', '{"body":', '}\n', '\\"', '"', '\\ud800']


@given(st.lists(st.sampled_from(FRAGMENTS), max_size=24))
@settings(max_examples=600, deadline=None)
def test_parse_puts_never_answers_what_parse_batch_would_not(fragments: list[str]) -> None:
    puts_agree_with_parse_batch("".join(fragments).encode())


# The raw way (batch._raw_strings): lines as json.dumps writes them whose texts need no
# decoding are cut out of the body as they are, with no JSON decoding at all.

def test_a_clean_dumps_body_is_cut_without_decoding_json(monkeypatch: pytest.MonkeyPatch) -> None:
    import meshd.api.batch as batch

    class NoDecoder:
        def decode(self, *_args: object) -> None:
            raise AssertionError("the body was decoded as JSON")
        raw_decode = decode
    monkeypatch.setattr(batch, "_DECODER", NoDecoder())
    texts = [f"{i:08d}" + "x" * 192 for i in range(1000)] + ["", "é ü \x7f €"]
    spaced = "".join(json.dumps({"body": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    compact = "\n".join(json.dumps({"body": t}, ensure_ascii=False, separators=(",", ":"))
                        for t in texts).encode()
    for body in (spaced, compact):
        assert parse_puts(body, "d") == [t.encode() for t in texts]


@pytest.mark.parametrize(("line", "first"), [
    ('{"body": "a\\"b"}', b'a"b'),           # an escaped quote: decoded by the JSON ways
    ('{"body": "a\\\\b"}', b"a\\b"),      # an escaped backslash
    ('{"body": "\\u00e9"}', "é".encode()),   # an escape for a character
    ('{"body":"a"}', b"a"),                     # two spellings in one body
    ('{"body": "a"}\r', b"a"),                 # a carriage return after the value
    ('{"body": "a\tb"}', None),                # a raw tab: JSON refuses it
    ('{"body": "a\x00b"}', None),              # a raw NUL
    ('{"body": "a"b"}', None),                  # a quote that ends the string early
    ('{"body": "a"}, "x"}', None),              # more than the one string on the line
    ('{"body": "\ud800"}', None),              # a lone surrogate (not UTF-8)
    ('{"body": "}', None),                      # the key's quote taken for the string's end
])
def test_what_the_raw_way_leaves_gets_the_answer_parse_batch_gives(line: str, first: bytes | None) -> None:
    body = (line + "\n" + json.dumps({"body": "z"}) + "\n").encode("utf-8", "surrogatepass")
    bodies = parse_puts(body, "d")
    records, answers = parse_batch(body, "d")
    if first is None:
        assert bodies is None
        assert answers[0][0] == 1 and answers[0][1] is not None  # parse_batch refuses line 1
    else:
        assert bodies == [first, b"z"]
        assert records == [BatchRecord("put", "d", None, b) for b in bodies]
        assert answers == [(1, None), (2, None)]


RAW_FRAGMENTS = ['{"body": "', '{"body":"', '"}', '"}\n', '\n', '"', '\\', '\\"', '\t', 'x', 'é',
                 '\x00', '\x7f', '}', '{', ' ', '\\u00e9', '"}\n{"body": "', '"}\n{"body":"']


@given(st.lists(st.sampled_from(RAW_FRAGMENTS), max_size=20))
@settings(max_examples=800, deadline=None)
def test_the_raw_way_never_answers_what_parse_batch_would_not(fragments: list[str]) -> None:
    puts_agree_with_parse_batch("".join(fragments).encode())
