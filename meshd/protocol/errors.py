"""The protocol layer's errors: one abstract base, split by whose fault it was.

LocalProtocolError means this process misused the API (a meshd bug, or a caller passing
something invalid). RemoteProtocolError means the other side misbehaved: the shell drops
that peer and carries on. Messages never contain key material or payload bytes.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Abstract: raise LocalProtocolError or RemoteProtocolError."""

    def __init__(self, msg: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise a subclass")
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """We used the protocol wrongly: a bug in meshd or an invalid local request."""

    def _reraise_as_remote_protocol_error(self) -> RemoteProtocolError:
        """Translate at the receive boundary: bad input from a peer is the peer's fault."""
        err = RemoteProtocolError(str(self))
        err.__cause__ = self
        return err


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid: close that connection, keep the daemon."""
