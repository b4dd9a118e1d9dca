"""Containment of bugs: an unexpected exception ends one connection, never the process.

Every task that serves one untrusted party (a peer connection, a relay session, an API
request) ends in `report_bug(where, err)` for any exception its own code did not expect.
That logs the bug once per (where, exception type and place) with its traceback at ERROR, repeats at
DEBUG, and counts it in `meshd_internal_errors_total{where}`, which the daemon's /metrics
renders. The caller then closes that one connection and the process goes on.

`where` is a short fixed label ("peer", "relay-session", "api", "connection"), never text
from the peer. Exception messages are meshd's own and carry no key material (protocol
errors are written that way), so the traceback is safe to log.
"""

from __future__ import annotations

import logging
import traceback

from .api.metrics import INTERNAL_ERRORS

log = logging.getLogger("meshd.bug")

_MAX_REMEMBERED = 256
_seen: set[tuple[str, str]] = set()  # (where, origin): one ERROR per bug


def report_bug(where: str, err: BaseException) -> None:
    """Log (once per kind, with traceback) and count a bug contained to one connection."""
    INTERNAL_ERRORS.inc(where=where)
    key = (where, _origin(err))
    text = "".join(traceback.format_exception(err)).rstrip()
    if key in _seen:
        log.debug("a bug in meshd ended one %s again:\n%s", where, text)
        return
    if len(_seen) >= _MAX_REMEMBERED:
        _seen.clear()
    _seen.add(key)
    log.error("a bug in meshd ended one %s (the process goes on; please report it):\n%s", where, text)


def _origin(err: BaseException) -> str:
    """Where the (first) exception was raised: its type and innermost frame."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    frames = traceback.extract_tb(err.__traceback__)
    place = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    return f"{type(err).__name__} at {place}"
