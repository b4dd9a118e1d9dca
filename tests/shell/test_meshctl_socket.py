"""Which daemon meshctl talks to: --socket, $MESHD_SOCKET, the user's own, the system's."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from meshd.cmd import meshctl

from . import test_api
from .test_api import Served
from .test_client_meshctl import in_thread

served = test_api.served


@pytest.fixture
def no_user_daemon(monkeypatch: pytest.MonkeyPatch, short_dir: Path) -> Path:
    runtime = short_dir / "runtime"
    runtime.mkdir()
    for variable in ("MESHD_SOCKET", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime / "meshd" / "meshd.sock"


async def test_meshd_socket_is_honoured(served: Served, no_user_daemon: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESHD_SOCKET", str(served.path))
    assert await in_thread(meshctl.main, ["status"]) == 0
    assert "circle: c0ffee" in capsys.readouterr().out


async def test_the_system_socket_when_the_user_has_no_daemon(
        served: Served, no_user_daemon: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(meshctl, "SYSTEM_SOCKET", served.path, raising=False)
    assert await in_thread(meshctl.main, ["status"]) == 0
    assert "circle: c0ffee" in capsys.readouterr().out


def test_the_user_daemon_wins_when_both_run(no_user_daemon: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    no_user_daemon.parent.mkdir()
    system = no_user_daemon.parent / "system.sock"
    for path in (no_user_daemon, system):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    monkeypatch.setattr(meshctl, "SYSTEM_SOCKET", system)
    assert meshctl.choose_socket(None) == no_user_daemon
    no_user_daemon.unlink()
    assert meshctl.choose_socket(None) == system
    assert meshctl.choose_socket(Path("/x.sock")) == Path("/x.sock")


async def test_neither_running_names_both_places(no_user_daemon: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(meshctl, "SYSTEM_SOCKET", no_user_daemon.parent / "system.sock")
    assert await in_thread(meshctl.main, ["status"]) == meshctl.EXIT_NOT_RUNNING
    err = capsys.readouterr().err
    assert str(no_user_daemon) in err and str(no_user_daemon.parent / "system.sock") in err
