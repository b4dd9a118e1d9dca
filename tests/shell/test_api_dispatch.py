"""serve_api's dispatch keeps the resolution of request lines it has seen (issue 16: writers
send the same line request after request): a repeated line is not parsed and matched again,
yet each request gets its own Request, errors are answered anew each time, the kept lines
are bounded, and a replaced route table is not answered from the old one."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from meshd.api import routes

from .test_api import Served, call, served  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("short_dir")


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    real = routes.resolve

    def spy(method: str, target: str) -> Any:
        lines.append((method, target))
        return real(method, target)
    monkeypatch.setattr(routes, "resolve", spy)
    return lines


async def test_a_repeated_request_line_is_resolved_once(served: Served,  # noqa: F811
                                                        resolved: list[tuple[str, str]]) -> None:
    for i in range(3):
        reply = await call(served.path, "POST", "/v1/streams/chat/records", {"body": f"m{i}"})
        assert reply.status == 201
    reply = await call(served.path, "POST", "/v1/streams/other/records", {"body": "x"})
    assert reply.status == 201
    assert resolved == [("POST", "/v1/streams/chat/records"), ("POST", "/v1/streams/other/records")]
    assert [r["body"] for r in served.control.records["chat"]] == [b"m0", b"m1", b"m2"]
    assert len(served.control.records["other"]) == 1  # each request its own params and body


async def test_errors_are_resolved_and_answered_each_time(served: Served,  # noqa: F811
                                                          resolved: list[tuple[str, str]]) -> None:
    for _ in range(2):
        assert (await call(served.path, "POST", "/v1/nowhere")).status == 404
        assert (await call(served.path, "PUT", "/v1/status")).status == 405
    assert len(resolved) == 4


async def test_the_kept_lines_are_bounded(served: Served, resolved: list[tuple[str, str]],  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "SEEN_LINES", 2)
    for target in ("/v1/streams/a/records", "/v1/streams/b/records", "/v1/streams/c/records",
                   "/v1/streams/a/records"):
        assert (await call(served.path, "POST", target, {"body": "x"})).status == 201
    assert len(resolved) == 4  # the third line started the kept lines afresh


async def test_a_replaced_route_table_is_used_for_lines_seen_before(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    assert (await call(served.path, "GET", "/v1/status")).status == 200

    async def moved(control: Any, request: Any) -> Any:
        return routes.json_response({"moved": True})
    status = next(r for r in routes.ROUTES if r.pattern == ("v1", "status"))
    monkeypatch.setattr(routes, "ROUTES", [dataclasses.replace(status, handler=moved)
                                           if r is status else r for r in routes.ROUTES])
    reply = await call(served.path, "GET", "/v1/status")
    assert reply.status == 200 and reply.json == {"moved": True}
