"""Benchmark of the daemon on the LAN, each figure beside a baseline measured in the same run.

Every daemon is a real `meshd run` process on loopback (listen 127.0.0.1:0, mDNS bound to
127.0.0.1), started and driven exactly as tests/integration/daemons.py does: READY=1 on a
NOTIFY_SOCKET we create, the local API over the unix socket.

1. Time from process spawn to the first peer connected, for a device already paired: two
   daemons are paired, one is stopped (SIGTERM) and started again, and we measure spawn ->
   its /v1/status shows peers_connected >= 1. Ten restarts of each key order (the device
   with the lower X25519 key restarted, then the higher), median and max per order, run as
   the systemd units run meshd: PYTHONOPTIMIZE=2 with its bytecode already compiled (the
   README's install step compiles it; the first start here writes it to a private
   PYTHONPYCACHEPREFIX).                                                target <= 1 s
   Also, for context, the same without bytecode (every module compiled at each start: a
   checkout run with PYTHONDONTWRITEBYTECODE=1, or the units before the install step
   compiled at their optimisation level).
   Baseline: spawn -> READY=1 of the same restarts (the Python start-up floor), and
   Syncthing's global/local announce interval (30-60 s) as a quoted reference.
2. Idle RSS of a daemon with two connected peers (three daemons paired in one circle),
   VmRSS from /proc/PID/status after 10 s idle, twice: just after pairing, and after all
   three were restarted (the steady state of a paired device).        target <= 45 MB
   Baseline: VmRSS of `python -c "import trio, zeroconf, nacl, cryptography, msgpack, h11,
   sqlite3"` left idle (the imported stack alone); for context also the same with the
   extensions meshd actually loads (cryptography's Rust/OpenSSL module for the AEAD and
   libsodium), which `import cryptography, nacl` alone does not.
3. Idle CPU of a restarted daemon with two peers over 60 s (10 s with --quick): utime+stime from
   /proc/PID/stat before and after, divided by the wall time.          target <= 0.5 %
   Baseline: the same measurement of a process that imports the same stack and runs a bare
   zeroconf (bound to 127.0.0.1, one service registered, one browser) on another service
   type: the mDNS library's own idle floor.

Run: .venv/bin/python bench/daemon.py [--quick] [--connect-only] [--restarts N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.identity import load_or_create_identity  # noqa: E402
from tests.integration import daemons as harness  # noqa: E402
from tests.integration.daemons import DaemonProcess, form_circle, pair, start_all  # noqa: E402

RESTARTS = 10
IDLE_SETTLE_S = 10.0
CPU_WINDOW_S = 60.0
QUICK_CPU_WINDOW_S = 10.0
CONNECT_TIMEOUT_S = 30.0

TARGET_CONNECT_S = 1.0
TARGET_RSS_MB = 45.0
TARGET_CPU_PERCENT = 0.5

STACK_IMPORTS = "import trio, zeroconf, nacl, cryptography, msgpack, h11, sqlite3"

# The baseline for idle CPU: the imported stack plus a bare zeroconf doing what discovery
# needs (advertise one service, browse one type) on loopback, on a type the daemons ignore.
ZEROCONF_IDLE = STACK_IMPORTS + """
import socket, sys, time
from zeroconf import ServiceBrowser, ServiceInfo, Zeroconf
zc = Zeroconf(interfaces=["127.0.0.1"])
kind = "_meshdbench._tcp.local."
zc.register_service(ServiceInfo(kind, "baseline." + kind, port=9,
                                addresses=[socket.inet_aton("127.0.0.1")], properties={"t": "x"}))
browser = ServiceBrowser(zc, kind, handlers=[lambda **kw: None])
print("ready", flush=True)
time.sleep(3600)
"""

IMPORT_IDLE = STACK_IMPORTS + """
import time
print("ready", flush=True)
time.sleep(3600)
"""

# For context: `import cryptography` does not load its Rust/OpenSSL extension, which the
# first use of ChaCha20-Poly1305 does (and nacl does not load libsodium until nacl.bindings).
USED_STACK_IDLE = STACK_IMPORTS + """
import time
import cryptography.hazmat.primitives.ciphers.aead, nacl.bindings
print("ready", flush=True)
time.sleep(3600)
"""


# ---- /proc -----------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def pid_of(daemon: DaemonProcess) -> int:
    assert daemon.process is not None
    return daemon.process.pid


# ---- helpers ----------------------------------------------------------------------------


async def wait_connected(daemon: DaemonProcess, count: int, limit_s: float = CONNECT_TIMEOUT_S) -> None:
    await harness.wait_connected(daemon, count, limit_s)


async def wait_at_most(daemon: DaemonProcess, count: int, limit_s: float = CONNECT_TIMEOUT_S) -> None:
    async def check() -> bool:
        return await harness.connected_count(daemon) <= count

    await daemon.until(check, limit_s, f"at most {count} connected peers")


def spawn_python(code: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise RuntimeError("baseline process did not start")
    return process


def stop_python(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


def mark(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED"


# ---- 1. spawn -> first peer connected ---------------------------------------------------


@contextlib.contextmanager
def bytecode(root: Path, *, present: bool):  # type: ignore[no-untyped-def]
    """Daemons started inside run with bytecode cached in a private directory (written by
    the first start, read by the next: as after the README's install step), or with none
    (every module compiled from source at each start)."""
    saved = {key: os.environ.get(key) for key in
             ("PYTHONOPTIMIZE", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    os.environ["PYTHONOPTIMIZE"] = "2"  # as the systemd units run meshd
    if present:
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    else:
        # The interpreter's own .opt-2.pyc are used (as a distribution ships them); meshd's
        # and the venv's are not there at that level, and none are written.
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
        os.environ.pop("PYTHONPYCACHEPREFIX", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def dh_key(daemon: DaemonProcess) -> bytes:
    return bytes(load_or_create_identity(daemon.state_dir).noise.public)


async def bench_reconnect(root: Path, restarts: int) -> dict[str, dict[str, list[float]]]:
    """Per key order ("lower key restarted", "higher key restarted"): spawn -> first peer
    connected, and spawn -> READY=1, of `restarts` restarts each, alternating the orders."""
    first, second = DaemonProcess(root, "first"), DaemonProcess(root, "second")
    figures: dict[str, dict[str, list[float]]] = {
        order: {"connect": [], "ready": []} for order in ("lower key restarted", "higher key restarted")}
    try:
        await start_all([first, second])
        await pair(first, second)
        await wait_connected(first, 1)
        await wait_connected(second, 1)
        lower = first if dh_key(first) < dh_key(second) else second
        for attempt in range(2 * restarts):
            # Alternate which one restarts: the key order once decided who dialled (the higher
            # key waited 1 s), so both orders belong in the figure.
            staying, restarted = (first, second) if attempt % 2 == 0 else (second, first)
            order = "lower key restarted" if restarted is lower else "higher key restarted"
            assert await restarted.stop() == 0, "the daemon must stop cleanly"
            await wait_at_most(staying, 0)
            spawned = time.monotonic()
            await restarted.start()  # returns on READY=1
            figures[order]["ready"].append(time.monotonic() - spawned)
            await wait_connected(restarted, 1)
            figures[order]["connect"].append(time.monotonic() - spawned)
            await wait_connected(staying, 1)
    finally:
        first.kill()
        second.kill()
    return figures


def print_reconnect(label: str, figures: dict[str, dict[str, list[float]]], *, judged: bool) -> None:
    print(f"   {label}")
    for order, series in figures.items():
        connect, ready = series["connect"], series["ready"]
        verdict = (f"   target <= {TARGET_CONNECT_S:.0f} s: {mark(max(connect), TARGET_CONNECT_S)}"
                   if judged else "")
        print(f"     {order}: median {statistics.median(connect):.2f} s, max {max(connect):.2f} s"
              f"   [{', '.join(f'{t:.2f}' for t in connect)}]{verdict}")
        print(f"       baseline spawn -> READY=1: median {statistics.median(ready):.2f} s,"
              f" max {max(ready):.2f} s (Python start-up floor)")


# ---- 2 and 3. idle RSS and CPU of a circle of three ------------------------------------


async def bench_idle(root: Path, cpu_window: float) -> dict[str, object]:
    daemons = [DaemonProcess(root, name) for name in ("alpha", "beta", "gamma")]
    import_only = zeroconf_idle = used_stack = None
    try:
        await form_circle(daemons)
        import_only = spawn_python(IMPORT_IDLE)
        zeroconf_idle = spawn_python(ZEROCONF_IDLE)
        used_stack = spawn_python(USED_STACK_IDLE)
        await trio.sleep(IDLE_SETTLE_S)
        rss_paired = {d.name: rss_mb(pid_of(d)) for d in daemons}
        rss_baseline = rss_mb(import_only.pid)
        rss_zeroconf = rss_mb(zeroconf_idle.pid)
        rss_used_stack = rss_mb(used_stack.pid)

        # The steady state of a paired device: the daemons restarted (as after a reboot),
        # reconnected by discovery alone, then idle. CPU is measured on these.
        rss_restarted = await restart_and_measure_rss(daemons)

        pids = {d.name: pid_of(d) for d in daemons}
        pids["baseline (import only)"] = import_only.pid
        pids["baseline (bare zeroconf)"] = zeroconf_idle.pid
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.monotonic()
        await trio.sleep(cpu_window)
        wall = time.monotonic() - started
        cpu = {name: 100 * (cpu_seconds(pid) - before[name]) / wall for name, pid in pids.items()}
        still = [await harness.connected_count(d) for d in daemons]
    finally:
        for daemon in daemons:
            daemon.kill()
        for process in (import_only, zeroconf_idle, used_stack):
            if process is not None:
                stop_python(process)
    return {"rss_paired": rss_paired, "rss_restarted": rss_restarted, "rss_baseline": rss_baseline,
            "rss_zeroconf": rss_zeroconf, "rss_used_stack": rss_used_stack,
            "cpu": cpu, "wall": wall, "still_connected": still}


async def restart_and_measure_rss(daemons: list[DaemonProcess]) -> dict[str, float]:
    """Stop and start every daemon, wait until all reconnected, idle, then read their RSS."""
    for daemon in daemons:
        assert await daemon.stop() == 0, "the daemon must stop cleanly"
    await start_all(daemons)
    for daemon in daemons:
        await wait_connected(daemon, len(daemons) - 1)
    await trio.sleep(IDLE_SETTLE_S)
    return {d.name: rss_mb(pid_of(d)) for d in daemons}


async def bench_rss_as_deployed(root: Path) -> dict[str, dict[str, float]]:
    """Idle RSS as the systemd units run meshd: PYTHONOPTIMIZE=2 (no docstrings, no asserts)."""
    os.environ["PYTHONOPTIMIZE"] = "2"  # inherited by the daemons started below
    daemons = [DaemonProcess(root, name) for name in ("alpha", "beta", "gamma")]
    try:
        await form_circle(daemons)
        await trio.sleep(IDLE_SETTLE_S)
        paired = {d.name: rss_mb(pid_of(d)) for d in daemons}
        restarted = await restart_and_measure_rss(daemons)
    finally:
        del os.environ["PYTHONOPTIMIZE"]
        for daemon in daemons:
            daemon.kill()
    return {"just paired": paired, "restarted": restarted}


# ---- main --------------------------------------------------------------------------------


async def main(quick: bool, connect_only: bool = False, restarts: int = RESTARTS) -> int:
    cpu_window = QUICK_CPU_WINDOW_S if quick else CPU_WINDOW_S
    with tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp:
        root = Path(tmp)
        with bytecode(root, present=True):
            deployed = await bench_reconnect(root / "reconnect", restarts)
        with bytecode(root, present=False):
            compiling = await bench_reconnect(root / "reconnect-compiling", restarts)
        print(f"1. spawn -> first peer connected (already paired, {restarts} restarts per key order)")
        print_reconnect("as deployed (PYTHONOPTIMIZE=2, bytecode compiled at install):", deployed, judged=True)
        print_reconnect("for context, no bytecode (every module compiled at each start):", compiling,
                        judged=False)
        print("   reference: Syncthing announces every 30-60 s (quoted, not measured)")
        if connect_only:
            return 0

        idle = await bench_idle(root / "idle", cpu_window)
        print(f"2. idle RSS, daemon with two connected peers (after {IDLE_SETTLE_S:.0f} s idle)")
        for label, key in (("just paired", "rss_paired"), ("restarted", "rss_restarted")):
            rss: dict[str, float] = idle[key]  # type: ignore[assignment]
            print(f"   meshd, {label + ':':12} max {max(rss.values()):.1f} MB"
                  f"   [{', '.join(f'{n} {v:.1f}' for n, v in rss.items())}]"
                  f"   target <= {TARGET_RSS_MB:.0f} MB: {mark(max(rss.values()), TARGET_RSS_MB)}")
        print(f"   baseline:  {idle['rss_baseline']:.1f} MB (python -c \"{STACK_IMPORTS}\")")
        print(f"              {idle['rss_used_stack']:.1f} MB the same once the AEAD (cryptography's"
              f" Rust/OpenSSL module) and libsodium are loaded;"
              f" {idle['rss_zeroconf']:.1f} MB import-only with a bare zeroconf running")

        deployed = await bench_rss_as_deployed(root / "deployed")
        print("   as the systemd units run it (PYTHONOPTIMIZE=2: no docstrings or asserts in memory):")
        for label, rss in deployed.items():
            print(f"   meshd, {label + ':':12} max {max(rss.values()):.1f} MB"
                  f"   [{', '.join(f'{n} {v:.1f}' for n, v in rss.items())}]"
                  f"   target <= {TARGET_RSS_MB:.0f} MB: {mark(max(rss.values()), TARGET_RSS_MB)}")

        cpu: dict[str, float] = idle["cpu"]  # type: ignore[assignment]
        daemon_cpu = {n: v for n, v in cpu.items() if not n.startswith("baseline")}
        print(f"3. idle CPU, daemon with two peers (restarted) over {idle['wall']:.0f} s"
              f" (peers still connected: {idle['still_connected']})")
        print(f"   meshd:     max {max(daemon_cpu.values()):.3f} %"
              f"   [{', '.join(f'{n} {v:.3f}' for n, v in daemon_cpu.items())}]"
              f"   target <= {TARGET_CPU_PERCENT} %: {mark(max(daemon_cpu.values()), TARGET_CPU_PERCENT)}")
        print(f"   baseline:  {cpu['baseline (import only)']:.3f} % imported stack idle,"
              f" {cpu['baseline (bare zeroconf)']:.3f} % bare zeroconf on 127.0.0.1")
    if quick:
        print(f"(--quick: CPU measured over {cpu_window:.0f} s instead of {CPU_WINDOW_S:.0f} s)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"idle CPU over {QUICK_CPU_WINDOW_S:.0f} s")
    parser.add_argument("--connect-only", action="store_true", help="only figure 1 (restarts)")
    parser.add_argument("--restarts", type=int, default=RESTARTS, help="restarts per key order")
    args = parser.parse_args()
    sys.exit(trio.run(main, args.quick, args.connect_only, args.restarts))
