"""End to end against Syncthing: N entries written on A until all are on B, in the same run.

meshd: two real `meshd run` daemons on loopback (tests/integration/daemons.py), paired and
connected; an app writes N records of 200 B on A through the local API's batch route
(Client.import_lines, as `meshctl import` does); the clock stops when B's /v1/status counts
all of them (B's event stream wakes the check on every commit, so no polling interval).

Syncthing: Debian's `syncthing` package (installed with apt-get when missing and possible;
otherwise this part is skipped with the reason), two instances on loopback, one shared
folder; N files of 200 B are written into A's folder, 100 per subdirectory (in one
directory, as `--flat` does, this Syncthing pulls 10,000 files about 5x slower: 86-90 s
against 18 s here, because B's rate falls as the directory grows); the clock stops when
B's folder has all of them in place (every 20 ms a listing of the subdirectories not yet
complete: Syncthing renames a received file into place once it is whole; its REST status
call is too costly to poll this often; with `--flat` the one directory is listed whole,
which costs the machine a core's share at 100,000 files).
"tuned" (the default profile): the file-system watcher's delay 1 s (Syncthing's default is
10 s), no fsync per received file (meshd's B commits received entries without an fsync too,
synchronous=NORMAL), up to 16 concurrent writes per folder (default 2), normal CPU priority.
`--syncthing-profile defaults` keeps Syncthing's own folder defaults instead. Either way
everything that could leave the machine is off: global and local discovery, relays,
NAT-PMP/UPnP, STUN, usage and crash reports, upgrades; both instances listen and dial on
127.0.0.1 only.

The two alternate at every size (meshd first at the 1st, 3rd, ... size, Syncthing first at the others),
so both see the same machine load. Sizes default to 1,000, 10,000 and 100,000.

Run: .venv/bin/python bench/vs_syncthing.py [--sizes 1000,10000] [--syncthing-profile defaults]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.api.client import Client  # noqa: E402
from tests.integration.daemons import DaemonProcess, form_circle  # noqa: E402

BODY_BYTES = 200
POLL_S = 0.02
START_TIMEOUT_S = 60.0
SYNC_TIMEOUT_S = 900.0
TARGET_RATIO = 10.0
SHARD_FILES = 100


def body(i: int) -> str:
    return f"{i:08d}" + "x" * (BODY_BYTES - 8)


# ---- meshd --------------------------------------------------------------------------------


class Meshd:
    def __init__(self, root: Path) -> None:
        self.a = DaemonProcess(root, "meshd-a", log_level="warning")
        self.b = DaemonProcess(root, "meshd-b", log_level="warning")

    async def start(self) -> None:
        await form_circle([self.a, self.b])

    async def run(self, n: int, tag: str) -> float:
        base = (await self.b.status())["entries"]
        client = Client(self.a.socket_path, timeout=600)
        lines = [json.dumps({"id": f"{tag}-{i:08d}", "body": body(i)}).encode() for i in range(n)]

        async def all_on_b() -> bool:
            return (await self.b.status())["entries"] >= base + n

        async with self.b.event_stream() as events:
            started = time.perf_counter()
            result = await trio.to_thread.run_sync(lambda: client.import_lines(lines, tag))
            assert result["written"] == n, result
            with trio.fail_after(SYNC_TIMEOUT_S):
                while not await all_on_b():
                    await events.next()
            return time.perf_counter() - started

    def stop(self) -> None:
        self.a.kill()
        self.b.kill()


# ---- Syncthing ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_syncthing() -> str | None:
    """The syncthing binary, installing Debian's package when missing; None with the reason
    printed when that is not possible."""
    found = shutil.which("syncthing")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("skip Syncthing: not installed, and installing it needs root and apt-get")
        return None
    print("installing Debian's syncthing package ...", flush=True)
    done = subprocess.run(["apt-get", "install", "-y", "syncthing"], capture_output=True, text=True,
                          env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if done.returncode != 0 or not shutil.which("syncthing"):
        print(f"skip Syncthing: apt-get install syncthing failed: {done.stderr.strip()[-300:]}")
        return None
    return shutil.which("syncthing")


class SyncthingNode:
    def __init__(self, binary: str, root: Path, name: str) -> None:
        self.binary = binary
        self.name = name
        self.home = root / name / "home"
        self.folder = root / name / "folder"
        self.folder.mkdir(parents=True)
        self.listen_port = free_port()
        self.gui_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        out = subprocess.run([binary, "generate", f"--home={self.home}", "--no-default-folder",
                              "--skip-port-probing"], capture_output=True, text=True, check=True)
        self.device_id = next(line.split("Device ID:", 1)[1].strip()
                              for line in (out.stdout + out.stderr).splitlines() if "Device ID:" in line)
        self.api_key = ""

    def configure(self, other: SyncthingNode, profile: str) -> None:
        path = self.home / "config.xml"
        tree = ET.parse(path)
        config = tree.getroot()
        options = config.find("options")
        assert options is not None
        settings = {
            "listenAddress": f"tcp://127.0.0.1:{self.listen_port}",
            "globalAnnounceEnabled": "false", "localAnnounceEnabled": "false",
            "relaysEnabled": "false", "natEnabled": "false", "urAccepted": "-1",
            "autoUpgradeIntervalH": "0", "crashReportingEnabled": "false",
            "startBrowser": "false", "stunKeepaliveStartS": "0", "stunKeepaliveMinS": "0",
            "announceLANAddresses": "false",
        }
        if profile == "tuned":
            settings["setLowPriority"] = "false"
        for key, value in settings.items():
            element = options.find(key)
            if element is None:
                element = ET.SubElement(options, key)
            element.text = value
        gui = config.find("gui")
        assert gui is not None
        address = gui.find("address")
        assert address is not None
        address.text = f"127.0.0.1:{self.gui_port}"
        api_key = gui.find("apikey")
        assert api_key is not None and api_key.text
        self.api_key = api_key.text
        for device in config.findall("device"):
            config.remove(device)
        for node in (self, other):
            device = ET.SubElement(config, "device", id=node.device_id, name=node.name,
                                   compression="metadata", introducer="false")
            ET.SubElement(device, "address").text = (
                "dynamic" if node is self else f"tcp://127.0.0.1:{node.listen_port}")
            ET.SubElement(device, "autoAcceptFolders").text = "false"
        folder = ET.SubElement(config, "folder", id="bench", label="bench", path=str(self.folder),
                               type="sendreceive", rescanIntervalS="3600", fsWatcherEnabled="true",
                               fsWatcherDelayS="1" if profile == "tuned" else "10",
                               ignorePerms="false", autoNormalize="true")
        for node in (self, other):
            ET.SubElement(folder, "device", id=node.device_id, introducedBy="")
        ET.SubElement(folder, "minDiskFree", unit="%").text = "0"
        if profile == "tuned":
            ET.SubElement(folder, "disableFsync").text = "true"
            ET.SubElement(folder, "maxConcurrentWrites").text = "16"
        tree.write(path)

    def start(self) -> None:
        env = dict(os.environ, STNOUPGRADE="1", STNODEFAULTFOLDER="1", STNORESTART="1")
        log = (self.home / "syncthing.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, "serve", f"--home={self.home}", "--no-browser", "--no-restart",
             "--no-upgrade", "--logflags=0"], stdout=log, stderr=log, env=env)
        log.close()

    def rest(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.gui_port}{path}",
                                         headers={"X-API-Key": self.api_key})
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback only
            return json.loads(response.read())

    def connected_to(self, other: SyncthingNode) -> bool:
        try:
            connections = self.rest("/rest/system/connections")["connections"]
        except OSError:
            return False
        return bool(connections.get(other.device_id, {}).get("connected"))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def complete_files(directory: Path) -> int:
    """Files Syncthing has finished writing in directory: it writes each to a temporary
    name (.syncthing.NAME.tmp) and renames it into place once whole."""
    try:
        with os.scandir(directory) as entries:
            return sum(1 for entry in entries if not entry.name.startswith(".syncthing."))
    except FileNotFoundError:
        return 0


class Arrivals:
    """Complete files in the shard directories under directory (shard j holds files
    j * shard_files onwards), for polling every 20 ms while Syncthing runs: a poll lists
    directory and scans only the shards not yet complete (rescanning all of them took
    about 9 ms per poll at 10,000 files, most of a core at 100,000, on a 2-core machine)."""

    def __init__(self, directory: Path, n: int, *, shard_files: int = SHARD_FILES) -> None:
        self.directory = directory
        self.expected = {f"{j:06d}": min(shard_files, n - j * shard_files)
                         for j in range((n + shard_files - 1) // shard_files)}
        self.finished = 0  # files in the shards found complete

    def count(self) -> int:
        try:
            with os.scandir(self.directory) as entries:
                present = [entry.name for entry in entries if entry.name in self.expected]
        except FileNotFoundError:
            return self.finished
        partial = 0
        for name in present:
            files = complete_files(self.directory / name)
            if files >= self.expected[name]:
                del self.expected[name]
                self.finished += files
            else:
                partial += files
        return self.finished + partial

    def pending(self) -> list[str]:
        return sorted(self.expected)


class Syncthing:
    def __init__(self, binary: str, root: Path, profile: str, flat: bool) -> None:
        self.flat = flat
        self.a = SyncthingNode(binary, root, "st-a")
        self.b = SyncthingNode(binary, root, "st-b")
        self.a.configure(self.b, profile)
        self.b.configure(self.a, profile)

    def start(self) -> None:
        self.a.start()
        self.b.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.a.connected_to(self.b) and self.b.connected_to(self.a)):
            if time.monotonic() > deadline:
                raise RuntimeError("the two Syncthing instances did not connect on loopback")
            time.sleep(0.2)

    def run(self, n: int, tag: str) -> float:
        directory = self.a.folder / tag
        arrived = self.b.folder / tag
        started = time.perf_counter()
        directory.mkdir()
        for i in range(n):
            shard = directory if self.flat else directory / f"{i // SHARD_FILES:06d}"
            if i % SHARD_FILES == 0 and not self.flat:
                shard.mkdir()
            (shard / f"{i:08d}").write_text(body(i))
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        arrivals = Arrivals(arrived, n)
        while True:
            files = complete_files(arrived) if self.flat else arrivals.count()
            if files >= n:
                return time.perf_counter() - started
            if time.monotonic() > deadline:
                raise RuntimeError(f"Syncthing: B has {files} of {n} files after {SYNC_TIMEOUT_S} s")
            time.sleep(POLL_S)

    def stop(self) -> None:
        self.a.stop()
        self.b.stop()


# ---- the run ------------------------------------------------------------------------------


async def bench(sizes: list[int], root: Path, profile: str, meshd_only: bool,
                flat: bool) -> list[dict[str, Any]]:
    binary = None if meshd_only else ensure_syncthing()
    meshd = Meshd(root)
    syncthing = Syncthing(binary, root, profile, flat) if binary else None
    rows: list[dict[str, Any]] = []
    try:
        await meshd.start()
        if syncthing is not None:
            await trio.to_thread.run_sync(syncthing.start)
        for position, n in enumerate(sizes):
            tag = f"n{n}-{position}"
            row: dict[str, Any] = {"entries": n}

            async def run_meshd(n: int = n, tag: str = tag, row: dict[str, Any] = row) -> None:
                row["meshd_s"] = await meshd.run(n, tag)

            async def run_syncthing(n: int = n, tag: str = tag, row: dict[str, Any] = row) -> None:
                if syncthing is not None:
                    row["syncthing_s"] = await trio.to_thread.run_sync(syncthing.run, n, tag)

            order = (run_meshd, run_syncthing) if position % 2 == 0 else (run_syncthing, run_meshd)
            for step in order:
                await step()
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        meshd.stop()
        if syncthing is not None:
            syncthing.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000",
                        help="comma-separated entry counts (default 1000,10000,100000)")
    parser.add_argument("--syncthing-profile", choices=("tuned", "defaults"), default="tuned")
    parser.add_argument("--meshd-only", action="store_true", help="skip Syncthing (meshd's column only)")
    parser.add_argument("--flat", action="store_true",
                        help="all N files in one directory (Syncthing slows down sharply past a few thousand)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",") if size]
    with tempfile.TemporaryDirectory(prefix="meshd-vs-st-", dir="/tmp") as directory:
        rows = trio.run(bench, sizes, Path(directory), args.syncthing_profile, args.meshd_only,
                        args.flat)
    print(f"| end to end: N entries of {BODY_BYTES} B written on A until all are on B "
          f"| meshd (batch API) | Syncthing 1.19, {args.syncthing_profile}, "
          f"{'one directory' if args.flat else f'{SHARD_FILES} files per directory'} | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        st = row.get("syncthing_s")
        if st is None:
            print(f"| {row['entries']:,} | {row['meshd_s']:.2f} s | skipped | - |")
            continue
        ratio = st / row["meshd_s"]
        verdict = f"meshd {ratio:.1f}x faster" if ratio >= 1 else f"meshd {1 / ratio:.1f}x slower"
        print(f"| {row['entries']:,} | {row['meshd_s']:.2f} s | {st:.2f} s | {verdict} "
              f"(target >= {TARGET_RATIO:.0f}x) |")


if __name__ == "__main__":
    main()
