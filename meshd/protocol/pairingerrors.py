"""The errors of pairing by short code (PairingError and InvalidCode are in codes.py).

Each is a RemoteProtocolError with a stable `reason`; pairing.py re-exports them.
"""

from __future__ import annotations

from .codes import PairingError
from .errors import RemoteProtocolError


class WrongCode(PairingError, RemoteProtocolError):
    """Message 3 did not authenticate: the joiner's code differs from the invitation's."""

    reason = "wrong-code"


class WrongNameplate(PairingError, RemoteProtocolError):
    """The joiner asked for a different invitation than the one on offer here."""

    reason = "wrong-nameplate"


class MalformedPairingMessage(PairingError, RemoteProtocolError):
    reason = "malformed"


class InvitationExpired(PairingError, RemoteProtocolError):
    """The invitation's 10 minutes are over: make a new one."""

    reason = "expired"


class InvitationUsed(PairingError, RemoteProtocolError):
    """The invitation already had its one attempt: make a new one."""

    reason = "used"


class PairingRefused(PairingError, RemoteProtocolError):
    """The inviter answered pair.refused; `detail` is its reason."""

    reason = "refused"

    def __init__(self, detail: str) -> None:
        super().__init__(f"the inviting device refused this device: {detail}")
        self.detail = detail


class PairingAborted(PairingError, RemoteProtocolError):
    """The inviter closed the connection without a welcome (for the joiner, a wrong code,
    an expired or used invitation look the same: the inviter tells an unauthenticated
    party nothing)."""

    reason = "aborted"
