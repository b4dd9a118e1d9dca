"""sd_notify through a real NOTIFY_SOCKET datagram socket, and socket activation through
systemd-socket-activate serving the API to a client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from meshd import sdnotify
from meshd.api.client import Client
from meshd.sdnotify import listeners_from_systemd, notify, run_watchdog, watchdog_interval


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    path = short_dir / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(5)
    with receiver:
        yield receiver, {"NOTIFY_SOCKET": str(path)}


def test_notifications_arrive_as_datagrams(notify_socket: tuple[socket.socket, dict[str, str]],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    receiver, env = notify_socket
    assert notify("READY=1\nSTATUS=serving", env=env)
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving"
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert sdnotify.ready("3 peers") and sdnotify.status("syncing") and sdnotify.stopping()
    assert [receiver.recv(4096) for _ in range(3)] == [
        b"READY=1\nSTATUS=3 peers", b"STATUS=syncing", b"STOPPING=1"]


def test_an_abstract_notify_socket_is_supported() -> None:
    name = f"meshd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        assert notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert receiver.recv(4096) == b"WATCHDOG=1"


def test_without_systemd_notify_is_a_quiet_no_op(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert notify("READY=1", env={}) is False
    gone = {"NOTIFY_SOCKET": str(short_dir / "nobody-listens")}
    assert notify("READY=1", env=gone) is False and notify("READY=1", env=gone) is False
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1  # logged once


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1234"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "999"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=1234) == expected


async def test_the_watchdog_pings_at_half_the_interval(
        nursery: trio.Nursery, notify_socket: tuple[socket.socket, dict[str, str]]) -> None:
    receiver, env = notify_socket
    receiver.setblocking(False)
    trio_receiver = trio.socket.from_stdlib_socket(receiver)
    env = {**env, "WATCHDOG_USEC": "200000"}
    assert await nursery.start(lambda task_status: run_watchdog(env=env, task_status=task_status)) == 0.2
    stamps = []
    for _ in range(3):
        assert await trio_receiver.recv(4096) == b"WATCHDOG=1"
        stamps.append(trio.current_time())
    assert 0.18 <= stamps[2] - stamps[0] < 1.0  # two half-intervals


async def test_no_watchdog_means_run_watchdog_returns() -> None:
    with trio.fail_after(1):
        await run_watchdog(env={})


def test_listeners_from_systemd_ignores_variables_meant_for_another_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listeners_from_systemd() == []
    assert "LISTEN_FDS" not in os.environ  # removed so no child inherits them
    assert listeners_from_systemd({}) == []


ACTIVATED_DAEMON = textwrap.dedent("""
    import os
    import trio
    from meshd.api.routes import serve_api
    from meshd.api.events import EventBus
    from meshd.api.metrics import MeshdMetrics
    from meshd.sdnotify import listeners_from_systemd

    class Control:
        events = EventBus()
        metrics = MeshdMetrics()

        def status(self):
            return {"activated": True, "pid": os.getpid(), "listen_fds_left": "LISTEN_FDS" in os.environ}

    async def main():
        listeners = listeners_from_systemd()
        assert len(listeners) == 1, listeners
        await serve_api(Control(), listeners[0], allowed_uids=set())

    trio.run(main)
""")


def test_socket_activation_serves_the_api_on_the_passed_socket(short_dir: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    script = short_dir / "daemon.py"
    script.write_text(ACTIVATED_DAEMON)
    path = short_dir / "meshd.sock"
    # The tool passes the child a clean environment: hand on PYTHONPATH so the child imports
    # the meshd under test (a worktree), not whichever one the venv installed.
    keep = ["-E", "PYTHONPATH"] if "PYTHONPATH" in os.environ else []
    process = subprocess.Popen([activate, "-l", str(path), *keep, sys.executable, str(script)],
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        # It says "Listening on PATH as 3." once the socket exists: then a connect is queued.
        assert "Listening on" in process.stderr.readline()
        status = Client(path).status()
        assert status["activated"] is True and status["listen_fds_left"] is False
        assert status["pid"] == process.pid  # the tool exec()s the daemon: LISTEN_PID matches
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stderr is not None
        process.stderr.close()
