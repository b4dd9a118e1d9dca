"""The README's install steps leave bytecode at the optimisation level the units run meshd
with (PYTHONOPTIMIZE=2). The units cannot write under the install tree, and pip compiles only
the default level: without this step every start compiled every module again, 0.4-0.7 s
of the start-to-first-peer time (bench/daemon.py)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def unit_optimize_level(unit: str) -> int:
    text = (REPO / "systemd" / unit).read_text()
    found = re.search(r"^Environment=PYTHONOPTIMIZE=(\d)$", text, re.M)
    assert found, f"{unit} sets no PYTHONOPTIMIZE"
    return int(found.group(1))


def quickstart_block(containing: str) -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Quickstart on two real machines"):]
    section = section[:section.index("\n## ", 1)]
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        if containing in block:
            return str(block)
    raise AssertionError(f"no ```sh block with {containing!r} in the README's quickstart")


def compileall_line(block: str) -> list[str]:
    for line in block.splitlines():
        if "-m compileall" in line:
            return shlex.split(line.split("#", 1)[0])
    raise AssertionError(f"no compileall step in:\n{block}")


@pytest.mark.parametrize(("unit", "install"), [
    ("meshd.service", "/opt/meshd/bin/pip install"),
    ("user/meshd.service", "pipx install"),
])
def test_the_install_compiles_bytecode_at_the_units_level(unit: str, install: str) -> None:
    level = unit_optimize_level(unit)
    argv = compileall_line(quickstart_block(install))
    assert "-" + "O" * level in argv, f"{argv} compiles at another level than {unit}'s {level}"


def test_the_system_install_step_writes_the_bytecode_the_unit_reads(tmp_path: Path) -> None:
    """The README's line itself, on a stand-in for /opt/meshd: the .opt-2.pyc it leaves is
    the file `python -OO` looks for."""
    argv = compileall_line(quickstart_block("/opt/meshd/bin/pip install"))
    assert argv[:2] == ["sudo", "/opt/meshd/bin/python"], argv
    module = tmp_path / "lib" / "site-packages" / "meshd_standin.py"
    module.parent.mkdir(parents=True)
    module.write_text("VALUE = 1\n")
    command = [sys.executable, *(arg.replace("/opt/meshd", str(tmp_path)) for arg in argv[2:])]
    subprocess.run(command, check=True)
    level = unit_optimize_level("meshd.service")
    assert Path(importlib.util.cache_from_source(str(module), optimization=level or "")).is_file()
