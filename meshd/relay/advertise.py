"""The address a relay tells people to give their devices: never an unspecified one.

A relay listening on 0.0.0.0 or :: accepts connections on every address of its machine, but
"0.0.0.0:7744" names no machine from anywhere else. `meshd relay --public-address HOST[:PORT]`
says what devices should dial (the DNS name or address that reaches the relay, perhaps
through a port forward); without it a relay that listens on one specific address prints
that, and one that listens everywhere prints the machine's fully qualified host name.
"""

from __future__ import annotations

import ipaddress
import socket


class PublicAddressError(ValueError):
    """Not a HOST[:PORT] devices could dial."""


def is_unspecified(host: str) -> bool:
    """True for "every address" (0.0.0.0, ::, '' or '*'): nothing another machine can dial."""
    host = host.strip("[]")
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_unspecified
    except ValueError:
        return False  # a DNS name


def parse_public_address(text: str) -> tuple[str, int | None]:
    """HOST, HOST:PORT, [V6] or [V6]:PORT; the port is None when not given."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "x")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, None  # a name, an IPv4 address or a bare IPv6 address
    if port_text is not None and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        raise PublicAddressError(f"{text!r} is not HOST[:PORT]")
    if is_unspecified(host):
        raise PublicAddressError(
            f"{text!r} is not an address devices can dial: give the relay's public DNS name "
            "or address")
    return host, None if port_text is None else int(port_text)


def advertised(listen_host: str, bound_port: int, public: tuple[str, int | None] | None,
               *, fqdn: str | None = None) -> tuple[str, int]:
    """(host, port) for the HOST:PORT#KEY line the relay prints."""
    if public is not None:
        host, port = public
        return host, bound_port if port is None else port
    if not is_unspecified(listen_host):
        return listen_host, bound_port
    return fqdn if fqdn is not None else socket.getfqdn(), bound_port
