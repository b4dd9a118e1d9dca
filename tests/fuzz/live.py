"""Live fuzzing of real processes: a relay's port, a daemon's device port, the API socket.

Each target is a real process on loopback. Inputs are mutated frames (targets.py seeds,
mutate.py mutations) sent after a completed handshake (as a stranger to the relay, as a
circle member to the daemon), raw garbage before one, and mutated HTTP requests to the API.
After the run the process must still be running, have logged no bug ("a bug in meshd",
"Traceback"), serve a legitimate request, and its RSS is reported against its start.

    python -m tests.fuzz.live [--inputs N] [--target relay|daemon|api ...] [--sessions N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from meshd.identity import load_or_create_identity
from meshd.net.tally import INTERVAL_S
from meshd.protocol.crypto import DHKeyPair
from meshd.relay.address import RelayAddress
from meshd.relay.session import open_relay_session

from ..integration.daemons import DaemonProcess, RelayProcess, pair, wait_connected
from ..shell.test_relay import make_circle
from .mutate import hostile_leaf, mutate_bytes, mutate_value
from .sessions import Counts, Dial, dial_member, dial_stranger, member_psk
from .targets import TARGETS

FRAMES_PER_CONNECTION = 50
GARBAGE_AT_ONCE = 16
# Connections at once to the daemon's device port (--sessions), each as its own paired
# member (or stranger): while one waits on a round trip, the others' frames are in flight.
# 1 by default: on the loaded 2-core machine 4 gained nothing (every input costs a
# handshake's CPU on both sides) and pairing the extra members costs seconds.
DAEMON_SESSIONS = 1
PROBE_TIMEOUT_S = 30.0
# A frame whose answer (of the second type) shows the target handled what came before.
RELAY_PROBE = ({"t": "relay.records", "rid": 2**40}, "relay.records")
DAEMON_PROBE = ({"t": "circle.want"}, "circle.records")
# make fuzz measures RSS again this long after the end of a run: one sweep interval of the
# per-source memory (refusal tallies, rate buckets), so what is swept has been swept.
SETTLE_S = INTERVAL_S
BUG_MARKERS = ("a bug in meshd", "Traceback")


def bugs_in(log: str) -> list[str]:
    """The bug reports in a log (each with the end of its traceback), or []."""
    lines = log.splitlines()
    found = []
    for index, line in enumerate(lines):
        if any(marker in line for marker in BUG_MARKERS):
            found.append("\n".join(lines[index:index + 40]))
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def settled_rss_kib(pid: int, settle_s: float) -> int:
    """RSS settle_s after the fuzz ended (the process left idle meanwhile). A fixed wait
    is the point here: idle time is what the sweep needs to pass."""
    await trio.sleep(settle_s)
    return rss_kib(pid)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def mutated_frame(seeds: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
    value: Any = rng.choice(seeds)
    for _ in range(rng.randrange(1, 4)):
        value = mutate_value(value, rng)
    if not isinstance(value, dict):
        value = {"t": value}
    if not isinstance(value.get("t"), str):
        value["t"] = rng.choice([s["t"] for s in seeds])
    return value


async def send_frames(address: tuple[str, int], static: DHKeyPair, prefix: list[dict[str, Any]],
                      frames: Iterable[dict[str, Any]], probe: tuple[dict[str, Any], str],
                      dial: Dial | None = None) -> int | None:
    """One connection: handshake, the prefix, then each frame followed by a probe whose
    answer (of the probe's type) says the target has read and handled the frame. Returns
    how many frames the target took in before it closed the connection (the usual end), or
    None when it refused the handshake. With `dial` (a member's) a refused handshake is a
    failure: the frames were meant for the code behind it."""
    try:
        connection = await (dial or dial_stranger)(address, static)
    except (OSError, trio.TooSlowError) as err:
        raise AssertionError(f"the target stopped accepting connections: {err}") from err
    except Exception as err:  # noqa: BLE001 - a refused handshake is an answer, not a failure
        if dial is not None:
            raise AssertionError(f"the target refused a member's handshake: {err!r}") from err
        return None
    taken = 0
    async with connection:
        try:
            for frame in prefix:
                await connection.send(frame)
            for frame in frames:
                await connection.send(frame)
                await connection.send(probe[0])
                taken += 1
                with trio.fail_after(PROBE_TIMEOUT_S):
                    while (await connection.receive()).get("t") != probe[1]:
                        pass
        except trio.TooSlowError as err:
            raise AssertionError(f"the target did not answer within {PROBE_TIMEOUT_S} s "
                                 f"after {str(frame)[:300]}") from err
        except Exception:  # noqa: BLE001 - closed on us (the expected end) or unencodable
            pass
    return taken


async def garbage(address: tuple[str, int], data: bytes) -> None:
    try:
        stream = await trio.open_tcp_stream(*address)
    except OSError as err:
        raise AssertionError(f"the target stopped accepting connections: {err}") from err
    async with stream:
        try:
            await stream.send_all(data)
            with trio.move_on_after(1):
                await stream.receive_some(1024)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def fuzz_connections(address: tuple[str, int], keys: list[DHKeyPair],
                           seeds: list[dict[str, Any]], prefix: list[dict[str, Any]],
                           probe: tuple[dict[str, Any], str], inputs: int, rng: random.Random,
                           deadline: float, dial: Dial | None = None, sessions: int = 1) -> Counts:
    """Sends `inputs` inputs; counts what kind each was (garbage before a handshake, a
    refused handshake, a frame the target took in behind a completed handshake). With
    sessions > 1, that many connections run at once, session i always with keys[i] (a
    daemon keeps one session per member key: each needs its own), each from its own
    random generator seeded from rng."""
    counts = Counts()
    in_flight = 0  # inputs handed to a connection not yet counted
    # A garbage connection waits up to a second for an answer that does not come: those run
    # beside the framed connections (at most GARBAGE_AT_ONCE open), not in turn with them.
    limiter = trio.CapacityLimiter(GARBAGE_AT_ONCE)

    async def one_garbage(data: bytes, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with limiter:
            task_status.started()
            await garbage(address, data)

    async def session(nursery: trio.Nursery, key: DHKeyPair | None, rng: random.Random) -> None:
        nonlocal in_flight
        while time.monotonic() < deadline:
            count = min(FRAMES_PER_CONNECTION, inputs - counts.sent - in_flight)
            if count <= 0:
                return
            if rng.random() < 0.05:
                counts.garbage += 1
                await nursery.start(one_garbage, mutate_bytes(b"\x00\x20" + bytes(32), rng))
                continue
            # Made one at a time as the connection takes them: most end it at the first
            # frame, and mutating the other 49 up front cost four times what sending took.
            frames = (mutated_frame(seeds, rng) for _ in range(count))
            in_flight += count
            try:
                taken = await send_frames(address, key or rng.choice(keys), prefix, frames, probe, dial)
            finally:
                in_flight -= count
            counts.connections += 1
            if taken is None:
                counts.refused += 1
            else:
                counts.frames += max(1, taken)

    async with trio.open_nursery() as nursery:
        if sessions == 1:
            await session(nursery, None, rng)
        else:
            for index in range(sessions):
                nursery.start_soon(session, nursery, keys[index % len(keys)],
                                   random.Random(rng.getrandbits(64)))
    return counts


async def fuzz_relay(root: Path, inputs: int, rng: random.Random, deadline: float,
                     settle_s: float = 0.0) -> dict[str, Any]:
    circle, m, _ = make_circle("alice", "bob")
    relay = RelayProcess(root, extra=["--rate", "100000", "--burst", "100000"])
    try:
        address = RelayAddress.parse(await relay.start())
        assert relay.process is not None
        start_rss = rss_kib(relay.process.pid)
        seeds = TARGETS["relay.request"].seeds()
        register = {"t": "relay.register", "rid": 0, "records": circle.records()}
        strangers = [DHKeyPair.generate(os.urandom) for _ in range(4)]
        half = inputs // 2
        counts = await fuzz_connections((address.host, address.port), strangers, seeds, [],
                                        RELAY_PROBE, half, rng, deadline)
        counts += await fuzz_connections((address.host, address.port), [m["alice"].dh], seeds,
                                       [register], RELAY_PROBE, inputs - half, rng, deadline)
        async with open_relay_session(address, m["bob"].dh, circle.records()) as bob:
            assert bob.registration is not None
        assert relay.process.poll() is None, "the relay exited"
        end_rss = rss_kib(relay.process.pid)
        settled_rss = await settled_rss_kib(relay.process.pid, settle_s)
    finally:
        relay.kill()
    log = relay.log_path.read_text(errors="replace")
    return {**counts.figures(), "rss_start_kib": start_rss, "rss_end_kib": end_rss,
            "rss_settled_kib": settled_rss, "bugs": bugs_in(log)}


async def fuzz_daemon(root: Path, inputs: int, rng: random.Random, deadline: float,
                      settle_s: float = 0.0, sessions: int = DAEMON_SESSIONS) -> dict[str, Any]:
    """The daemon's device port: 10% from strangers (refused at the first handshake
    message), 90% from paired members behind a completed handshake, `sessions` at once
    (one paired member each)."""
    port = free_port()
    alpha = DaemonProcess(root, "alpha", listen=f"127.0.0.1:{port}", discovery=False, log_level="warning")
    joiners = [DaemonProcess(root, f"member{index}", discovery=False, peers=[f"127.0.0.1:{port}"])
               for index in range(sessions)]
    try:
        await alpha.start()
        for joiner in joiners:
            await joiner.start()
            await pair(alpha, joiner, address="127.0.0.1")
            await wait_connected(joiner, 1)
            await joiner.stop()
        members = [load_or_create_identity(joiner.state_dir).noise for joiner in joiners]
        # The newest epoch's PSK: the last joiner's saved circle has every addition.
        psk = member_psk(joiners[-1].state_dir, members[-1])
        assert alpha.process is not None
        start_rss = rss_kib(alpha.process.pid)
        seeds = [*TARGETS["sync.receive"].seeds(),
                 {"t": "log.hello", "vector": {bytes(32): 1}},
                 {"t": "circle.heads", "heads": [bytes(32)]}, {"t": "circle.want"},
                 {"t": "circle.records", "records": TARGETS["circle.record"].seeds()}]
        hello = [{"t": "log.hello", "vector": {}}, {"t": "log.credit", "bytes": 1 << 20}]
        strangers = [DHKeyPair.generate(os.urandom) for _ in range(sessions)]
        counts = await fuzz_connections(("127.0.0.1", port), strangers, seeds, [], DAEMON_PROBE,
                                        inputs // 10, rng, deadline, sessions=sessions)
        counts += await fuzz_connections(("127.0.0.1", port), members, seeds, hello, DAEMON_PROBE,
                                         inputs - inputs // 10, rng, deadline,
                                         dial_member(psk), sessions=sessions)
        await alpha.write("notes", "still writing")
        assert alpha.process.poll() is None, "the daemon exited"
        end_rss = rss_kib(alpha.process.pid)
        settled_rss = await settled_rss_kib(alpha.process.pid, settle_s)
    finally:
        alpha.kill()
        for joiner in joiners:
            joiner.kill()
    return {**counts.figures(), "rss_start_kib": start_rss, "rss_end_kib": end_rss,
            "rss_settled_kib": settled_rss, "bugs": bugs_in(alpha.log())}


API_SEEDS: list[tuple[str, str, Any]] = [
    ("POST", "/v1/streams/notes/records", {"body": "x", "id": "r1"}),
    ("POST", "/v1/streams/notes/records", {"body_b64": "eA=="}),
    ("GET", "/v1/streams/notes/records?limit=5&after=", None),
    ("DELETE", "/v1/streams/notes/records/r1", None),
    ("POST", "/v1/join", {"code": "7-zebra-garden", "address": "127.0.0.1:1"}),
    ("POST", "/v1/recover", {"words": ["a", "b"], "relay": "x"}),
    ("POST", "/v1/relays", {"address": "127.0.0.1:1#AAAA"}),
    ("GET", "/v1/status", None), ("GET", "/metrics", None),
]


async def fuzz_api(root: Path, inputs: int, rng: random.Random, deadline: float,
                   settle_s: float = 0.0) -> dict[str, Any]:
    daemon = DaemonProcess(root, "api", discovery=False, log_level="warning")
    statuses: dict[int, int] = {}
    try:
        await daemon.start()
        assert daemon.process is not None
        start_rss = rss_kib(daemon.process.pid)
        sent = 0
        while sent < inputs and time.monotonic() < deadline:
            method, target, body = rng.choice(API_SEEDS)
            if body is not None:
                for _ in range(rng.randrange(1, 3)):
                    body = mutate_value(body, rng)
            if rng.random() < 0.3:
                target = target.replace("notes", rng.choice(["%ED%A0%80", "%FF", "x" * 300, "%00", "a%2Fb"]))
            try:
                payload = None if body is None else json.dumps(body, default=lambda v: repr(v)).encode()
            except (ValueError, TypeError):
                payload = repr(hostile_leaf(rng)).encode()
            if payload is not None and rng.random() < 0.2:
                payload = mutate_bytes(payload, rng)
            status, _ = await daemon.request_raw(method, target, payload)
            statuses[status] = statuses.get(status, 0) + 1
            sent += 1
        await daemon.write("notes", "still writing")
        end_rss = rss_kib(daemon.process.pid)
        settled_rss = await settled_rss_kib(daemon.process.pid, settle_s)
    finally:
        daemon.kill()
    return {"inputs": sent, "rss_start_kib": start_rss, "rss_end_kib": end_rss,
            "rss_settled_kib": settled_rss, "statuses": statuses,
            "bugs": bugs_in(daemon.log())
            + (["HTTP 500"] if 500 in statuses else [])}


LIVE: dict[str, Callable[[Path, int, random.Random, float, float], Awaitable[dict[str, Any]]]] = {
    "relay": fuzz_relay, "daemon": fuzz_daemon, "api": fuzz_api,
}


async def run(names: list[str], inputs: int, seed: int, limit_s: float,
              settle_s: float = 0.0, sessions: int = DAEMON_SESSIONS) -> dict[str, dict[str, Any]]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rng = random.Random(seed)
            target = partial(fuzz_daemon, sessions=sessions) if name == "daemon" else LIVE[name]
            results[name] = await target(Path(tmp) / name, inputs, rng, time.monotonic() + limit_s,
                                         settle_s)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--limit-s", type=float, default=3600, help="time limit per target")
    parser.add_argument("--target", action="append", choices=sorted(LIVE))
    parser.add_argument("--settle-s", type=float, default=SETTLE_S,
                        help="idle time before the last RSS reading (default: one sweep interval)")
    parser.add_argument("--sessions", type=int, default=DAEMON_SESSIONS,
                        help="daemon target: connections at once, each as its own paired member")
    args = parser.parse_args(argv)
    names = args.target or sorted(LIVE)
    results = trio.run(run, names, args.inputs, args.seed, args.limit_s, args.settle_s, args.sessions)
    failed = False
    for name, result in results.items():
        print(f"{name:7} {result['inputs']:>8,} inputs  RSS {result['rss_start_kib'] / 1024:6.1f} MB"
              f" -> {result['rss_end_kib'] / 1024:6.1f} MB at the end"
              f" -> {result['rss_settled_kib'] / 1024:6.1f} MB {args.settle_s:g} s later"
              f"  bugs: {len(result['bugs'])}"
              + (f"  statuses {result['statuses']}" if "statuses" in result else "")
              + (f"  behind a handshake {result['behind_handshake']:,} on {result['connections']:,}"
                 f" connections, refused handshakes {result['refused']:,}, garbage {result['garbage']:,}"
                 if "behind_handshake" in result else ""), flush=True)
        for bug in result["bugs"][:3]:
            print(bug, flush=True)
        failed |= bool(result["bugs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

