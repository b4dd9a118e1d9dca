"""The daemon's configuration: TOML file, then command-line overrides, then defaults.

Every key has a default, so an empty or missing file is a valid configuration. An unknown
key, a key of the wrong type or a bad value stops start-up with a message that names the
key and the file (a typo must not silently fall back to a default).

Paths are never guessed from the user meshd runs as (a DynamicUser= service is not root, yet
is the system service). The units pass every path on the command line (--config,
--state-dir, --socket); without them meshd uses the directories systemd names in
CONFIGURATION_DIRECTORY / STATE_DIRECTORY / RUNTIME_DIRECTORY, and otherwise the XDG base
directories of $HOME, for a user running `meshd run` by hand.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .protocol.backupwindow import WINDOW_S
from .relay.address import RelayAddress, RelayAddressError

DEFAULT_PORT = 7743
DEFAULT_RELAY_PORT = 7744
DEFAULT_PAIRING_PORT = 7745  # TCP, open only while an invitation is (meshctl invite)
MAX_BACKUP_WINDOW_S = 3600.0
# Relay deposits wait this long after a wake, so a burst's commits go in one envelope
# (meshd/relay/deposits.py).
DEPOSIT_GATHER_S = 0.25
MAX_DEPOSIT_GATHER_S = 10.0
# Where the system units put things (systemd/meshd.service passes these explicitly; meshctl
# falls back to SYSTEM_SOCKET when the user has no daemon of their own).
SYSTEM_CONFIG = Path("/etc/meshd/meshd.toml")
SYSTEM_STATE_DIR = Path("/var/lib/meshd")
SYSTEM_SOCKET = Path("/run/meshd/meshd.sock")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and what is wrong."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str | None  # None: every address of the machine
    port: int

    def __str__(self) -> str:
        host = "*" if self.host is None else (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    enabled: bool = True
    # Interface names or addresses to use for mDNS; empty means every interface.
    interfaces: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    state_dir: Path
    socket_path: Path
    listen: ListenAddress = ListenAddress(None, DEFAULT_PORT)
    pairing_port: int = DEFAULT_PAIRING_PORT  # 0: any free port
    device_name: str = field(default_factory=socket.gethostname)
    relays: tuple[str, ...] = ()
    # Addresses of circle devices to dial besides those mDNS finds (another network, no mDNS).
    peers: tuple[ListenAddress, ...] = ()
    log_level: str = "info"
    socket_group: str | None = None  # the system service makes the socket 0660 for this group
    discovery: DiscoveryConfig = DiscoveryConfig()
    # Seconds the relay backup gathers written entries before uploading them (sooner once
    # 16 KiB have gathered; meshd/protocol/backupwindow.py).
    backup_window: float = WINDOW_S
    # Seconds relay deposits wait after a commit so a burst goes in one envelope (deposits.py).
    deposit_gather: float = DEPOSIT_GATHER_S
    source: Path | None = None  # the file it was read from, for messages


LOG_LEVELS = ("debug", "info", "warning", "error")


def _systemd_directory(variable: str) -> Path | None:
    """The first directory systemd passes for StateDirectory= and the like, if any."""
    value = os.environ.get(variable)
    return Path(value.split(":")[0]) if value else None


def default_config_path() -> Path:
    if directory := _systemd_directory("CONFIGURATION_DIRECTORY"):  # ConfigurationDirectory=
        return directory / "meshd.toml"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "meshd" / "meshd.toml"


def default_state_dir() -> Path:
    if directory := _systemd_directory("STATE_DIRECTORY"):  # StateDirectory=
        return directory
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "meshd"


def default_socket_path() -> Path:
    """The socket of this user's own daemon (meshctl also tries SYSTEM_SOCKET)."""
    if directory := _systemd_directory("RUNTIME_DIRECTORY"):  # RuntimeDirectory=
        return directory / "meshd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return Path(runtime) / "meshd" / "meshd.sock"


def parse_listen(text: str, key: str = "listen") -> ListenAddress:
    """'HOST:PORT', '[v6]:PORT', '*:PORT' or ':PORT' (every address)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT (e.g. '0.0.0.0:{DEFAULT_PORT}')")
    host = host.strip("[]")
    return ListenAddress(None if host in ("", "*") else host, int(port_text))


def load_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read path (or the default location, if it exists) and apply overrides.

    Raises ConfigError naming the key for anything unknown or invalid.
    """
    explicit = path is not None
    path = path or default_config_path()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    elif explicit:
        raise ConfigError(f"{path}: no such configuration file (create it: an empty file is a "
                          "valid configuration, and meshd.example.toml describes every key)")
    config = _from_table(data, where=str(path))
    config = replace(config, source=path if path.exists() else None)
    for key, value in (overrides or {}).items():
        if value is not None:
            config = _override(config, key, value)
    return config


_TOP_KEYS = {"state_dir", "socket", "listen", "device_name", "relays", "peers", "log_level",
             "socket_group", "discovery", "pairing_port", "backup_window", "deposit_gather"}
_DISCOVERY_KEYS = {"enabled", "interfaces"}


def _from_table(data: dict[str, Any], *, where: str) -> Config:
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    discovery_table = _expect(data, "discovery", dict, where, default={})
    for key in discovery_table:
        if key not in _DISCOVERY_KEYS:
            raise ConfigError(f"{where}: unknown key 'discovery.{key}' "
                              f"(known: {', '.join(sorted(_DISCOVERY_KEYS))})")
    interfaces = _expect(discovery_table, "interfaces", list, where, default=[], prefix="discovery.")
    if not all(isinstance(name, str) and name for name in interfaces):
        raise ConfigError(f"{where}: discovery.interfaces must be a list of interface names or addresses")
    relays = _expect(data, "relays", list, where, default=[])
    for relay in relays:
        _check_relay(relay, f"{where}: relays")
    peers = _expect(data, "peers", list, where, default=[])
    if not all(isinstance(peer, str) for peer in peers):
        raise ConfigError(f"{where}: peers must be a list of 'HOST:PORT' strings")
    log_level = _expect(data, "log_level", str, where, default="info")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"{where}: log_level must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
    device_name = _expect(data, "device_name", str, where, default=socket.gethostname())
    if not 0 < len(device_name.encode()) <= 64:
        raise ConfigError(f"{where}: device_name must be 1 to 64 bytes of UTF-8")
    listen_text = _expect(data, "listen", str, where, default=f"*:{DEFAULT_PORT}")
    pairing_port = _expect(data, "pairing_port", int, where, default=DEFAULT_PAIRING_PORT)
    if not 0 <= pairing_port <= 65535:
        raise ConfigError(f"{where}: pairing_port must be 0 to 65535 (0: any free port)")
    backup_window = _expect(data, "backup_window", (int, float), where, default=WINDOW_S)
    if not 0 <= backup_window <= MAX_BACKUP_WINDOW_S:
        raise ConfigError(f"{where}: backup_window must be 0 to {MAX_BACKUP_WINDOW_S:.0f} seconds")
    deposit_gather = _expect(data, "deposit_gather", (int, float), where, default=DEPOSIT_GATHER_S)
    if not 0 <= deposit_gather <= MAX_DEPOSIT_GATHER_S:
        raise ConfigError(f"{where}: deposit_gather must be 0 to {MAX_DEPOSIT_GATHER_S:.0f} seconds")
    return Config(
        state_dir=Path(_expect(data, "state_dir", str, where, default=str(default_state_dir()))),
        socket_path=Path(_expect(data, "socket", str, where, default=str(default_socket_path()))),
        listen=parse_listen(listen_text, f"{where}: listen"),
        pairing_port=pairing_port,
        device_name=device_name,
        relays=tuple(relays),
        peers=tuple(parse_listen(peer, f"{where}: peers") for peer in peers),
        log_level=log_level,
        socket_group=_expect(data, "socket_group", str, where, default=None),
        discovery=DiscoveryConfig(
            enabled=_expect(discovery_table, "enabled", bool, where, default=True, prefix="discovery."),
            interfaces=tuple(interfaces),
        ),
        backup_window=float(backup_window),
        deposit_gather=float(deposit_gather),
    )


def _expect(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, *,
            default: Any, prefix: str = "") -> Any:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else "number"
        raise ConfigError(f"{where}: {prefix}{key} must be a {name}, "
                          f"not {type(value).__name__} {value!r}")
    return value


def _override(config: Config, key: str, value: Any) -> Config:
    if key == "state_dir":
        return replace(config, state_dir=Path(value))
    if key == "socket":
        return replace(config, socket_path=Path(value))
    if key == "listen":
        return replace(config, listen=parse_listen(value, "--listen"))
    if key == "interfaces":
        return replace(config, discovery=replace(config.discovery, interfaces=tuple(value)))
    if key == "discovery":
        return replace(config, discovery=replace(config.discovery, enabled=bool(value)))
    if key == "relays":
        for relay in value:
            _check_relay(relay, "--relay")
        return replace(config, relays=tuple(value))
    if key == "peers":
        return replace(config, peers=tuple(parse_listen(p, "--peer") for p in value))
    if key in ("device_name", "log_level"):
        return replace(config, **{key: value})
    raise ConfigError(f"unknown override {key!r}")


def _check_relay(relay: object, where: str) -> None:
    if not isinstance(relay, str):
        raise ConfigError(f"{where}: {relay!r} is not 'HOST:PORT#KEY' (the address `meshd relay` prints)")
    try:
        RelayAddress.parse(relay)
    except RelayAddressError as err:
        raise ConfigError(f"{where}: {relay!r}: {err} (use the address `meshd relay` prints)") from None
