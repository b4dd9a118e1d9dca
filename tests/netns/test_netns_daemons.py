"""Three real daemons on three hosts (network namespaces on one bridge; see netns.py).

Each device runs `meshd run` inside its own namespace with mDNS on its eth0 only; the test
drives them through their API sockets (unix sockets are not namespaced). Needs root; skips
with the reason otherwise.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.integration.daemons import (
    DaemonProcess,
    form_circle,
    start_all,
    wait_connected,
    wait_texts,
)

from .netns import DEVICE_INTERFACE, Network, available, impair_available

OK, WHY_NOT = available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not OK, reason=WHY_NOT)]

DEVICES = ("laptop", "desktop", "server")


@pytest.fixture
async def lan(tmp_path: Path) -> AsyncIterator[tuple[Network, list[DaemonProcess]]]:
    # Host 4 runs no daemon: it is the outsider on the same LAN (test_outsider_sees_no_identifier).
    with Network(devices=4) as network:
        daemons = [
            DaemonProcess(tmp_path, name, listen="0.0.0.0:7743", netns=network.ns(n),
                          interfaces=[network.address(n)])
            for n, name in enumerate(DEVICES, start=1)
        ]
        try:
            await form_circle(daemons)
            yield network, daemons
        finally:
            for daemon in daemons:
                daemon.kill()


async def test_discover_and_converge_within_three_seconds_of_start(lan) -> None:
    """From a cold start, the devices find each other and sync what each wrote while the
    others were down: every note below exists on one device only until this start."""
    network, daemons = lan
    hosts = range(1, len(daemons) + 1)
    for daemon in daemons:
        assert await daemon.stop() == 0
    for n in hosts:  # each device cut off the LAN: what it writes now can reach no other
        network.link_down(n)
    await start_all(daemons)
    for daemon in daemons:
        await daemon.write("notes", f"from {daemon.name}")
    for daemon in daemons:
        assert await daemon.texts("notes") == [f"from {daemon.name}"]
        assert await daemon.stop() == 0
    for n in hosts:
        network.link_up(n)
    await start_all(daemons)  # returns when every daemon has said READY=1
    expected = {f"from {d.name}" for d in daemons}
    with trio.fail_after(3.0):  # the target: discovery and convergence within 3 s
        for daemon in daemons:
            await wait_connected(daemon, 2)
            await wait_texts(daemon, "notes", expected)
    # a new entry written on any device appears on all
    await daemons[2].write("notes", "late news from the server")
    for daemon in daemons:
        await wait_texts(daemon, "notes", {"late news from the server"})


async def test_cut_link_then_healed_converges(lan) -> None:
    network, daemons = lan
    laptop, desktop, server = daemons
    network.link_down(3)
    await laptop.write("chat", "sent while the server was cut off")
    await server.write("chat", "written on the isolated server")
    network.link_up(3)
    for daemon in daemons:
        await wait_texts(daemon, "chat", {"sent while the server was cut off",
                                          "written on the isolated server"}, limit_s=30)


@pytest.mark.skipif(not impair_available()[0], reason=impair_available()[1])
async def test_converge_under_loss_and_reordering(lan) -> None:
    network, daemons = lan
    for n in (1, 2, 3):
        network.impair(n, loss=0.2, reorder=True)
    expected = set()
    for daemon in daemons:
        for i in range(30):
            text = f"{daemon.name} #{i} " + "x" * 500
            expected.add(text)
            await daemon.write("lossy", text)
    views = [await wait_texts(d, "lossy", expected, limit_s=60) for d in daemons]
    assert views[0] == views[1] == views[2]


CAPTURE = textwrap.dedent("""
    import json, sys, threading
    from zeroconf import ServiceBrowser, Zeroconf
    want = int(sys.argv[2]); seen = {}; done = threading.Event()
    zc = Zeroconf(interfaces=[sys.argv[1]])
    class Listener:
        def add_service(self, zc, type_, name):
            info = zc.get_service_info(type_, name, timeout=3000)
            if info is not None:
                seen[name] = {"name": name, "server": info.server,
                              "txt": {k.decode(): (v or b"").decode("latin-1")
                                      for k, v in info.properties.items()}}
                if len(seen) >= want: done.set()
        update_service = add_service
        def remove_service(self, *a): pass
    ServiceBrowser(zc, "_meshd._tcp.local.", Listener())
    done.wait(15); zc.close()
    print(json.dumps(list(seen.values())))
""")


async def capture_adverts(network: Network, n: int, want: int) -> list[dict]:
    result = await trio.to_thread.run_sync(
        lambda: network.run(n, [sys.executable, "-c", CAPTURE, network.address(n), str(want)],
                            capture_output=True, text=True, timeout=30))
    return json.loads(result.stdout or "[]")


async def test_outsider_sees_no_identifier(lan) -> None:
    network, daemons = lan
    outsider = 4  # no daemon there: anyone on the LAN with plain zeroconf
    first = await capture_adverts(network, outsider, want=3)
    assert len(first) >= 3, "the three devices' adverts were captured (a re-advert may add one)"
    identifiers = set()
    for daemon in daemons:
        status = await daemon.status()
        identifiers |= {status["device"], status["fingerprint"], status["circle"], daemon.name}
    blob = " ".join(sorted(advert_values(first)))
    for identifier in identifiers:
        assert identifier not in blob
        assert identifier[:8] not in blob
    # Every advert is made afresh (names, nonce, sealed hint): restart the devices and nothing
    # of the first capture repeats. (Across real 15-minute windows with an injected clock:
    # tests/shell/test_discovery.py.)
    for daemon in daemons:
        assert await daemon.stop() == 0
    await start_all(daemons)
    second = await capture_adverts(network, outsider, want=3)
    assert len(second) >= 3
    assert advert_values(first) & advert_values(second) == set()


def advert_values(adverts: list[dict]) -> set[str]:
    """Everything an advert shows an outsider, but the protocol version."""
    return ({a["name"] for a in adverts} | {a["server"] for a in adverts}
            | {v for a in adverts for k, v in a["txt"].items() if k != "v"})


async def test_ipv6_only_lan_discovers_pairs_and_syncs(tmp_path: Path) -> None:
    """No IPv4 anywhere: mDNS over IPv6 on eth0 only, pairing and sync to link-local addresses
    (which are only reachable with their scope, the interface)."""
    with Network(devices=2, ipv6_only=True) as network:
        daemons = [DaemonProcess(tmp_path, name, listen="*:7743", netns=network.ns(n),
                                 interfaces=[DEVICE_INTERFACE])
                   for n, name in enumerate(("laptop", "desktop"), start=1)]
        try:
            await form_circle(daemons)  # pairing found the invitation over mDNS, then all connect
            await daemons[1].write("notes", "over IPv6")
            await wait_texts(daemons[0], "notes", {"over IPv6"})
            peers = (await daemons[0].request("GET", "/v1/peers"))["peers"]
            assert any(a.startswith(f"{network.address(2)}%") for a in peers[0]["addresses"]), peers
        finally:
            for daemon in daemons:
                daemon.kill()
