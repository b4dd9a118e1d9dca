"""A relay's address, HOST:PORT#KEY, parsed without any I/O (config.py checks addresses
with it; client.py dials them)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from ..protocol.crypto import PublicKey
from .advertise import is_unspecified

__all__ = ["RelayAddress", "RelayAddressError"]


class RelayAddressError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class RelayAddress:
    """HOST:PORT#KEY, as `meshd relay` prints it; KEY is the relay's pinned static key."""

    host: str
    port: int
    key: PublicKey

    @classmethod
    def parse(cls, text: str) -> RelayAddress:
        where, sep, key_text = text.strip().partition("#")
        host, colon, port = where.rpartition(":")
        if not sep or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RelayAddressError(f"{text!r} is not a relay address HOST:PORT#KEY")
        try:
            key = base64.urlsafe_b64decode(key_text + "=" * (-len(key_text) % 4))
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise RelayAddressError(f"{text!r}: the key after '#' is not a 32-byte base64url key")
        if is_unspecified(host):
            raise RelayAddressError(
                f"{text!r}: {host} means every address of the relay's machine, which no device "
                "can dial; use the relay's public name or address (`meshd relay --public-address`)")
        return cls(host.strip("[]"), int(port), PublicKey(key))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}#{base64.urlsafe_b64encode(self.key).decode().rstrip('=')}"
