"""A stranger offers a relay a 4,000-record circle: is the relay still responsive?

The relay runs as its own process. A legitimate member stays registered and sends
relay.records requests back to back (a round trip through the relay's event loop); a
stranger with a fresh key registers a valid 4,000-record circle it signed itself (genesis
and 3,998 epoch rotations, 1.2 MiB: all it pays for are signatures) while a second member
registers a new circle of its own (2 records). Figures, each beside its same-run baseline (no attack):

1. The member's round-trip time through the relay: max and p99 during the attack.
   target: max - baseline max < 100 ms (the relay's event-loop lag)
2. Time for a legitimate registration during the attack.              target < 1 s
3. Time until the stranger's offer is answered (it is accepted: it is a valid circle).

Run: .venv/bin/python bench/hostile_offer.py [--records N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshd.net.transport import connect_secure  # noqa: E402
from meshd.protocol.circle import Circle
from meshd.protocol.crypto import DHKeyPair, SigningKeyPair, seal  # noqa: E402
from meshd.protocol.records import EPOCH, DeviceInfo, Record
from meshd.relay.address import RelayAddress  # noqa: E402
from meshd.relay.session import open_relay_session  # noqa: E402


def member() -> tuple[SigningKeyPair, DHKeyPair, DeviceInfo]:
    signer, dh = SigningKeyPair(os.urandom(32)), DHKeyPair.generate(os.urandom)
    return signer, dh, DeviceInfo(bytes(signer.public), bytes(dh.public), "m").claimed(signer)


def small_circle() -> tuple[Circle, DHKeyPair]:
    signer, dh, info = member()
    return Circle.create(signer, info, os.urandom), dh


def long_circle(count: int) -> tuple[list[bytes], DHKeyPair]:
    """A valid circle of `count` records: genesis, then a chain of epoch rotations."""
    signer, dh, info = member()
    circle = Circle.create(signer, info, os.urandom)
    records, parent, key = circle.records(), circle.heads[0], bytes(dh.public)
    for number in range(2, count):
        record = Record.sign(signer, circle.circle_id, EPOCH, [parent],
                             {"boxes": [[key, seal(key, os.urandom(32))]], "epoch": number})
        records.append(record.encoded)
        parent = record.hash
    return records, dh


async def start_relay(state_dir: Path) -> tuple[subprocess.Popen[str], RelayAddress]:
    process = subprocess.Popen(  # noqa: ASYNC220 - spawning is instant
        [sys.executable, "-m", "meshd", "relay", "--state-dir", str(state_dir),
         "--listen", "127.0.0.1:0", "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = await trio.to_thread.run_sync(process.stdout.readline)
    return process, RelayAddress.parse(line.strip())


async def round_trips(address: RelayAddress, circle: Circle, dh: DHKeyPair, stop: trio.Event,
                      out: list[float]) -> None:
    connection = await connect_secure(address.host, address.port, static=dh,
                                      authorize=lambda key: key == address.key)
    async with connection:
        await connection.send({"t": "relay.register", "rid": 0, "records": circle.records()})
        await connection.receive()
        rid = 1
        while not stop.is_set():
            started = time.perf_counter()
            await connection.send({"t": "relay.records", "rid": rid})
            answer = await connection.receive()
            assert answer.get("rid") == rid, answer
            out.append(time.perf_counter() - started)
            rid += 1
            await trio.sleep(0.01)  # ~100 samples a second, under the rate limit


async def register_time(address: RelayAddress) -> float:
    circle, dh = small_circle()
    started = time.perf_counter()
    async with open_relay_session(address, dh, circle.records()):
        return time.perf_counter() - started


async def offer(address: RelayAddress, records: list[bytes], stranger: DHKeyPair) -> tuple[float, str]:
    connection = await connect_secure(address.host, address.port, static=stranger,
                                      authorize=lambda key: key == address.key)
    async with connection:
        started = time.perf_counter()
        await connection.send({"t": "relay.register", "rid": 1, "records": records})
        answer = await connection.receive()
        return time.perf_counter() - started, str(answer.get("t")) + " " + str(answer.get("code", ""))


async def phase(address: RelayAddress, records: list[bytes] | None,
                stranger: DHKeyPair) -> dict[str, float | str]:
    circle, dh = small_circle()
    samples: list[float] = []
    stop = trio.Event()
    result: dict[str, float | str] = {}
    answered = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(round_trips, address, circle, dh, stop, samples)
        await trio.sleep(0.5)
        if records is not None:
            async def attack() -> None:
                result["offer_s"], result["offer_answer"] = await offer(address, records, stranger)
                answered.set()

            nursery.start_soon(attack)
            await trio.sleep(0.05)  # the offer is being verified now
        result["register_s"] = await register_time(address)
        if records is not None:
            await answered.wait()
        await trio.sleep(0.3)
        stop.set()
    samples.sort()
    result["rtt_max_ms"] = samples[-1] * 1000
    result["rtt_p99_ms"] = samples[int(len(samples) * 0.99) - 1] * 1000
    result["rtt_p50_ms"] = statistics.median(samples) * 1000
    result["samples"] = len(samples)
    return result


async def main(count: int) -> None:
    print(f"building a {count}-record circle ...", flush=True)
    records, stranger = long_circle(count)
    print(f"  {sum(map(len, records)) / 2**20:.2f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        process, address = await start_relay(Path(tmp) / "relay")
        try:
            baseline = await phase(address, None, stranger)
            attacked = await phase(address, records, stranger)
        finally:
            process.terminate()
            process.wait()
    print(f"round trip through the relay, max:  {attacked['rtt_max_ms']:8.1f} ms   "
          f"baseline {baseline['rtt_max_ms']:6.1f} ms   lag added {attacked['rtt_max_ms'] - baseline['rtt_max_ms']:6.1f} ms"
          f"   (target < 100 ms)")
    print(f"round trip through the relay, p99:  {attacked['rtt_p99_ms']:8.1f} ms   "
          f"baseline {baseline['rtt_p99_ms']:6.1f} ms   ratio {attacked['rtt_p99_ms'] / baseline['rtt_p99_ms']:.2f}")
    print(f"round trip through the relay, p50:  {attacked['rtt_p50_ms']:8.1f} ms   "
          f"baseline {baseline['rtt_p50_ms']:6.1f} ms")
    print(f"legitimate registration:            {attacked['register_s'] * 1000:8.1f} ms   "
          f"baseline {baseline['register_s'] * 1000:6.1f} ms   (target < 1000 ms)")
    print(f"stranger's offer answered after:    {attacked['offer_s']:8.2f} s    ({attacked['offer_answer']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=4000)
    trio.run(main, parser.parse_args().records)
