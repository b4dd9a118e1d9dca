"""The README's quickstart, run verbatim against a real systemd on two booted machines.

Two systemd-nspawn machines (tests/deploy/machine.py) on a LAN of network namespaces. On
each, a person "alice" with sudo runs the README's system-install block as it is written
(the only substitution: /path/to/this/checkout is /src, where the checkout is mounted), then,
in a new login as a member of group meshd (not root), runs `meshctl status`; she invites on
one machine and joins on the other, sends a message and reads it there. Finally each
machine's `journalctl -u meshd` must hold no traceback.

pip has no network inside the machines: /etc/pip.conf points it at a wheelhouse of meshd's
dependencies that this test downloads on the host first (pip download), standing in for the
package index the README's pip command would use.

Run it with `make test-deploy` (it boots two machines: about a minute on 2 cores).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..netns.netns import Network
from .machine import Machine, MachineError, unavailable_reason

REPO = Path(__file__).resolve().parent.parent.parent
WHEELHOUSE = REPO / "build" / "wheelhouse"

pytestmark = [pytest.mark.deploy, pytest.mark.slow]


def quickstart_block(containing: str, checkout: str = "/src") -> str:
    """The first ```sh block of the README's quickstart that contains the given text."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Quickstart on two real machines"):]
    section = section[:section.index("\n## ", 1)]
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        if containing in block:
            return str(block).replace("/path/to/this/checkout", checkout)
    raise AssertionError(f"no ```sh block with {containing!r} in the README's quickstart")


def ensure_wheelhouse() -> str | None:
    """Download meshd's dependencies for the offline install; the reason if impossible."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = [*project["build-system"]["requires"], *project["project"]["dependencies"],
              "pip", "wheel"]  # pipx puts these in its shared venv
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                             "--dest", str(WHEELHOUSE), *wanted],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return f"cannot download meshd's dependencies for the machines: {result.stderr[-500:]}"
    return None


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Machine, Machine]]:
    if os.environ.get("MESHD_DEPLOY") != "1":
        pytest.skip("boots two systemd machines (about a minute): run `make test-deploy`")
    if reason := unavailable_reason():
        pytest.skip(reason)
    if reason := ensure_wheelhouse():
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("machines")
    with Network(devices=2, prefix="mdeploy") as network:
        pair = (Machine(f"mdeploy-{network.run_id}-1", "laptop", network.ns(1), REPO, WHEELHOUSE,
                        logs / "laptop.log"),
                Machine(f"mdeploy-{network.run_id}-2", "desktop", network.ns(2), REPO, WHEELHOUSE,
                        logs / "desktop.log"))
        try:
            for machine in pair:
                machine.boot()
                # A person with sudo, and pip's index stand-in (see the module docstring).
                # The host's /etc/hostname came along with /etc: name the machine.
                machine.run(f"echo {machine.hostname} > /etc/hostname\n"
                            f"hostname {machine.hostname}\n"
                            f"echo '127.0.1.1 {machine.hostname}' >> /etc/hosts\n"
                            "useradd -m -s /bin/bash alice\n"
                            "echo 'alice ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/alice\n"
                            "printf '[global]\\nno-index = true\\nfind-links = /wheelhouse\\n'"
                            " > /etc/pip.conf\n", check=True)
            yield pair
        finally:
            for machine in pair:
                machine.shut_down()


def test_the_readme_quickstart_works_for_a_member_of_group_meshd(
        machines: tuple[Machine, Machine]) -> None:
    laptop, desktop = machines
    block = quickstart_block("sudo systemctl daemon-reload")
    for machine in machines:
        machine.run("cd /src\nset -ex\n" + block, user="alice", check=True, timeout=300)

    # A new login (the README: "log in again"), not root: meshctl finds the system socket.
    for machine in machines:
        status = machine.run("id -nG; meshctl status", user="alice", check=True).stdout
        assert "meshd" in status.split("\n")[0].split() and "member: yes" in status, status
        assert f"name: {machine.hostname}" in status, status  # the name comes from the host name

    invite = laptop.run("meshctl invite", user="alice", check=True).stdout
    code = re.search(r"Invitation code: (\S+)", invite)
    assert code, invite
    joined = desktop.run(f"meshctl join {code.group(1)}", user="alice", check=True).stdout
    assert "Joined the circle" in joined, joined

    laptop.run('meshctl send chat "hello from the laptop"', user="alice", check=True)
    # Bounded: the message crosses the LAN within a few seconds or the test fails.
    read = desktop.run("for i in $(seq 150); do meshctl log chat | grep 'hello from the laptop'"
                       " && exit 0; sleep 0.2; done; meshctl log chat; exit 1",
                       user="alice").stdout
    assert "laptop  " in read and "hello from the laptop" in read, read

    for machine in machines:
        journal = machine.run("journalctl -u meshd --no-pager", check=True).stdout
        assert "Traceback" not in journal, journal[-4000:]
        assert machine.run("systemctl is-active meshd").stdout.strip() == "active"


def test_the_readme_per_user_quickstart_works_with_pipx(machines: tuple[Machine, Machine]) -> None:
    """The per-user install (pipx, the user units) on a machine without the system service."""
    _, desktop = machines
    if desktop.run("command -v pipx").returncode != 0:
        pytest.skip("pipx is not installed on this host, and the README's per-user steps use it"
                    " (apt-get install pipx)")
    # bob has his own checkout (pip writes build metadata into the one it installs from).
    desktop.run("systemctl disable --now meshd.socket meshd.service\n"
                "useradd -m -s /bin/bash bob\nloginctl enable-linger bob\n"
                "systemctl start user@$(id -u bob).service\n"
                "cp -r /src /home/bob/meshd\n"
                "rm -rf /home/bob/meshd/meshd.egg-info /home/bob/meshd/build /home/bob/meshd/.git\n"
                "chown -R bob: /home/bob/meshd", check=True)
    # What a login session provides (pam_systemd): the user manager's runtime directory.
    session = "export XDG_RUNTIME_DIR=/run/user/$(id -u)\n"
    # One concession to the container, made by the machine's admin before the README's steps:
    # a user manager inside nspawn cannot apply ProtectKernelLogs= (see nspawn-kmsg.conf), so
    # a drop-in in the machine's /etc lifts it for user units when, and only when, this is a
    # container. The README's steps and the shipped unit stay as they are.
    desktop.run("systemd-detect-virt --quiet --container\n"
                "install -Dm644 /src/tests/deploy/nspawn-kmsg.conf"
                " /etc/systemd/user/meshd.service.d/nspawn-kmsg.conf", check=True)
    block = quickstart_block("pipx install", checkout="/home/bob/meshd")
    try:
        desktop.run(session + "cd ~/meshd\nset -ex\n" + block, user="bob", check=True, timeout=300)
    except MachineError as err:
        journal = desktop.run("journalctl --no-pager -n 40 | grep -v -e sudo -e pam_unix").stdout
        raise MachineError(f"{err}\n--- the user manager's journal for meshd ---\n{journal}") from None
    status = desktop.run(session + "meshctl status", user="bob", check=True).stdout
    assert "member: yes" in status and "name: desktop" in status, status
    assert desktop.run(session + "systemctl --user is-active meshd", user="bob").stdout.strip() == "active"
    # The unit bob runs is the shipped one, with the container's drop-in alone lifting the setting.
    unit = desktop.run("cat ~/.config/systemd/user/meshd.service", user="bob", check=True).stdout
    assert "\nProtectKernelLogs=yes\n" in unit
    dropins = desktop.run(session + "systemctl --user show -p DropInPaths --value meshd",
                          user="bob", check=True).stdout.split()
    assert dropins == ["/etc/systemd/user/meshd.service.d/nspawn-kmsg.conf"], dropins
    journal = desktop.run("journalctl --no-pager _SYSTEMD_USER_UNIT=meshd.service", check=True).stdout
    assert "meshd running" in journal and "Traceback" not in journal, journal[-4000:]
