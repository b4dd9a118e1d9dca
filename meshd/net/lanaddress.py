"""Which of this machine's addresses mDNS runs on, IPv4 and IPv6, and how zeroconf names them.

An address is a string: IPv4 dotted, or IPv6 with its interface as the scope
("fe80::1%eth0", "fd00::2%eth0"), since zeroconf joins IPv6 multicast per interface and a
link-local address means nothing without one. Adverts carry addresses without the scope (an
AAAA record has none); the receiver scopes a link-local one with the interface it arrived on.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence

import ifaddr

AddressSource = Callable[[], list[tuple[str, str]]]
"""Returns (interface name, address) pairs for the machine's current interfaces."""


def system_addresses() -> list[tuple[str, str]]:
    """Every IPv4 and IPv6 address of this machine with its interface name (getifaddrs)."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                out.append((adapter.nice_name, ip.ip))
            else:
                out.append((adapter.nice_name, f"{ip.ip[0].split('%')[0]}%{adapter.name}"))
    return out


def unscoped(address: str) -> str:
    return address.split("%", 1)[0]


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(unscoped(address)).is_loopback


def select_addresses(
    available: Sequence[tuple[str, str]], allow: Sequence[str] | None
) -> tuple[str, ...]:
    """The addresses mDNS runs on: those the allow-list names (by interface name or
    address, an IPv6 one with or without its scope), or with no allow-list every address
    except loopback."""
    if allow:
        chosen = {address for name, address in available
                  if name in allow or address in allow or unscoped(address) in allow}
    else:
        chosen = {address for _, address in available if not _is_loopback(address)}
    return tuple(sorted(chosen))


def is_ipv6(address: str) -> bool:
    return ":" in address


def ipv4_only(addresses: Sequence[str]) -> tuple[str, ...]:
    return tuple(a for a in addresses if not is_ipv6(a))


def mdns_interfaces(addresses: Sequence[str]) -> list[str | int]:
    """What zeroconf binds to: each IPv4 address, and each interface (by index) that has a
    selected IPv6 address, once (one IPv6 multicast membership per interface)."""
    indexes: set[int] = set()
    for address in addresses:
        if is_ipv6(address) and "%" in address:
            try:
                indexes.add(socket.if_nametoindex(address.split("%", 1)[1]))
            except OSError:
                continue  # the interface went away: the next poll sees the change
    return [*ipv4_only(addresses), *sorted(indexes)]


def advertised(addresses: Sequence[str]) -> list[str]:
    """The addresses an advert carries (no scope)."""
    return sorted({unscoped(a) for a in addresses})


def dial_order(addresses: Sequence[str]) -> list[str]:
    """Addresses heard in an advert, in the order to try them: IPv4, then IPv6 global or
    unique-local, then link-local (reachable only through the interface in its scope)."""
    def rank(address: str) -> tuple[int, str]:
        ip = ipaddress.ip_address(unscoped(address))
        return (0 if ip.version == 4 else 2 if ip.is_link_local else 1), address
    return sorted(addresses, key=rank)
