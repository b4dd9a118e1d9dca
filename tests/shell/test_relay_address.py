"""A relay never prints, and a device never accepts, an address nobody can dial (0.0.0.0, ::)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshd.config import ConfigError, load_config
from meshd.relay.address import RelayAddress, RelayAddressError

KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
REPO = Path(__file__).resolve().parent.parent.parent


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "[0:0::0]", "*"])
def test_an_unspecified_relay_address_is_refused(host: str, tmp_path: Path) -> None:
    with pytest.raises(RelayAddressError, match="public-address"):
        RelayAddress.parse(f"{host}:7744#{KEY}")
    config = tmp_path / "meshd.toml"
    config.write_text(f'relays = ["{host}:7744#{KEY}"]\n')
    with pytest.raises(ConfigError, match="no device can dial"):
        load_config(config)


@pytest.mark.parametrize("host", ["relay.example", "192.0.2.7", "[2001:db8::1]", "[fe80::1%eth0]"])
def test_dialable_relay_addresses_parse(host: str) -> None:
    assert RelayAddress.parse(f"{host}:7744#{KEY}").port == 7744


def run_relay(tmp_path: Path, *args: str) -> tuple[str, str]:
    """Start `meshd relay`, read the address line it prints, stop it."""
    log = tmp_path / "relay.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "meshd", "relay", "--state-dir", str(tmp_path / "state"), *args],
            stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
        finally:
            process.kill()
            process.wait(timeout=20)
            assert process.stdout is not None
            process.stdout.close()
    return line, log.read_text()


@pytest.mark.slow
def test_a_relay_listening_everywhere_prints_a_dialable_address(tmp_path: Path) -> None:
    # Binds 0.0.0.0 on a free port for a moment; no traffic is sent anywhere.
    line, log = run_relay(tmp_path, "--listen", "0.0.0.0:0")
    address = RelayAddress.parse(line)  # refuses 0.0.0.0
    assert address.host not in ("0.0.0.0", "::") and address.port > 0
    assert "--public-address" in log


@pytest.mark.slow
def test_the_relay_prints_its_public_address(tmp_path: Path) -> None:
    line, _ = run_relay(tmp_path, "--listen", "127.0.0.1:0", "--public-address", "relay.example:443")
    assert line.startswith("relay.example:443#") and RelayAddress.parse(line).port == 443
    line, _ = run_relay(tmp_path, "--listen", "127.0.0.1:0", "--public-address", "[2001:db8::7]")
    address = RelayAddress.parse(line)
    assert address.host == "2001:db8::7" and address.port != 443  # the port it listens on


@pytest.mark.parametrize("bad", ["0.0.0.0", "[::]:7744", "relay.example:http", "relay.example:0"])
def test_a_bad_public_address_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshd", "relay", "--state-dir", str(tmp_path / "state"),
         "--listen", "127.0.0.1:0", "--public-address", bad],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "argument --public-address:" in result.stderr  # refused by the option, not unknown
