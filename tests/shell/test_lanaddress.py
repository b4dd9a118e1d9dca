"""IPv6 in LAN discovery and pairing: which addresses, in which form (issue 15).

The end-to-end run, two daemons on an IPv6-only LAN: tests/netns/test_netns_daemons.py.
"""

from __future__ import annotations

import socket

import trio

from meshd.net.lanaddress import advertised, dial_order, mdns_interfaces, select_addresses
from meshd.pairingservice import _listen_on_one_port

AVAILABLE = [("lo", "127.0.0.1"), ("lo", "::1%lo"), ("eth0", "10.0.0.5"),
             ("eth0", "fe80::5%eth0"), ("eth0", "fd00::5%eth0")]


def test_ipv6_addresses_are_chosen_with_their_interface() -> None:
    assert select_addresses(AVAILABLE, None) == ("10.0.0.5", "fd00::5%eth0", "fe80::5%eth0")
    assert select_addresses(AVAILABLE, ["eth0"]) == ("10.0.0.5", "fd00::5%eth0", "fe80::5%eth0")
    # An allow-list may name an IPv6 address with or without its scope.
    assert select_addresses(AVAILABLE, ["fe80::5"]) == ("fe80::5%eth0",)
    assert select_addresses(AVAILABLE, ["fd00::5%eth0"]) == ("fd00::5%eth0",)


def test_adverts_carry_no_scope_and_zeroconf_joins_each_interface_once() -> None:
    chosen = ("10.0.0.5", "::1%lo", "fe80::1%lo")
    assert advertised(chosen) == ["10.0.0.5", "::1", "fe80::1"]
    assert mdns_interfaces(chosen) == ["10.0.0.5", socket.if_nametoindex("lo")]


def test_heard_addresses_are_dialled_ipv4_then_routable_ipv6_then_link_local() -> None:
    heard = ["fe80::5%3", "fd00::5", "10.0.0.5"]
    assert dial_order(heard) == ["10.0.0.5", "fd00::5", "fe80::5%3"]


async def test_pairing_listens_on_every_family_on_one_port() -> None:
    listeners = await _listen_on_one_port(0, None)
    try:
        families = {listener.socket.family for listener in listeners}
        ports = {listener.socket.getsockname()[1] for listener in listeners}
        assert socket.AF_INET in families and len(ports) == 1
        if socket.has_ipv6:
            assert socket.AF_INET6 in families, "an IPv6 joiner can reach the invitation"
    finally:
        for listener in listeners:
            await listener.aclose()
    await trio.lowlevel.checkpoint()
