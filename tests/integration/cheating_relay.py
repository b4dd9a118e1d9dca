"""A real relay process that cheats once with a mailbox (run: python -m tests.integration.cheating_relay).

It is `meshd relay` with its SQLite storage patched: once the file named by
$MESHD_TEST_CHEAT_FILE holds a cheat (drop, reorder, shuffle, tamper), the first fetch answer of
three envelopes or more is altered that way, and the file is then set to "done". Everything
else (storage, deposits, acks, the protocol) is the real relay.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from meshd.cmd.meshd import meshd_main
from meshd.relay.storage import SQLiteRelayStorage

_honest_envelopes_after = SQLiteRelayStorage.envelopes_after


def cheat(kind: str, items: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The answer a cheating relay gives instead of items (at least 3 of them)."""
    if kind == "drop":  # the second envelope never reaches the device
        return [items[0], *items[2:]]
    if kind == "reorder":  # the second and third swapped, ids and all (ids out of order)
        return [items[0], items[2], items[1], *items[3:]]
    if kind == "shuffle":  # the second and third envelopes swapped under ids still in order
        return [items[0], (items[1][0], items[2][1]), (items[2][0], items[1][1]), *items[3:]]
    if kind == "tamper":  # one bit of the second envelope flipped
        envelope = bytearray(items[1][1])
        envelope[len(envelope) // 2] ^= 0x40
        return [items[0], (items[1][0], bytes(envelope)), *items[2:]]
    raise ValueError(f"unknown cheat {kind!r}")


def _cheating_envelopes_after(self: SQLiteRelayStorage, *args: Any,
                              **kwargs: Any) -> tuple[list[tuple[int, bytes]], bool]:
    items, more = _honest_envelopes_after(self, *args, **kwargs)
    switch = Path(os.environ["MESHD_TEST_CHEAT_FILE"])
    kind = switch.read_text().strip() if switch.exists() else ""
    if len(items) < 3 or kind in ("", "done"):
        return items, more
    switch.write_text("done")
    return cheat(kind, items), more


SQLiteRelayStorage.envelopes_after = _cheating_envelopes_after  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(meshd_main(["relay", *sys.argv[1:]]))
