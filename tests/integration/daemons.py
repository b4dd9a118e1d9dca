"""Real `meshd run` processes for end-to-end tests, driven through their local API.

Each DaemonProcess is a separate Python process with its own state directory, config file,
API socket and (optionally) network namespace. Start-up waits for the daemon's own
READY=1 on a NOTIFY_SOCKET we create (the same signal systemd waits for); convergence waits
subscribe to the daemon's /v1/events stream and re-check state on every event, so no test
ever sleeps in the hope that something happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h11
import trio

READY_TIMEOUT_S = 20.0
# The backup's batching window in tests: the old 2 s debounce, so a test waiting for a backup
# does not wait the default 20 s (None: the default, as the soak measures it).
TEST_BACKUP_WINDOW_S = 2.0


class DaemonProcess:
    def __init__(self, root: Path, name: str, *, listen: str = "127.0.0.1:0",
                 discovery: bool = True, interfaces: Sequence[str] = ("127.0.0.1",),
                 peers: Sequence[str] = (), relays: Sequence[str] = (),
                 netns: str | None = None, log_level: str = "info",
                 backup_window: float | None = TEST_BACKUP_WINDOW_S,
                 deposit_gather: float | None = None,
                 launcher: Sequence[str] = (sys.executable, "-m", "meshd")) -> None:
        self.name = name
        self.launcher = list(launcher)
        self.dir = root / name
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir = self.dir / "state"
        self.socket_path = self.dir / "api.sock"
        self.log_path = self.dir / "meshd.log"
        self.netns = netns
        self.process: subprocess.Popen[bytes] | None = None
        self._notify: trio.socket.SocketType | None = None
        self.settings: dict[str, Any] = {
            "listen": listen, "peers": list(peers), "relays": list(relays), "log_level": log_level,
            "discovery": discovery, "interfaces": list(interfaces), "backup_window": backup_window,
            "deposit_gather": deposit_gather,
        }
        self.config_path = self.dir / "meshd.toml"
        self.reconfigure()

    def reconfigure(self, **changes: Any) -> None:
        """Rewrite the config file (takes effect at the next start)."""
        self.settings.update(changes)
        settings = self.settings
        config = {
            "state_dir": str(self.state_dir), "socket": str(self.socket_path),
            "listen": settings["listen"], "device_name": self.name, "peers": settings["peers"],
            "relays": settings["relays"], "log_level": settings["log_level"],
        }
        if settings["backup_window"] is not None:
            config["backup_window"] = settings["backup_window"]
        if settings["deposit_gather"] is not None:
            config["deposit_gather"] = settings["deposit_gather"]
        lines = [f"{key} = {json.dumps(value)}" for key, value in config.items()]
        lines += ["[discovery]", f"enabled = {json.dumps(settings['discovery'])}",
                  f"interfaces = {json.dumps(settings['interfaces'])}"]
        self.config_path.write_text("\n".join(lines) + "\n")

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._close_notify()
        notify_path = self.dir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        notify = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
        await notify.bind(str(notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1")
        argv = [*self.launcher, "run", "--config", str(self.config_path)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(argv, env=env, stdout=log_file, stderr=log_file)  # noqa: ASYNC220 - spawning is instant; waiting is what we await
        log_file.close()
        try:
            with trio.fail_after(READY_TIMEOUT_S):
                while True:
                    message = (await notify.recv(4096)).decode()
                    if "READY=1" in message.split("\n"):
                        break
        except trio.TooSlowError:
            notify.close()
            raise AssertionError(f"{self.name} did not become ready:\n{self.log()}") from None
        # Kept open while the daemon runs, as systemd does: it also sends STATUS and STOPPING.
        self._notify = notify

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self, limit_s: float = 5.0) -> int:
        """SIGTERM, then wait; returns the exit status (the daemon must stop within 5 s)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        status = await trio.to_thread.run_sync(self.process.wait, limit_s)
        self._close_notify()
        if status != 0:  # the test fails on it: show why the daemon did not stop cleanly
            print(f"{self.name} exited with status {status}; the end of its log:\n{self.log()[-4000:]}")
        return status

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close_notify()

    def _close_notify(self) -> None:
        notify, self._notify = self._notify, None
        if notify is not None:
            notify.close()

    # -- the local API -------------------------------------------------------------------

    async def request(self, method: str, target: str, body: Any = None, *, raw: bool = False) -> Any:
        """One API call; returns the decoded JSON (raw: the bytes), raises ApiFailure on an
        error status."""
        payload = None if body is None else json.dumps(body).encode()
        status, data = await self.request_raw(method, target, payload)
        if raw and status < 400:
            return data
        decoded = json.loads(data or b"null")
        if status >= 400:
            raise ApiFailure(status, decoded)
        return decoded

    async def request_text(self, method: str, target: str) -> str:
        status, raw = await self.request_raw(method, target, None)
        assert status == 200, (status, raw)
        return raw.decode()

    async def request_raw(self, method: str, target: str, payload: bytes | None) -> tuple[int, bytes]:
        """One API call with a raw body (None: no body); returns (status, response body)."""
        stream = await trio.open_unix_socket(str(self.socket_path))
        async with stream:
            connection = h11.Connection(h11.CLIENT)
            headers = [("Host", "meshd"), ("Content-Length", str(len(payload or b"")))]
            if payload is not None:
                headers.append(("Content-Type", "application/json"))
            data = connection.send(h11.Request(method=method, target=target, headers=headers))
            data += connection.send(h11.Data(data=payload)) if payload else b""
            data += connection.send(h11.EndOfMessage())
            await stream.send_all(data)
            status, chunks = 0, []
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        return status, b"".join(chunks)

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/status")

    async def write(self, stream: str, text: str, record_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"body": text}
        if record_id is not None:
            body["id"] = record_id
        return await self.request("POST", f"/v1/streams/{stream}/records", body)

    async def records(self, stream: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            query = "?limit=1000" + (f"&after={after}" if after else "")
            page = await self.request("GET", f"/v1/streams/{stream}/records{query}")
            records.extend(page["records"])
            after = page.get("next")
            if not after:
                return records

    async def texts(self, stream: str) -> list[str]:
        return [r["body"] for r in await self.records(stream)]

    async def until(self, check: Callable[[], Any], limit_s: float, what: str) -> Any:
        """Wait until `await check()` is truthy, re-checking on each event of the daemon."""
        try:
            with trio.fail_after(limit_s):
                async with self.event_stream() as events:
                    while True:
                        result = await check()
                        if result:
                            return result
                        await events.next()
        except trio.TooSlowError:
            raise AssertionError(f"{self.name}: timed out after {limit_s} s waiting for {what}\n"
                                 f"--- {self.name} log ---\n{self.log()[-4000:]}") from None

    def event_stream(self) -> EventStream:
        return EventStream(self.socket_path)


class ApiFailure(Exception):
    def __init__(self, status: int, body: Any) -> None:
        error = (body or {}).get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"{status} {error.get('code')}: {error.get('message')}")
        self.status = status
        self.code = error.get("code")


class EventStream:
    """The daemon's NDJSON event stream (heartbeats included: any line wakes the waiter)."""

    def __init__(self, socket_path: Path) -> None:
        self._socket_path = socket_path
        self._buffer = b""
        self._connection = h11.Connection(h11.CLIENT)

    async def __aenter__(self) -> EventStream:
        self._stream = await trio.open_unix_socket(str(self._socket_path))
        await self._stream.send_all(self._connection.send(
            h11.Request(method="GET", target="/v1/events", headers=[("Host", "meshd")]))
            + self._connection.send(h11.EndOfMessage()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stream.aclose()

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            event = self._connection.next_event()
            if event is h11.NEED_DATA:
                data = await self._stream.receive_some(65536)
                if not data:
                    raise EOFError("event stream closed")
                self._connection.receive_data(data)
            elif isinstance(event, h11.Data):
                self._buffer += bytes(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                raise EOFError("event stream ended")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line) if line.strip() else {}


class RelayProcess:
    """A real `meshd relay` process; its address is the line it prints when ready."""

    def __init__(self, root: Path, name: str = "relay", *, extra: Sequence[str] = (),
                 launcher: Sequence[str] = (sys.executable, "-m", "meshd")) -> None:
        self.launcher = list(launcher)
        self.dir = root / name
        self.state_dir = self.dir / "state"
        self.log_path = self.dir / "relay.log"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = list(extra)
        # What runs the relay: `meshd relay`, or a test's patched relay taking the same options.
        self.command = [*self.launcher, "relay"]
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.port = 0

    async def start(self) -> str:
        listen = f"127.0.0.1:{self.port}"
        log_file = self.log_path.open("a")
        self.process = subprocess.Popen(  # noqa: ASYNC220 - spawning is instant; its output line is awaited
            [*self.command, "--state-dir", str(self.state_dir),
             "--listen", listen, *self.extra],
            stdout=subprocess.PIPE, stderr=log_file, text=True)
        log_file.close()
        assert self.process.stdout is not None
        with trio.fail_after(READY_TIMEOUT_S):
            line = await trio.to_thread.run_sync(self.process.stdout.readline)
        if not line.strip():
            raise AssertionError(f"relay did not start:\n{self.log_path.read_text()}")
        self.address = line.strip()
        self.port = int(self.address.split("#")[0].rsplit(":", 1)[1])
        return self.address

    def kill(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()

    def files_contain(self, needle: bytes) -> list[Path]:
        return [p for p in self.state_dir.rglob("*") if p.is_file() and needle in p.read_bytes()]

    async def wipe(self) -> str:
        """Kill the relay, lose its database (keeping its key), and start it again on the same
        port: what devices see of a relay whose disk was replaced."""
        self.kill()
        for path in self.state_dir.glob("relay.sqlite3*"):
            path.unlink()
        return await self.start()


async def start_all(daemons: Sequence[DaemonProcess]) -> None:
    async with trio.open_nursery() as nursery:
        for daemon in daemons:
            nursery.start_soon(daemon.start)


async def pair(inviter: DaemonProcess, joiner: DaemonProcess, *, address: str | None = None) -> dict[str, Any]:
    invitation = await inviter.request("POST", "/v1/invite")
    body: dict[str, Any] = {"code": invitation["code"]}
    if address is not None:
        body["address"] = f"{address}:{invitation['port']}"
    return await joiner.request("POST", "/v1/join", body)


CONVERGE_S = 10.0


async def connected_count(daemon: DaemonProcess) -> int:
    return int((await daemon.status())["peers_connected"])


async def wait_connected(daemon: DaemonProcess, count: int, limit_s: float = CONVERGE_S) -> None:
    async def check() -> bool:
        return await connected_count(daemon) >= count

    await daemon.until(check, limit_s, f"{count} connected peers")


async def wait_texts(daemon: DaemonProcess, stream: str, expected: set[str],
                     limit_s: float = CONVERGE_S) -> list[str]:
    async def check() -> list[str] | None:
        texts = await daemon.texts(stream)
        return texts if expected <= set(texts) else None

    return await daemon.until(check, limit_s, f"{sorted(expected)} in {stream}")


async def form_circle(daemons: Sequence[DaemonProcess]) -> None:
    """Start the daemons, pair every other one with the first, and wait until all are connected."""
    await start_all(daemons)
    first, *others = daemons
    for other in others:
        await pair(first, other)
    for daemon in daemons:
        await wait_connected(daemon, len(daemons) - 1)


async def send_hostile_handshakes(port: int, count: int, attackers: int = 16) -> None:
    """count hostile connections to a daemon's device port on loopback, from `attackers`
    tasks back to back: every other one sends garbage where the first handshake message
    goes and waits for the daemon to hang up, the rest connect and hang up at once."""
    todo = iter(range(count))

    async def attacker() -> None:
        for i in todo:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                if i % 2:
                    await stream.send_all(b"\x00\x30" + bytes(48))
                    await stream.receive_some(1024)

    async with trio.open_nursery() as nursery:
        for _ in range(attackers):
            nursery.start_soon(attacker)
