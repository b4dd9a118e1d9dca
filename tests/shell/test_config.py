"""Configuration: defaults, TOML, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.config import DEFAULT_PORT, ConfigError, ListenAddress, load_config, parse_listen


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    return path


def test_an_empty_file_gives_every_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.listen == ListenAddress(None, DEFAULT_PORT)
    assert config.discovery.enabled and config.discovery.interfaces == ()
    assert config.relays == () and config.log_level == "info"
    assert config.backup_window == 20.0
    assert config.deposit_gather == 0.25


def test_a_full_file_is_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f"""
state_dir = "{tmp_path}/state"
socket = "{tmp_path}/api.sock"
listen = "127.0.0.1:9000"
device_name = "laptop"
relays = ["relay.example:7744#AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"]
log_level = "debug"
backup_window = 5
deposit_gather = 0
[discovery]
enabled = false
interfaces = ["eth0", "10.0.0.5"]
"""))
    assert config.state_dir == tmp_path / "state"
    assert config.socket_path == tmp_path / "api.sock"
    assert config.listen == ListenAddress("127.0.0.1", 9000)
    assert config.device_name == "laptop"
    assert config.relays == ("relay.example:7744#AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",)
    assert config.discovery.enabled is False
    assert config.discovery.interfaces == ("eth0", "10.0.0.5")
    assert config.backup_window == 5.0
    assert config.deposit_gather == 0.0


def test_command_line_overrides_win(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'listen = "127.0.0.1:9000"'),
                         {"listen": "127.0.0.2:9001", "state_dir": str(tmp_path / "x"), "socket": None})
    assert config.listen == ListenAddress("127.0.0.2", 9001)
    assert config.state_dir == tmp_path / "x"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("lisen = '1.2.3.4:5'", "'lisen'"),
        ("[discovery]\ninterface = ['eth0']", "discovery.interface"),
        ("listen = 7743", "listen must be a str"),
        ("listen = 'localhost'", "listen"),
        ("listen = 'h:99999'", "listen"),
        ("relays = 'r:1#k'", "relays must be a list"),
        ("relays = ['r:1']", "relays"),
        ("relays = ['r:1#notakey']", "relays"),
        ("log_level = 'loud'", "log_level"),
        ("[discovery]\nenabled = 'yes'", "discovery.enabled must be a bool"),
        ("[discovery]\ninterfaces = [1]", "discovery.interfaces"),
        ("device_name = ''", "device_name"),
        ("backup_window = '20s'", "backup_window must be a number"),
        ("backup_window = true", "backup_window must be a number"),
        ("backup_window = -1", "backup_window must be 0 to 3600"),
        ("backup_window = 86400", "backup_window must be 0 to 3600"),
        ("deposit_gather = '1s'", "deposit_gather must be a number"),
        ("deposit_gather = -0.5", "deposit_gather must be 0 to 10"),
        ("deposit_gather = 60", "deposit_gather must be 0 to 10"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace(".", r"\.")) as error:
        load_config(write(tmp_path, text))
    assert str(tmp_path) in str(error.value)


def test_an_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("*:1", ListenAddress(None, 1)), (":2", ListenAddress(None, 2)),
     ("[::1]:3", ListenAddress("::1", 3)), ("0.0.0.0:4", ListenAddress("0.0.0.0", 4))],
)
def test_listen_forms(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected
