"""A machine booted with systemd for deployment tests: systemd-nspawn over this host's tree.

    systemd-nspawn -D / --volatile=yes -b ...

boots the host's own /usr (Debian's systemd, python3) as PID 1 of a container whose root is a
tmpfs, with copy-on-write overlays of /etc and /usr (so installing and `ln -s ... /usr/bin`
work, and nothing reaches the host), the checkout as /src (copy-on-write too) and a
directory of wheels as /wheelhouse. Its network is a namespace of tests/netns's LAN, so it
talks to the other test machines and to nothing else. The host has no systemd or D-Bus of
its own, hence --register=no (no machined) and --keep-unit (no scope through the bus);
commands run inside through nsenter into the container's PID 1.

Why volatile=yes and not overlay: nspawn refuses --volatile=overlay on the host's root
("Spawning container on root directory is not supported").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

BOOT_TIMEOUT_S = 90.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable_reason() -> str | None:
    """Why no machine can be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, network namespaces)"
    for tool in ("systemd-nspawn", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return (f"{tool} is not installed (Debian: apt-get install systemd-container"
                    " util-linux iproute2)")
    if not Path("/usr/lib/systemd/systemd").exists():
        return "this host's /usr has no systemd to boot (/usr/lib/systemd/systemd)"
    # The machines run the host's /usr: what the README's commands need must be there.
    if not Path("/usr/bin/sudo").exists():
        return "sudo is not installed on this host, and the README's commands use it (apt-get install sudo)"
    venv = subprocess.run(["/usr/bin/python3", "-c", "import ensurepip, venv"], capture_output=True)
    if venv.returncode != 0:
        return "/usr/bin/python3 cannot make a venv, as the README does (apt-get install python3-venv)"
    return None


class MachineError(AssertionError):
    pass


class Machine:
    def __init__(self, name: str, hostname: str, netns: str, checkout: Path, wheelhouse: Path,
                 log_path: Path) -> None:
        self.name, self.hostname, self.netns = name, hostname, netns
        self.checkout, self.wheelhouse, self.log_path = checkout, wheelhouse, log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    def boot(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["systemd-nspawn", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit",
                 f"--machine={self.name}", f"--hostname={self.hostname}", "--console=passive",
                 f"--network-namespace-path=/run/netns/{self.netns}",
                 "--overlay=/etc::/etc", "--overlay=/usr::/usr",
                 f"--overlay={self.checkout}::/src", f"--bind-ro={self.wheelhouse}:/wheelhouse",
                 "-b"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.leader is None:
            self.leader = self._find_init()
            if self.leader is None:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise MachineError(f"{self.name} did not start:\n{self.log()}")
                time.sleep(0.1)  # bounded: waiting for a process to appear, nothing to wait on
        # Blocks until boot finished: "running", or "degraded" (some host unit that makes no
        # sense in a container failed, e.g. a database server of the host). Until systemd has
        # its private socket, systemctl cannot connect: try again, within the bound.
        while True:
            result = self.run("systemctl is-system-running --wait", timeout=BOOT_TIMEOUT_S)
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return
            # "offline": systemd is not yet PID 1 of the container as far as systemctl can tell.
            if state not in ("", "offline") or time.monotonic() > deadline:
                raise MachineError(f"{self.name} booted into state {state!r} ({result.stderr}):\n"
                                   f"{self.log()}")
            time.sleep(0.2)  # bounded, see above

    def _find_init(self) -> int | None:
        """The container's PID 1 (systemd), a descendant of the nspawn process."""
        assert self.process is not None
        parents: dict[int, int] = {}
        names: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            parents[int(entry.name)], names[int(entry.name)] = ppid, name
        for pid, name in sorted(names.items()):
            if name != "systemd":
                continue
            ancestor = parents.get(pid)
            while ancestor and ancestor != self.process.pid:
                ancestor = parents.get(ancestor)
            if ancestor == self.process.pid:
                return pid
        return None

    def run(self, script: str, *, user: str | None = None, check: bool = False,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a bash script inside, as root or as user (a login shell, as a person would)."""
        assert self.leader is not None
        shell = ["bash", "-s"] if user is None else ["runuser", "-l", user, "-c", "bash -s"]
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}",
                                 "HOME=/root", "LANG=C.UTF-8", *shell],
                                input=script, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise MachineError(f"{self.name}: exit {result.returncode} from\n{script}\n"
                               f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}")
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def shut_down(self) -> None:
        """SIGTERM makes nspawn power the container off; SIGKILL after a bound."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            if self.leader is not None:
                try:
                    os.kill(self.leader, signal.SIGKILL)  # ends the container's PID namespace
                except ProcessLookupError:
                    pass
            self.process.kill()
            self.process.wait(timeout=30)
