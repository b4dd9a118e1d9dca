"""The one table from the daemon's refusals (meshd/errors.py) to HTTP statuses.

The daemon and its services raise a kind of Refusal with a stable code; only here does a
kind become a status (protocol/api.md, "Errors"). Errors of HTTP itself (408, 413, 431...)
are the server's own and stay in httpserver.py.
"""

from __future__ import annotations

from ..errors import (
    Conflict,
    Forbidden,
    InvalidArgument,
    NotFound,
    PeerFailed,
    PeerTimeout,
    Refusal,
    StorageBroken,
    StorageFull,
    Unavailable,
)
from .values import ApiError

STATUS: dict[type[Refusal], int] = {
    InvalidArgument: 400,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    StorageBroken: 500,
    PeerFailed: 502,
    Unavailable: 503,
    PeerTimeout: 504,
    StorageFull: 507,
}


def api_error(refusal: Refusal) -> ApiError:
    """The API's answer to a refusal: its kind's status, its code and message."""
    return ApiError(STATUS[type(refusal)], refusal.code, refusal.message)
