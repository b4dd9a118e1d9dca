"""meshctl as people type it: --json anywhere, big bodies, and what the server's refusals say."""

from __future__ import annotations

import io
import json
import sys

import pytest

from meshd.api.client import Client, ClientError
from meshd.cmd import meshctl

from . import test_api
from .test_api import Served
from .test_client_meshctl import in_thread, run_meshctl

served = test_api.served
MIB = 1024 * 1024


@pytest.mark.parametrize("argv", [["--json", "peers"], ["peers", "--json"]])
async def test_json_anywhere_on_the_line(served: Served, argv: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_meshctl(served, *argv) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == "lan"


async def test_json_after_a_nested_command(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_meshctl(served, "relay", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []  # JSON, not the "No relays" sentence


async def test_a_body_too_large_is_the_servers_413_not_a_broken_pipe(served: Served) -> None:
    with pytest.raises(ClientError) as caught:
        await in_thread(Client(served.path).write, "s", "x" * (2 * MIB))
    assert (caught.value.status, caught.value.code) == (413, "too-large")
    assert "exceeds" in str(caught.value)


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


async def test_send_stdin_takes_a_full_mebibyte_of_bytes(served: Served, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = bytes(range(256)) * (MIB // 256)  # 1 MiB, not UTF-8: base64 would make it 1.33 MiB
    monkeypatch.setattr(sys, "stdin", _Stdin(data))
    assert await run_meshctl(served, "send", "files", "-", "--id", "blob") == 0
    assert served.control.records["files"] == [
        {"id": "blob", "author": bytes.fromhex("a1b2c3d4"), "body": data}]
    assert "Saved record blob" in capsys.readouterr().out


async def test_send_stdin_over_the_limit_is_refused_before_sending(
        served: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", _Stdin(b"x" * (MIB + 1)))
    assert await run_meshctl(served, "send", "files", "-") == meshctl.EXIT_USAGE
    assert "split it" in capsys.readouterr().err
    assert "files" not in served.control.records
