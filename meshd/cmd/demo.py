"""`make demo`: meshd for real on this machine, each step printed with its timing.

A relay and three daemons run as separate processes with their own keys and databases in a
temporary directory; mDNS is real but bound to 127.0.0.1 (the demo never touches the
machine's network). The demo drives them only through their local API sockets, as an app
or meshctl would: it creates a circle, pairs two devices by code, syncs messages, takes one
device offline and lets it catch up through the relay, then removes a device and shows it
locked out. Everything stops and is removed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..api.client import Client, ClientError

START = time.perf_counter()
WAIT_S = 20.0


def step(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.3f}s] {text}", flush=True)


class Device:
    def __init__(self, root: Path, name: str, relay: str) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(mode=0o700)
        self.socket = self.dir / "api.sock"
        self.relay = relay
        self.process: subprocess.Popen[bytes] | None = None
        self.client = Client(self.socket, timeout=WAIT_S)

    def start(self, *, discovery: bool = True) -> None:
        config = self.dir / "meshd.toml"
        config.write_text(
            f'state_dir = "{self.dir / "state"}"\nsocket = "{self.socket}"\n'
            f'listen = "127.0.0.1:0"\ndevice_name = "{self.name}"\nrelays = ["{self.relay}"]\n'
            f'log_level = "warning"\n[discovery]\nenabled = {json.dumps(discovery)}\n'
            'interfaces = ["127.0.0.1"]\n')
        log = (self.dir / "meshd.log").open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "meshd", "run", "--config", str(config)],
                                        stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + WAIT_S
        while True:  # the API socket answering is the daemon's own "ready"
            try:
                self.client.status()
                return
            except ClientError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{self.name} did not start:\n{(self.dir / 'meshd.log').read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def texts(self, stream: str) -> list[str]:
        return [r["body"] for r in self.client.read(stream, limit=1000)["records"]]

    def wait_for(self, what: str, check: Callable[[], Any]) -> Any:
        """Re-check on every event of this daemon until check() is truthy."""
        with self.client.events(heartbeats=True) as events:  # subscribe, then look
            deadline = time.monotonic() + WAIT_S
            result = check()
            while not result:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{self.name}: gave up waiting for {what}")
                next(events, None)
                result = check()
            return result


def run_demo(root: Path) -> None:
    relay_dir = root / "relay"
    relay_process = subprocess.Popen(
        [sys.executable, "-m", "meshd", "relay", "--state-dir", str(relay_dir), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    devices: list[Device] = []
    try:
        assert relay_process.stdout is not None
        relay = relay_process.stdout.readline().strip()
        step(f"relay: a separate process (pid {relay_process.pid}) at {relay}")
        step("        it stores ciphertext for the devices and never holds a key")
        laptop, desktop, phone = (Device(root, name, relay) for name in ("laptop", "desktop", "phone"))
        devices += [laptop, desktop, phone]
        for device in devices:
            device.start()
            status = device.client.status()
            step(f"{device.name}: daemon pid {device.process.pid} listening on {status['listen'][0]}, "  # type: ignore[union-attr]
                 f"fingerprint {status['fingerprint']}, a new circle of one")

        invitation = laptop.client.invite()
        step(f"laptop: `meshctl invite` -> code {invitation['code']!r} (valid 10 minutes, one attempt)")
        joined = desktop.client.join(invitation["code"])
        step(f"desktop: `meshctl join {invitation['code']}` -> found the laptop over mDNS, PAKE + "
             f"Noise_XXpsk3; check words {' '.join(joined['sas'])}")
        invitation = laptop.client.invite()
        joined = phone.client.join(invitation["code"])
        step(f"phone: joined with code {invitation['code']!r}; check words {' '.join(joined['sas'])}")
        for device in devices:
            device.wait_for("two peers", lambda d=device: d.client.status()["peers_connected"] == 2)
        step("all three found each other over mDNS and hold Noise_XX connections (2 peers each)")

        sent = time.perf_counter()
        laptop.client.write("chat", "hello from the laptop")
        for device in (desktop, phone):
            device.wait_for("the laptop's message", lambda d=device: "hello from the laptop" in d.texts("chat"))
        step(f"laptop wrote 'hello from the laptop'; desktop and phone have it "
             f"({1000 * (time.perf_counter() - sent):.0f} ms)")

        phone.stop()
        step("phone: stopped (gone offline)")
        laptop.client.write("chat", "written while the phone was away")
        desktop.client.write("chat", "the desktop says hi too")
        step("laptop and desktop wrote two messages; for the phone they go to the relay, sealed "
             "with the circle's epoch key")
        phone.start(discovery=False)
        step("phone: back, on a network where it cannot see the others (mDNS off)")
        sent = time.perf_counter()
        expected = {"written while the phone was away", "the desktop says hi too"}
        phone.wait_for("the relay's envelopes", lambda: expected <= set(phone.texts("chat")))
        step(f"phone caught up through the relay in {1000 * (time.perf_counter() - sent):.0f} ms: "
             f"{phone.texts('chat')}")

        desktop_id = desktop.client.status()["device"]
        removed = laptop.client.remove(desktop_id[:16])
        step(f"laptop: `meshctl remove desktop` -> new epoch {removed['epoch']} sealed to the "
             "remaining devices only")
        laptop.wait_for("desktop to be dropped",
                        lambda: all(p["device"] != desktop_id for p in laptop.client.peers()))
        laptop.client.write("chat", "a secret after the desktop was removed")
        phone.wait_for("the new message", lambda: "a secret after the desktop was removed" in phone.texts("chat"))
        desktop_sees = "a secret after the desktop was removed" in desktop.texts("chat")
        step(f"phone got the new message; the desktop did not ({'LEAK' if desktop_sees else 'locked out'}), "
             f"and its connections now fail: {desktop.client.status()['peers_connected']} peers")
    finally:
        for device in devices:
            device.stop()
        relay_process.terminate()
        try:
            relay_process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            relay_process.kill()
            relay_process.wait()
        if relay_process.stdout is not None:
            relay_process.stdout.close()
        step("all processes stopped")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="meshd-demo-") as tmp:
        os.chmod(tmp, 0o700)
        run_demo(Path(tmp))
    step("temporary keys and databases removed")


if __name__ == "__main__":
    main()
