"""Self-test of the namespace LAN: reachability, multicast across the bridge, a cut link,
loss and reordering, and a clean teardown. Skips with the reason where namespaces cannot be
made (not root, no iproute2, no netns support)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from .netns import Network, available, impair_available

OK, WHY_NOT = available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not OK, reason=WHY_NOT)]

PYTHON = sys.executable

# Receives numbered UDP datagrams until quiet for 1 s; prints "received late".
RECEIVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Room for the whole burst, so only the impairment loses datagrams (FORCE: root only).
    s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
    s.bind((sys.argv[1], 9999)); s.settimeout(1.0)
    print("ready", flush=True)
    got = []
    try:
        while True:
            got.append(int(s.recv(2000)))
    except socket.timeout:
        pass
    highest, late = -1, 0
    for seq in got:
        late += seq < highest
        highest = max(highest, seq)
    print(len(got), late)
""")
SENDER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(int(sys.argv[2])):
        s.sendto(str(i).encode().ljust(600), (sys.argv[1], 9999))
""")
TCP_PROBE = textwrap.dedent("""
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()
        print("open")
    except OSError as err:
        print("closed", err)
""")
LISTENER = textwrap.dedent("""
    import socket, sys
    s = socket.create_server((sys.argv[1], 7000))
    print("ready", flush=True)
    while True:
        s.accept()[0].close()
""")
ZEROCONF_ADVERTISE = textwrap.dedent("""
    import sys
    from zeroconf import ServiceInfo, Zeroconf
    zc = Zeroconf(interfaces=[sys.argv[1]])
    zc.register_service(ServiceInfo("_meshd-test._tcp.local.", "probe._meshd-test._tcp.local.",
                                    port=7000, server="probe-host.local.",
                                    parsed_addresses=[sys.argv[1]]))
    print("ready", flush=True)
    sys.stdin.read()
    zc.close()
""")
ZEROCONF_FIND = textwrap.dedent("""
    import sys
    from zeroconf import Zeroconf
    zc = Zeroconf(interfaces=[sys.argv[1]])
    info = zc.get_service_info("_meshd-test._tcp.local.", "probe._meshd-test._tcp.local.",
                               timeout=10000)
    print(info.parsed_addresses()[0] if info else "nothing")
    zc.close()
""")


def started(network: Network, n: int, script: str, *args: str) -> subprocess.Popen[str]:
    process = network.popen(n, [PYTHON, "-c", script, *args], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def tcp_open(network: Network, src: int, dst: int) -> bool:
    out = network.run(src, [PYTHON, "-c", TCP_PROBE, network.address(dst), "7000"]).stdout
    return out.startswith("open")


def blast(network: Network, src: int, dst: int, count: int = 500) -> tuple[int, int]:
    """Send numbered datagrams src -> dst; (how many arrived, how many arrived late)."""
    receiver = started(network, dst, RECEIVER, network.address(dst))
    network.run(src, [PYTHON, "-c", SENDER, network.address(dst), str(count)])
    out, _ = receiver.communicate(timeout=20)
    received, late = map(int, out.split())
    return received, late


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_three_hosts_reach_each_other_and_mdns_crosses_the_bridge() -> None:
    links_before = root_links()
    with Network(devices=3) as network:
        names = {network.bridge_ns, *(network.ns(n) for n in (1, 2, 3))}
        assert names <= namespaces()
        for n in (1, 2, 3):
            started(network, n, LISTENER, network.address(n))
        for src, dst in ((1, 2), (2, 3), (3, 1)):
            assert tcp_open(network, src, dst)

        advertiser = started(network, 1, ZEROCONF_ADVERTISE, network.address(1))
        found = network.run(3, [PYTHON, "-c", ZEROCONF_FIND, network.address(3)], timeout=30)
        assert found.stdout.strip() == network.address(1)
        advertiser.communicate("", timeout=10)
    assert not names & namespaces(), "namespaces left behind"
    assert root_links() == links_before, "links left behind in the caller's namespace"


def test_a_cut_link_isolates_a_host_until_healed() -> None:
    with Network(devices=2) as network:
        started(network, 2, LISTENER, network.address(2))
        assert tcp_open(network, 1, 2)
        network.link_down(2)
        assert not tcp_open(network, 1, 2)
        network.link_up(2)
        assert tcp_open(network, 1, 2)


@pytest.mark.skipif(not impair_available()[0], reason=impair_available()[1])
def test_loss_drops_about_the_share_asked_for() -> None:
    with Network(devices=2) as network:
        assert blast(network, 1, 2)[0] == 500  # a clean link first: nothing lost
        network.impair(1, loss=0.2, reorder=False)
        received, _ = blast(network, 1, 2)
        assert 330 <= received <= 465  # binomial(500, 0.8): mean 400, sd 9
        network.clear_impairment(1)
        assert blast(network, 1, 2)[0] == 500


@pytest.mark.skipif(not impair_available()[0], reason=impair_available()[1])
def test_reorder_reorders_back_to_back_traffic_in_both_directions() -> None:
    with Network(devices=2) as network:
        assert blast(network, 1, 2)[1] == 0  # in order without impairment
        network.impair(1, loss=0.0, reorder=True)
        outbound = blast(network, 1, 2)
        inbound = blast(network, 2, 1)
        assert outbound[0] == 500 and inbound[0] == 500
        assert outbound[1] > 20 and inbound[1] > 20
