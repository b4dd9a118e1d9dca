"""The batch write route (POST /v1/batch), meshd.api.client's batch methods and `meshctl import`,
against a real `meshd run` process over its API socket.

What is checked: every line gets its own answer in line order (bad lines an error with a
stable code, good lines an id and seq); the good lines of a request are all written and the
bad ones change nothing; an import split over several requests numbers its lines across
the whole input; meshctl import reports refused lines and exits 1.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from meshd.api.client import Client

from .daemons import DaemonProcess


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[DaemonProcess]:
    process = DaemonProcess(tmp_path, "solo", discovery=False)
    await process.start()
    try:
        yield process
    finally:
        process.kill()


async def test_a_batch_answers_every_line_and_writes_exactly_the_good_ones(
        daemon: DaemonProcess) -> None:
    lines = [
        json.dumps({"stream": "notes", "id": "a", "body": "first"}),          # 1 ok
        "{not json",                                                           # 2 bad-json
        json.dumps({"stream": "notes", "body_b64": base64.b64encode(b"\xff\x00").decode()}),  # 3 ok
        "",                                                                    # 4 blank: no answer
        json.dumps({"stream": "notes", "id": "b"}),                            # 5 no body
        json.dumps(["a", "list"]),                                             # 6 not an object
        json.dumps({"stream": "x" * 300, "body": "too long a stream name"}),   # 7 daemon refuses
        json.dumps({"body": "default stream"}),                                # 8 ok (?stream=)
        json.dumps({"stream": "notes", "id": "a", "body": "second"}),          # 9 ok, replaces a
        json.dumps({"stream": "notes", "body": "\ud800"}),                     # 10 lone surrogate
        json.dumps({"stream": "notes", "op": "delete"}),                       # 11 delete without id
        json.dumps({"stream": "other", "id": "gone", "op": "delete"}),         # 12 ok
    ]
    client = Client(daemon.socket_path)
    before = (await daemon.status())["entries"]
    result = await trio.to_thread.run_sync(
        lambda: client.write_batch("\n".join(lines).encode() + b"\n", stream="inbox"))

    answers = {answer["line"]: answer for answer in result["results"]}
    assert [answer["line"] for answer in result["results"]] == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12]
    codes = {line: a["error"]["code"] for line, a in answers.items() if "error" in a}
    assert codes == {2: "bad-json", 5: "invalid-argument", 6: "bad-json", 7: "invalid-argument",
                     10: "invalid-argument", 11: "invalid-argument"}
    good = [1, 3, 8, 9, 12]
    assert (result["written"], result["failed"]) == (len(good), 6)
    # The good lines are consecutive entries of this device's log, in line order.
    seqs = [answers[line]["seq"] for line in good]
    assert seqs == list(range(seqs[0], seqs[0] + len(good)))
    assert answers[1]["id"] == answers[9]["id"] == "a"

    assert (await daemon.status())["entries"] == before + len(good)
    notes = {r["id"]: r for r in await daemon.records("notes")}
    assert set(notes) == {"a", answers[3]["id"]}
    assert notes["a"]["body"] == "second"
    assert base64.b64decode(notes[answers[3]["id"]]["body_b64"]) == b"\xff\x00"
    assert [r["body"] for r in await daemon.records("inbox")] == ["default stream"]


async def test_a_batch_of_only_bad_lines_writes_nothing(daemon: DaemonProcess) -> None:
    client = Client(daemon.socket_path)
    before = (await daemon.status())["entries"]
    result = await trio.to_thread.run_sync(lambda: client.write_batch(b"[]\n{}\n"))
    assert (result["written"], result["failed"]) == (0, 2)
    assert (await daemon.status())["entries"] == before


async def test_an_import_over_many_requests_numbers_lines_across_the_input(
        daemon: DaemonProcess) -> None:
    client = Client(daemon.socket_path)
    lines = [json.dumps({"id": f"r{i:04d}", "body": f"body {i}"}).encode() for i in range(1000)]
    bad = {7, 500, 999}  # 1-based line numbers
    for number in bad:
        lines[number - 1] = b'{"id": 5, "body": "an id must be a string"}'
    lines[300] = json.dumps({"id": "big", "body": "x" * 5000}).encode()  # line 301: alone too large
    reports: list[tuple[int, int]] = []
    result = await trio.to_thread.run_sync(lambda: client.import_lines(
        iter(lines), "bulk", progress=lambda w, f: reports.append((w, f)), request_bytes=4000))
    assert len(reports) >= 9  # ~110 lines per 4000-byte request: many requests, each reported
    assert reports[-1] == (result["written"], result["failed"])
    assert {e["line"]: e["error"]["code"] for e in result["errors"]} == {
        7: "invalid-argument", 500: "invalid-argument", 999: "invalid-argument", 301: "too-large"}
    assert result["written"] == 1000 - 4
    ids = [r["id"] for r in await daemon.records("bulk")]
    assert ids == [f"r{i:04d}" for i in range(1000) if i + 1 not in bad | {301}]


async def test_meshctl_import_reads_ndjson_from_stdin(daemon: DaemonProcess) -> None:
    lines = [json.dumps({"body": f"line {i}"}) for i in range(3000)]
    lines[41] = "not json"
    stdin = ("\n".join(lines) + "\n").encode()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = await trio.run_process(
        [sys.executable, "-m", "meshd.cmd.meshctl", "--socket", str(daemon.socket_path), "import",
         "--stream", "imported"], stdin=stdin, capture_stdout=True, capture_stderr=True,
        check=False, env=env)
    assert done.returncode == 1, done.stderr  # a line was refused
    assert done.stdout.decode().strip() == "Imported 2999 records, 1 failed."
    assert "line 42: the line is not valid JSON [bad-json]" in done.stderr.decode()
    texts = await daemon.texts("imported")
    assert len(texts) == 2999 and "line 41" not in texts and texts[0] == "line 0"


async def test_a_body_of_only_text_lines_answers_each_line_as_the_general_path_does(
        daemon: DaemonProcess) -> None:
    # The usual import body ({"body": TEXT} lines and ?stream=) takes the one-call path
    # (api/batch.parse_puts, StreamService.write_puts): its answers are the same per line.
    client = Client(daemon.socket_path)
    texts = [f"text {i}" for i in range(300)]
    payload = "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()
    result = await trio.to_thread.run_sync(lambda: client.write_batch(payload, stream="plain"))
    assert (result["written"], result["failed"]) == (300, 0)
    assert [a["line"] for a in result["results"]] == list(range(1, 301))
    seqs = [a["seq"] for a in result["results"]]
    assert seqs == list(range(seqs[0], seqs[0] + 300))
    records = await daemon.records("plain")
    assert [r["id"] for r in records] == [a["id"] for a in result["results"]]
    assert [r["body"] for r in records] == texts
    quiet = await trio.to_thread.run_sync(
        lambda: client.write_batch(payload, stream="plain", errors_only=True))
    assert quiet == {"written": 300, "failed": 0, "results": []}


async def test_text_lines_for_a_stream_the_log_cannot_hold_are_each_refused(
        daemon: DaemonProcess) -> None:
    client = Client(daemon.socket_path)
    before = (await daemon.status())["entries"]
    payload = b'{"body": "a"}\n{"body": "b"}\n'
    result = await trio.to_thread.run_sync(lambda: client.write_batch(payload, stream="x" * 300))
    assert (result["written"], result["failed"]) == (0, 2)
    assert [(a["line"], a["error"]["code"]) for a in result["results"]] == [
        (1, "invalid-argument"), (2, "invalid-argument")]
    assert (await daemon.status())["entries"] == before
