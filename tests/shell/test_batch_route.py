"""The batch route (POST /v1/batch) against a stand-in for the daemon: which way a body
takes (write_puts for {"body": TEXT} lines, write_batch record by record otherwise), that
the answers are the same per line either way, and that a large body is decoded off the
trio thread."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

import meshd.api.batch as batch
import meshd.api.routes as routes
from meshd.api.batch import BatchRecord
from meshd.api.values import Request


class Control:
    """write_puts / write_batch as the daemon answers them, numbering seqs from 1."""

    def __init__(self, *, puts_refused: bool = False) -> None:
        self.puts_refused = puts_refused
        self.calls: list[str] = []
        self.seq = 0

    async def write_puts(self, stream: str, bodies: list[bytes]) -> list[tuple[str, int]] | None:
        self.calls.append("write_puts")
        if self.puts_refused:
            return None
        return [(f"id{self._next()}", self.seq) for _ in bodies]

    async def write_batch(self, records: list[BatchRecord]) -> list[dict[str, Any]]:
        self.calls.append("write_batch")
        return [{"error": {"code": "invalid-argument", "message": "no"}} if r.body == b"bad"
                else {"id": r.record_id or f"id{self._next()}", "seq": self.seq} for r in records]

    def _next(self) -> int:
        self.seq += 1
        return self.seq


async def post(control: Control, body: bytes, **query: str) -> dict[str, Any]:
    request = Request("POST", "/v1/batch", {k: [v] for k, v in query.items()}, body=body)
    response = await routes._write_batch(control, request)  # type: ignore[arg-type]
    answer: dict[str, Any] = json.loads(response.body)
    return answer


def lines(*texts: str) -> bytes:
    return "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()


async def test_text_lines_take_write_puts_and_answer_every_line() -> None:
    control = Control()
    answer = await post(control, lines("a", "b", "c"), stream="s")
    assert control.calls == ["write_puts"]
    assert answer == {"written": 3, "failed": 0, "results": [
        {"line": 1, "id": "id1", "seq": 1}, {"line": 2, "id": "id2", "seq": 2},
        {"line": 3, "id": "id3", "seq": 3}]}
    assert await post(Control(), lines("a", "b"), stream="s", results="errors") == {
        "written": 2, "failed": 0, "results": []}


async def test_text_lines_write_puts_refuses_are_answered_record_by_record() -> None:
    control = Control(puts_refused=True)
    answer = await post(control, lines("a", "bad", "c"), stream="s")
    assert control.calls == ["write_puts", "write_batch"]
    assert answer == {"written": 2, "failed": 1, "results": [
        {"line": 1, "id": "id1", "seq": 1},
        {"line": 2, "error": {"code": "invalid-argument", "message": "no"}},
        {"line": 3, "id": "id2", "seq": 2}]}


async def test_a_bad_line_in_the_middle_gets_its_own_answer_and_the_rest_are_written() -> None:
    control = Control()
    body = lines("a") + b"{not json\n" + lines("c")
    answer = await post(control, body, stream="s")
    assert control.calls == ["write_batch"]
    assert answer == {"written": 2, "failed": 1, "results": [
        {"line": 1, "id": "id1", "seq": 1},
        {"line": 2, "error": {"code": "bad-json", "message": "the line is not valid JSON"}},
        {"line": 3, "id": "id2", "seq": 2}]}


@pytest.mark.parametrize("clean", [True, False])
async def test_a_large_body_is_decoded_off_the_trio_thread(
        monkeypatch: pytest.MonkeyPatch, clean: bool) -> None:
    threads: list[threading.Thread] = []
    for name in ("parse_puts", "parse_batch"):
        real = getattr(batch, name)

        def spy(*args: Any, real: Any = real) -> Any:
            threads.append(threading.current_thread())
            return real(*args)
        monkeypatch.setattr(routes, name, spy)
    texts = [f"{i:08d}" + "x" * 192 for i in range(400)]  # ~85 KiB
    body = lines(*texts) if clean else lines(*texts) + b"{not json\n"
    assert len(body) >= routes.THREAD_PARSE_BYTES
    answer = await post(Control(), body, stream="s", results="errors")
    assert (answer["written"], answer["failed"]) == (400, 0 if clean else 1)
    assert threads and threading.main_thread() not in threads
    threads.clear()
    await post(Control(), lines("small"), stream="s")
    assert threads == [threading.main_thread()]  # a small body: no thread hop
