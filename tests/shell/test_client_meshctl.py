"""meshd.api.client and meshctl against the real API server (with the FakeControl daemon double).

The client is blocking, so each call runs in a worker thread while the trio test serves.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.api.client import Client, ClientError, DaemonNotRunning
from meshd.api.routes import open_unix_listener, serve_api
from meshd.cmd import ctlrecovery, meshctl
from meshd.identity import fingerprint
from meshd.protocol.admission import format_token

from . import test_api
from .test_api import FakeControl, Served, wait_until

served = test_api.served  # the fixtures, shared with the server tests


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


async def run_meshctl(served: Served, *argv: str) -> int:
    return await in_thread(meshctl.main, ["--socket", str(served.path), *argv])


# --- the client ---------------------------------------------------------------------------

async def test_client_methods_map_to_the_routes(served: Served) -> None:
    client = Client(served.path)
    assert (await in_thread(client.status))["circle"] == "c0ffee"
    assert (await in_thread(client.peers))[0]["path"] == "lan"
    assert len(await in_thread(client.devices)) == 2
    assert (await in_thread(client.invite))["code"] == "17-purple-sausage"
    assert (await in_thread(client.join, "17-purple-sausage"))["circle"] == "c0ffee"
    assert (await in_thread(client.remove, "e5f6a7b8"))["removed"] == "e5f6a7b8"
    assert len((await in_thread(client.recovery_key))["words"]) == 24
    await in_thread(client.recover, ["a", "b"], "relay:1#k")
    assert served.control.calls[-1] == ("recover", ["a", "b"], "relay:1#k")
    await in_thread(client.add_relay, "relay:1#k")
    assert (await in_thread(client.relays))[0]["address"] == "relay:1#k"
    assert (await in_thread(client.write, "a b/c", "text"))["id"] == "r1"
    assert (await in_thread(client.write, "a b/c", b"\xff", "raw"))["id"] == "raw"
    page = await in_thread(client.read, "a b/c", None, 1)
    assert page["records"][0]["body"] == "text" and page["next"] == "1"
    assert (await in_thread(client.read, "a b/c", "1"))["records"][0]["body_b64"] == "/w=="
    await in_thread(client.delete, "a b/c", "raw")
    assert await in_thread(client.streams) == [{"stream": "a b/c", "records": 1}]
    assert (await in_thread(client.clear, "a b/c"))["stream"] == "a b/c"
    assert served.control.calls[-1] == ("clear", "a b/c")
    assert await in_thread(client.streams) == [{"stream": "a b/c", "records": 0}]
    assert "meshd_entries_total 0" in await in_thread(client.metrics)


async def test_client_errors_carry_the_stable_code(served: Served) -> None:
    client = Client(served.path)
    with pytest.raises(ClientError) as caught:
        await in_thread(client.remove, "nope")
    assert (caught.value.code, caught.value.status) == ("unknown-device", 404)
    assert "no device nope" in str(caught.value)


async def test_a_missing_or_dead_socket_is_daemon_not_running(short_dir: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="meshd is not running"):
        await in_thread(Client(short_dir / "absent.sock").status)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(short_dir / "dead.sock"))  # a socket file nobody listens on
    dead.close()
    with pytest.raises(DaemonNotRunning) as caught:
        await in_thread(Client(short_dir / "dead.sock").status)
    assert caught.value.code == "daemon-not-running"


async def test_client_events_are_live_on_return_and_close_from_another_thread(served: Served) -> None:
    stream = await in_thread(lambda: Client(served.path).events(["entry"]))
    got: list[dict[str, Any]] = []
    first = threading.Event()

    def consume() -> None:
        for event in stream:
            got.append(event)
            first.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, consume)
        served.control.events.publish("peer.up", device="x")
        served.control.events.publish("entry", stream="s", id="r9")
        await in_thread(first.wait, 5)
        stream.close()  # unblocks the consumer's readline
    assert [(e["type"], e["data"]["id"]) for e in got] == [("entry", "r9")]


# --- meshctl ------------------------------------------------------------------------------

async def test_meshctl_status_human_and_json(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_meshctl(served, "status") == 0
    out = capsys.readouterr().out
    assert "device.name: laptop\n" in out and "circle: c0ffee\n" in out
    assert await run_meshctl(served, "--json", "status") == 0
    assert json.loads(capsys.readouterr().out) == served.control.status()


async def test_meshctl_tables(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_meshctl(served, "peers") == 0
    assert capsys.readouterr().out.splitlines() == [
        "DEVICE            NAME  PATH  ADDRESS",
        "e5f6a7b8e5f6a7b8  pi    lan   127.0.0.1:7743",  # keys shortened to a readable prefix
    ]
    assert await run_meshctl(served, "devices") == 0
    assert capsys.readouterr().out.splitlines() == [
        "ID        NAME    THIS",
        "a1b2c3d4  laptop  yes",
        "e5f6a7b8  pi      no",
    ]
    assert await run_meshctl(served, "relay", "list") == 0
    assert "No relays. Add one with `meshctl relay add" in capsys.readouterr().out


async def test_meshctl_invite_and_join_with_progress(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_meshctl(served, "invite") == 0
    out = capsys.readouterr().out
    assert "Invitation code: 17-purple-sausage" in out and "meshctl join 17-purple-sausage" in out
    assert "expires in 300 s" in out
    served.control.join_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        result: list[int] = []

        async def join() -> None:
            result.append(await run_meshctl(served, "join", "17-purple-sausage"))
        nursery.start_soon(join)
        # Wait until meshctl's progress stream and the join are both in.
        await wait_until(lambda: bool(served.control.events.subscriber_count and served.control.calls))
        served.control.join_gate.set()
    captured = capsys.readouterr()
    assert result == [0]
    assert "Joined the circle" in captured.out and "apple brick cloud delta" in captured.out.replace(",", " ")
    assert "Joining with code 17-purple-sausage" in captured.err
    assert "pair.found address=127.0.0.1:7743" in captured.err


async def test_meshctl_exit_codes_and_messages(served: Served, capsys: pytest.CaptureFixture[str],
                                               short_dir: Path) -> None:
    assert await run_meshctl(served, "join", "1-bad-code") == 1
    assert "the code did not match; ask for a new invitation [wrong-code]" in capsys.readouterr().err
    assert await in_thread(meshctl.main, ["--socket", str(short_dir / "none.sock"), "status"]) == 3
    assert "Start it with `systemctl start meshd`" in capsys.readouterr().err
    assert await in_thread(meshctl.main, ["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert await in_thread(meshctl.main, ["--help"]) == 0


async def test_meshctl_send_log_and_remove(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_meshctl(served, "send", "chat", "hello there") == 0
    assert await run_meshctl(served, "send", "chat", "second", "--id", "m2") == 0
    assert capsys.readouterr().out.splitlines() == ["Saved record r1 in chat.", "Saved record m2 in chat."]
    assert await run_meshctl(served, "log", "chat", "--limit", "1") == 0
    assert capsys.readouterr().out.splitlines() == [  # no time (the fake has no hlc), author's fingerprint
        f"-  {fingerprint(bytes.fromhex('a1b2c3d4'))}  r1  hello there", "(more: meshctl log chat --after 1)"]
    assert await run_meshctl(served, "--json", "log", "chat") == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["records"]] == ["r1", "m2"]
    assert await run_meshctl(served, "remove", "e5f6a7b8") == 0
    assert "Removed e5f6a7b8" in capsys.readouterr().out and not served.control.forced
    served.control.device_list.append({"id": "e5f6a7b8"})
    assert await run_meshctl(served, "remove", "--force", "e5f6a7b8") == 0
    assert served.control.forced and served.control.distrust_since_ms is None


async def test_meshctl_remove_distrust_since(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    """--distrust-since reaches the daemon as unix milliseconds (UTC unless a zone is given)."""
    assert await run_meshctl(served, "remove", "--distrust-since", "2026-12-01T10:00", "e5f6a7b8") == 0
    assert served.control.distrust_since_ms == 1_796_119_200_000
    served.control.device_list.append({"id": "e5f6a7b8"})
    assert await run_meshctl(served, "remove", "--distrust-since", "2026-12-01T10:00+01:00",
                             "e5f6a7b8") == 0
    assert served.control.distrust_since_ms == 1_796_119_200_000 - 3_600_000
    capsys.readouterr()
    assert await run_meshctl(served, "remove", "--distrust-since", "yesterday", "e5f6a7b8") == 2
    assert "not a time" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_meshctl_clear_asks_first_and_takes_yes_for_scripts(
        served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    await run_meshctl(served, "send", "chat", "hello")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # a script, no terminal: never asks
    assert await run_meshctl(served, "clear", "chat") == 2
    assert "pass --yes" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", _Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt: "chat?")  # not the stream's name
    assert await run_meshctl(served, "clear", "chat") == 2
    assert "nothing was cleared" in capsys.readouterr().err
    assert ("clear", "chat") not in served.control.calls
    monkeypatch.setattr("builtins.input", lambda prompt: "chat")
    assert await run_meshctl(served, "clear", "chat") == 0
    assert served.control.calls[-1] == ("clear", "chat")
    assert "Cleared chat" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert await run_meshctl(served, "--json", "clear", "notes", "--yes") == 0
    assert json.loads(capsys.readouterr().out)["stream"] == "notes"
    assert served.control.calls[-1] == ("clear", "notes")


async def test_meshctl_recovery_key_and_recover_from_stdin(
        served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert await run_meshctl(served, "recovery-key") == 0
    out = capsys.readouterr().out
    assert "Write these words on paper" in out and "24. word23" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("Alpha  beta\ngamma\n"))
    assert await run_meshctl(served, "recover", "--relay", "relay:7744#k", "--yes") == 0
    assert served.control.calls[-1] == ("recover", ["alpha", "beta", "gamma"], "relay:7744#k")
    # It previewed, showed both devices, and (--yes) re-admitted both.
    assert served.control.recover_options[-2:] == [(True, None), (False, ["a1" * 32, "e5" * 32])]
    out = capsys.readouterr().out
    assert "Recovered in" in out and "stolen phone" in out and "no entry in the backup" in out
    # Interactive: it asks about each device and re-admits only what the owner accepts.
    asked: list[str] = []
    monkeypatch.setattr(ctlrecovery, "_ask", lambda question: asked.append(question) or "laptop" in question)
    monkeypatch.setattr("sys.stdin", io.StringIO("alpha beta gamma"))
    assert await run_meshctl(served, "recover") == 0
    assert len(asked) == 2 and served.control.recover_options[-1] == (False, ["a1" * 32])
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert await run_meshctl(served, "recover") == 2


async def test_meshctl_watch_prints_events_until_the_daemon_goes(
        short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    control = FakeControl()
    path = short_dir / "meshd.sock"
    result: list[int] = []

    async def watch() -> None:
        result.append(await in_thread(meshctl.main, ["--socket", str(path), "--json", "watch",
                                                     "--types", "entry"]))

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as server:
            listener = await open_unix_listener(path)
            await server.start(partial(serve_api, control, listener, allowed_uids=set()))
            outer.start_soon(watch)
            await wait_until(lambda: control.events.subscriber_count == 1)
            control.events.publish("peer.up", device="x")
            control.events.publish("entry", stream="s", id="r1")
            printed: list[str] = []

            def entry_printed() -> bool:
                printed.append(capsys.readouterr().out)
                return '"r1"' in "".join(printed)
            await wait_until(entry_printed)
            server.cancel_scope.cancel()  # the daemon goes away: the stream ends, watch fails
    captured = capsys.readouterr()
    printed.append(captured.out)
    lines = [json.loads(line) for line in "".join(printed).splitlines()]
    assert result == [meshctl.EXIT_NOT_RUNNING]  # a script must see that watching stopped
    assert "meshd closed the event stream" in captured.err
    assert [(line["type"], line["data"]) for line in lines] == [("entry", {"stream": "s", "id": "r1"})]


async def test_meshctl_relay_add_passes_the_enrolment_token_and_never_echoes_it(
        served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    token = bytes(range(7, 39))
    text = format_token(token)
    assert await run_meshctl(served, "relay", "add", "relay:7744#k", "--token", text) == 0
    assert served.control.relay_tokens[-1] == token
    monkeypatch.setattr("sys.stdin", io.StringIO(text + "\n"))  # `--token -`: off the command line
    assert await run_meshctl(served, "relay", "add", "relay:7745#k", "--token", "-") == 0
    assert served.control.relay_tokens[-1] == token
    assert await run_meshctl(served, "relay", "add", "relay:7746#k") == 0
    assert served.control.relay_tokens[-1] is None
    out = capsys.readouterr()
    assert text not in out.out + out.err
    # A near miss is refused by the daemon with a stable code, and not echoed.
    assert await run_meshctl(served, "relay", "add", "relay:7747#k", "--token", text[:-1] + "!") != 0
    out = capsys.readouterr()
    assert "bad-token" in out.out + out.err and text[:-1] not in out.out + out.err
