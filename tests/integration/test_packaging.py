"""What a package ships besides the code: license, man pages and completions generated from
the parsers, sysusers.d/tmpfiles.d entries that work with the real tools, an example config
that meshd accepts, and units that point at the man pages."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from meshd import config as config_module
from meshd.cmd.meshctl import build_parser as meshctl_parser
from meshd.config import load_config

REPO = Path(__file__).resolve().parent.parent.parent


def test_the_license_is_the_one_pyproject_names() -> None:
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, str(REPO / "packaging/build-docs"), str(out)], check=True,
                   capture_output=True, timeout=120)
    return out


def meshctl_commands() -> list[str]:
    parser = meshctl_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)  # type: ignore[arg-type]


@pytest.mark.slow
def test_man_pages_come_from_the_parsers(docs: Path) -> None:
    meshctl_page = (docs / "man/man1/meshctl.1").read_text()
    for command in meshctl_commands():
        assert f"meshctl {command}".replace("-", r"\-") in meshctl_page, command
    meshd_page = (docs / "man/man8/meshd.8").read_text()
    for option in ("--config", "--state-dir", "--socket", "--public-address", "--listen"):
        assert option.replace("-", r"\-") in meshd_page, option
    assert "EX_CONFIG" in meshd_page and "7745" in meshd_page and "MESHD_SOCKET" in meshctl_page
    for page in (docs / "man/man1/meshctl.1", docs / "man/man8/meshd.8"):
        if shutil.which("groff"):
            rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                                      capture_output=True, text=True, timeout=60)
            assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr


@pytest.mark.slow
def test_completions_come_from_the_parsers(docs: Path) -> None:
    bash = (docs / "completions/bash/meshctl").read_text()
    for command in meshctl_commands():
        assert re.search(rf"\b{re.escape(command)}\b", bash), command
    assert "--public-address" in (docs / "completions/bash/meshd").read_text()
    for prog in ("meshd", "meshctl"):
        checked = subprocess.run(["bash", "-n", str(docs / "completions/bash" / prog)],
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stderr
        assert (docs / "completions/zsh" / f"_{prog}").read_text().startswith("#compdef")
        assert "complete -c" in (docs / "completions/fish" / f"{prog}.fish").read_text()


def test_the_example_config_is_accepted_with_every_example_enabled(tmp_path: Path) -> None:
    text = (REPO / "meshd.example.toml").read_text()
    assert load_config(REPO / "meshd.example.toml").source == REPO / "meshd.example.toml"
    enabled = re.sub(r"^#(\w+ = )", r"\1", text, flags=re.M)
    path = tmp_path / "meshd.toml"
    path.write_text(enabled)
    loaded = load_config(path)
    assert loaded.pairing_port == 7745 and loaded.discovery.interfaces == ("eth0",)
    for key in config_module._TOP_KEYS | config_module._DISCOVERY_KEYS:
        assert re.search(rf"^(#?{key} = |\[{key}\]$)", text, re.M), f"{key} is not in the example"


def test_sysusers_and_tmpfiles_entries_work_with_the_real_tools(tmp_path: Path) -> None:
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers / systemd-tmpfiles are not installed")
    (tmp_path / "etc").mkdir()
    subprocess.run([sysusers, f"--root={tmp_path}", str(REPO / "systemd/sysusers.d/meshd.conf")],
                   check=True, capture_output=True, timeout=60)
    assert re.search(r"^meshd:x:\d+:", (tmp_path / "etc/group").read_text(), re.M)
    result = subprocess.run([tmpfiles, f"--root={tmp_path}", "--create",
                             str(REPO / "systemd/tmpfiles.d/meshd.conf")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    created = tmp_path / "etc/meshd/meshd.toml"
    assert created.read_text() == "" and oct(created.stat().st_mode & 0o777) == "0o644"
    created.write_text('device_name = "kept"\n')  # never overwritten
    subprocess.run([tmpfiles, f"--root={tmp_path}", "--create",
                    str(REPO / "systemd/tmpfiles.d/meshd.conf")], check=True, capture_output=True)
    assert load_config(created).device_name == "kept"


def test_units_document_themselves_with_installed_man_pages() -> None:
    for unit in [*(REPO / "systemd").glob("*.s*"), *(REPO / "systemd/user").iterdir()]:
        lines = [line for line in unit.read_text().splitlines() if line.startswith("Documentation=")]
        assert lines == ["Documentation=man:meshd(8) man:meshctl(1)"], unit
