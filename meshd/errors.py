"""What the daemon's operations refuse with: a kind, a stable code, and a message saying what
to do. No HTTP here: meshd/api/errors.py maps each kind to its status in one table.

The code names the case (`bad-code`, `unknown-device`, `storage-full`...) and is what scripts
match; the kind says whose move it is (the caller's argument, a missing thing, a state that
conflicts, a peer that failed...), which is all the API needs to choose a status.
"""

from __future__ import annotations


class Refusal(Exception):
    """A refusal the caller should see. Subclasses are the kinds; never raised itself."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidArgument(Refusal):
    """The request itself is wrong (a malformed code, address, name or record)."""


class Forbidden(Refusal):
    """Pairing was refused or failed its check: ask for a new code."""


class NotFound(Refusal):
    """The thing named does not exist (an invitation, a device, a relay)."""


class Conflict(Refusal):
    """The device's state does not allow it now (not a member, needs --force...)."""


class PeerFailed(Refusal):
    """Another party (the inviter, a relay) answered wrongly or not at all."""


class PeerTimeout(Refusal):
    """Another party could not be reached in time."""


class Unavailable(Refusal):
    """A service this needs is not running, or the store is read-only."""


class StorageFull(Refusal):
    """The disk is full: free space and retry."""


class StorageBroken(Refusal):
    """The store is corrupt: nothing more can be done from the API."""
