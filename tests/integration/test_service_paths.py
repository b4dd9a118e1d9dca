"""The services as systemd runs them: every path on the command line, a configuration error
that stops the unit instead of looping, and group `meshd` members using the system socket.

The group test runs the real `meshd run` under systemd-socket-activate (LISTEN_FDS, as
meshd.socket passes it) and connects as another uid through the socket file's group.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd import config
from meshd.cmd import meshd as cli

REPO = Path(__file__).resolve().parent.parent.parent
UNITS = REPO / "systemd"
# A uid and two gids no account uses: the caller is "some user in group meshd" or not.
CALLER_UID, MEMBER_GID, OTHER_GID = 61_234, 61_235, 61_236


def unit(relative: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None,
                                          comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / relative)
    return parser


def exec_start(relative: str) -> list[str]:
    words = shlex.split(unit(relative)["Service"]["ExecStart"])
    assert words[0] == "/usr/bin/meshd"
    return words[1:]


@pytest.mark.parametrize(("relative", "socket_unit", "config_path", "state_dir"), [
    ("meshd.service", "meshd.socket", "/etc/meshd/meshd.toml", "/var/lib/meshd"),
    ("user/meshd.service", "user/meshd.socket", "%E/meshd/meshd.toml", "%S/meshd"),
])
def test_the_units_pass_every_path_explicitly(relative: str, socket_unit: str, config_path: str,
                                              state_dir: str) -> None:
    words = exec_start(relative)
    options = dict(zip(words[1::2], words[2::2], strict=False))
    assert words[0] == "run" and options.get("--config") == config_path
    service = unit(relative)["Service"]
    assert config_path.startswith(("/etc/", "%E/")) and service["ConfigurationDirectory"] == "meshd"
    assert options["--state-dir"] == state_dir
    assert state_dir.rsplit("/", 1)[1] == service["StateDirectory"]
    assert options["--socket"] == unit(socket_unit)["Socket"]["ListenStream"]
    args = cli.build_parser().parse_args(words)  # and meshd accepts the line as it is
    assert (str(args.config), str(args.state_dir), str(args.socket)) == (
        config_path, state_dir, options["--socket"])


def test_default_paths_do_not_depend_on_the_uid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A DynamicUser= service is not root: the uid must not pick between /etc and ~/.config."""
    for variable in ("CONFIGURATION_DIRECTORY", "STATE_DIRECTORY", "RUNTIME_DIRECTORY",
                     "XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    seen = set()
    for uid in (0, 61_234):
        monkeypatch.setattr(os, "geteuid", lambda uid=uid: uid)
        seen.add((config.default_config_path(), config.default_state_dir(), config.default_socket_path()))
    assert seen == {(tmp_path / ".config/meshd/meshd.toml", tmp_path / ".local/state/meshd",
                     tmp_path / "run/meshd/meshd.sock")}
    # What systemd passes (ConfigurationDirectory= and friends) is used as given.
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", "/etc/meshd")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/meshd")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/meshd")
    assert config.default_config_path() == Path("/etc/meshd/meshd.toml")
    assert config.default_state_dir() == Path("/var/lib/meshd")
    assert config.default_socket_path() == Path("/run/meshd/meshd.sock")


@pytest.mark.parametrize("text", ["devise_name = 'laptop'\n", None])
def test_a_configuration_error_exits_78(tmp_path: Path, text: str | None) -> None:
    path = tmp_path / "meshd.toml"
    if text is not None:
        path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "meshd", "run", "--config", str(path), "--state-dir",
         str(tmp_path / "state"), "--socket", str(tmp_path / "api.sock")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 78 == cli.EXIT_CONFIG
    assert str(path) in result.stderr
    assert ("devise_name" if text else "no such configuration file") in result.stderr
    assert not (tmp_path / "state").exists()  # stopped before touching anything


@pytest.mark.parametrize("relative", ["meshd.service", "meshd-relay.service", "user/meshd.service"])
def test_units_do_not_restart_on_a_configuration_error(relative: str) -> None:
    service = unit(relative)["Service"]
    assert service["Restart"] == "on-failure"
    assert "78" in service["RestartPreventExitStatus"].split()


# --- group access to the system socket ---------------------------------------------------

@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A short directory other uids may traverse (the socket file's mode is the gate)."""
    directory = Path(tempfile.mkdtemp(prefix="meshd-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# Runs as the caller: the system Python, no meshd import, one raw HTTP request.
CALLER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
sock.sendall(b"GET /v1/status HTTP/1.1\\r\\nHost: meshd\\r\\nConnection: close\\r\\n\\r\\n")
print(sock.recv(4096).split(b"\\r\\n")[0].decode())
"""


def call_as(path: Path, gid: int) -> str:
    result = subprocess.run(["/usr/bin/python3", "-I", "-c", CALLER, str(path)], user=CALLER_UID,
                            group=gid, extra_groups=[], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.slow
def test_members_of_the_socket_group_may_use_the_activated_api(open_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the caller as another uid and group")
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    path = open_dir / "meshd.sock"
    (open_dir / "meshd.toml").write_text("")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    daemon = subprocess.Popen(
        [activate, "-l", str(path), "-E", "PYTHONPATH", sys.executable, "-m", "meshd", "run", "--config",
         str(open_dir / "meshd.toml"), "--state-dir", str(open_dir / "state"), "--socket",
         str(path), "--listen", "127.0.0.1:0", "--no-discovery"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert daemon.stderr is not None
        # "Listening on PATH as 3.": the socket exists and meshd starts at the first connection,
        # after meshd.socket's SocketMode=0660 and SocketGroup= are applied here.
        assert "Listening on" in daemon.stderr.readline()
        path.chmod(0o660)
        os.chown(path, 0, MEMBER_GID)
        assert call_as(path, MEMBER_GID) == "HTTP/1.1 200 OK"
        assert call_as(path, OTHER_GID) == "EACCES"  # the file's mode is the first gate
        path.chmod(0o666)
        assert call_as(path, OTHER_GID) == "HTTP/1.1 403 Forbidden"  # SO_PEERCRED the second
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)
        assert daemon.stderr is not None
        daemon.stderr.close()


def test_the_dynamic_user_leaves_the_socket_to_group_meshd() -> None:
    """Found by booting the units under systemd (tests/deploy): a DynamicUser= named like an
    existing group fails with 217/USER, and a RuntimeDirectory= holding the activated socket
    is chowned to the dynamic user's group, which locks group meshd out."""
    service, socket_unit = unit("meshd.service")["Service"], unit("meshd.socket")["Socket"]
    group = socket_unit["SocketGroup"]
    assert service["DynamicUser"] == "yes"
    assert service.get("User", "meshd") != group and service.get("Group", group + "-") != group
    socket_dir = socket_unit["ListenStream"].rsplit("/", 1)[0]
    runtime = service.get("RuntimeDirectory")
    assert runtime is None or f"/run/{runtime}" != socket_dir
    assert (REPO / "systemd/sysusers.d/meshd.conf").read_text().count(f"\ng {group} -") == 1
