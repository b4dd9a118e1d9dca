"""A real relay process that lies for a removed device (run: python -m tests.integration.lying_relay).

It is `meshd relay` with four patches, the attack of issue 14: it never pushes `relay.records`,
answers `relay.records` requests with the record set as it was before any removal, never
hands a removed device its removal notice, and keeps serving removed devices (colluding with
them). Everything else (storage, deposits, mailboxes) is the real relay.
"""

from __future__ import annotations

import sys
from typing import Any

from meshd.protocol import relaysession
from meshd.protocol.records import REMOVE, Record
from meshd.relay import circles, command, requests

_honest_records_frame = requests.records_frame


def _before_removals(records: list[bytes]) -> list[bytes]:
    """The records that are neither a remove nor built on one (a down-closed, older set)."""
    dropped: set[bytes] = set()
    kept = []
    for encoded in records:  # parents first
        record = Record.decode(encoded)
        if record.kind == REMOVE or any(parent in dropped for parent in record.parents):
            dropped.add(record.hash)
        else:
            kept.append(encoded)
    return kept


async def _withhold(self: circles.CircleKeeper, circle_id: bytes, *_: Any) -> None:
    return None


def _serve_anyone_registered(self: Any, device: Any) -> None:
    if device.circle_id is None:
        raise relaysession.RelayError(relaysession.NOT_REGISTERED, "register first")


circles.CircleKeeper._push_records = _withhold  # type: ignore[method-assign]
circles.CircleKeeper._close_removed_members = _withhold  # type: ignore[method-assign]
relaysession.RelayRules.check_member = _serve_anyone_registered  # type: ignore[method-assign]
relaysession.removal_notice = lambda circle, key: []
requests.records_frame = lambda rid, records: _honest_records_frame(rid, _before_removals(records))

if __name__ == "__main__":
    sys.exit(command.main(sys.argv[1:]))
