"""The unit files in systemd/: `systemd-analyze verify` is clean and every service's offline
security exposure is at most 1.5.

verify insists that ExecStart's binary exists. System units are checked unchanged inside a
throwaway root (--root) holding a copy of the host's unit directories and an executable shim
at /usr/bin/meshd; the user manager has no --root, so user units are checked from a copy
whose /usr/bin/meshd is pointed at that shim (and nothing else changed). verify also runs
`man` for each Documentation= page: MANPATH points at the pages packaging/build-docs generates.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
UNITS = REPO / "systemd"
SYSTEM_UNITS = ["meshd.service", "meshd.socket", "meshd-relay.service"]
USER_UNITS = ["meshd.service", "meshd.socket"]
MAX_EXPOSURE = 1.5

ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    for kind in ("system", "user"):
        host = Path("/usr/lib/systemd") / kind
        if host.is_dir():
            shutil.copytree(host, root / "usr/lib/systemd" / kind, symlinks=True)
    shim = root / "usr/bin/meshd"
    shim.parent.mkdir(parents=True)
    shim.write_text("#!/bin/sh\nexit 0\n")
    shim.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in SYSTEM_UNITS:
        shutil.copy(UNITS / name, root / "etc/systemd/system" / name)
    return root


@pytest.fixture(scope="module")
def man_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    docs = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, str(REPO / "packaging/build-docs"), str(docs)], check=True,
                   capture_output=True, timeout=120)
    return {"MANPATH": str(docs / "man")}


@pytest.fixture(scope="module")
def user_env(tmp_path_factory: pytest.TempPathFactory, man_env: dict[str, str]) -> dict[str, str]:
    runtime = tmp_path_factory.mktemp("runtime")
    runtime.chmod(0o700)
    return {"XDG_RUNTIME_DIR": str(runtime), **man_env}


@pytest.fixture(scope="module")
def user_units(tmp_path_factory: pytest.TempPathFactory, fake_root: Path) -> Path:
    directory = tmp_path_factory.mktemp("user-units")
    for name in USER_UNITS:
        text = (UNITS / "user" / name).read_text()
        (directory / name).write_text(text.replace("/usr/bin/meshd", str(fake_root / "usr/bin/meshd")))
    return directory


def test_every_unit_is_in_the_repository() -> None:
    assert sorted(p.name for p in UNITS.glob("*.s*")) == sorted(SYSTEM_UNITS)
    assert sorted(p.name for p in (UNITS / "user").iterdir()) == sorted(USER_UNITS)
    for path in [*UNITS.glob("*.service"), *(UNITS / "user").glob("*.service")]:
        assert "ExecStart=/usr/bin/meshd " in path.read_text(), path


def test_the_user_unit_keeps_protect_kernel_logs() -> None:
    """The deploy test lifts it inside nspawn with a container-only drop-in
    (tests/deploy/nspawn-kmsg.conf), never by changing the shipped unit."""
    assert "\nProtectKernelLogs=yes\n" in (UNITS / "user" / "meshd.service").read_text()


def test_system_units_verify_cleanly(fake_root: Path, man_env: dict[str, str]) -> None:
    result = analyze("verify", f"--root={fake_root}", *[f"/etc/systemd/system/{n}" for n in SYSTEM_UNITS],
                     env=man_env)
    # verify exits 0 on an unknown directive, with a warning: any output is a failure.
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_verify_would_catch_a_typo(fake_root: Path, man_env: dict[str, str]) -> None:
    """The harness itself works: a misspelt directive and a missing man page are reported."""
    broken = fake_root / "etc/systemd/system/broken.service"
    broken.write_text((UNITS / "meshd.service").read_text().replace("ProtectSystem=", "ProtectSystm=")
                      .replace("man:meshctl(1)", "man:meshctl(7)"))
    result = analyze("verify", f"--root={fake_root}", "/etc/systemd/system/broken.service", env=man_env)
    assert "Unknown key 'ProtectSystm'" in result.stderr
    assert "man meshctl(7)" in result.stderr


def test_user_units_verify_cleanly(user_units: Path, user_env: dict[str, str]) -> None:
    result = analyze("--user", "verify", *[str(user_units / n) for n in USER_UNITS], env=user_env)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def exposure(output: str, unit: str) -> float:
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", output)
    assert match, output[-2000:]
    return float(match.group(1))


@pytest.mark.parametrize(("mode", "relative"), [
    ("system", "meshd.service"), ("system", "meshd-relay.service"), ("user", "user/meshd.service")])
def test_service_exposure_is_at_most_1_5(mode: str, relative: str, user_env: dict[str, str]) -> None:
    args = ["--user"] if mode == "user" else []
    result = analyze(*args, "security", "--offline=yes", str(UNITS / relative),
                     env=user_env if mode == "user" else None)
    score = exposure(result.stdout + result.stderr, Path(relative).name)
    print(f"{mode} {relative}: overall exposure {score}")
    assert score <= MAX_EXPOSURE, result.stdout
